//! Authentication in both directions: verifying clients that connect to
//! pgcorral (cleartext, md5, SCRAM-SHA-256 server side) and logging pgcorral
//! in to the PostgreSQL servers it pools connections for.

pub mod auth_query;
mod backend_login;
mod error;
pub mod hba;
pub mod kdf;
mod md5;
mod scram;
mod scram_client;
mod secret;

pub use backend_login::{
    login, query_rows, run_simple_query, server_error, BackendLoginError, LoginOutcome, LoginRequest,
};
pub use error::{AuthError, ScramClientError};
pub use md5::{md5_secret, md5_verify};
pub use scram::{verify_plaintext, ScramServer, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
pub use scram_client::{ScramClient, ScramKeys};
pub use secret::{ScramSecret, Secret};

/// Compares two byte strings without an early exit, so that the time taken
/// does not reveal how long a matching prefix an attacker has guessed.
///
/// The length is not secret here: every caller compares digests or encodings
/// whose length is fixed by the algorithm, not by the password.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold back into a
    // short-circuiting comparison.
    std::hint::black_box(diff) == 0
}

/// Lower-case hex, as PostgreSQL writes md5 digests.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_plain_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(to_hex(&[0x00, 0xab, 0x7f, 0xff]), "00ab7fff");
    }
}
