//! PostgreSQL's md5 password scheme, for clients that log in to pgcorral
//! with `auth_type = md5` and for producing md5 secrets from plain ones.

use md5::{Digest, Md5};

use super::secret::Secret;
use super::{constant_time_eq, to_hex};

/// The secret PostgreSQL stores for `user` under `password_encryption = md5`:
/// `"md5"` followed by hex(md5(password || user)).
pub fn md5_secret(user: &str, password: &str) -> String {
    salted_md5(password.as_bytes(), user.as_bytes())
}

/// Checks a client's answer to an AuthenticationMD5Password challenge.
///
/// `response` is the `"md5..."` string from the client's PasswordMessage.
/// The expected answer is `"md5" + hex(md5(hex(md5(password || user)) ||
/// salt))`; only the inner digest is needed, so an md5 secret works as well
/// as the plain password. A SCRAM verifier cannot produce that digest.
pub fn md5_verify(secret: &Secret, user: &str, salt: [u8; 4], response: &str) -> bool {
    let inner = match secret {
        Secret::Plain(password) => md5_secret(user, password),
        Secret::Md5(stored) => stored.clone(),
        Secret::Scram(_) => return false,
    };
    let expected = md5_challenge_response(&inner, salt);
    constant_time_eq(expected.as_bytes(), response.as_bytes())
}

/// The answer to an md5 challenge given the stored `"md5..."` secret: the
/// salt is hashed with the secret's hex digits, not with the raw digest.
pub(crate) fn md5_challenge_response(md5_secret: &str, salt: [u8; 4]) -> String {
    let hex = md5_secret.strip_prefix("md5").unwrap_or(md5_secret);
    salted_md5(hex.as_bytes(), &salt)
}

fn salted_md5(data: &[u8], salt: &[u8]) -> String {
    let mut h = Md5::new();
    h.update(data);
    h.update(salt);
    format!("md5{}", to_hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    // Both taken from a PostgreSQL 15 server with password_encryption = md5.
    const PG_POSTGRES_SECRET: &str = "md553f48b7c4b76a86ce72276c5755f217d"; // postgres / secret
    const PG_POSTGRES2_SECRET: &str = "md52a6cbddbf747548186c60739cd10a39b"; // postgres2 / x

    #[test]
    fn md5_secret_matches_postgres() {
        assert_eq!(md5_secret("postgres", "secret"), PG_POSTGRES_SECRET);
        assert_eq!(md5_secret("postgres2", "x"), PG_POSTGRES2_SECRET);
    }

    #[test]
    fn verifies_with_plain_and_md5_secrets() {
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        // What a libpq-style client answers for the right password.
        let good = md5_hash(b"postgres", b"secret", salt);
        let bad = md5_hash(b"postgres", b"Secret", salt);
        let plain = Secret::Plain("secret".into());
        let md5 = Secret::Md5(PG_POSTGRES_SECRET.into());
        for secret in [&plain, &md5] {
            assert!(md5_verify(secret, "postgres", salt, &good));
            assert!(!md5_verify(secret, "postgres", salt, &bad));
            // A different salt means a replayed answer is useless.
            assert!(!md5_verify(secret, "postgres", [0, 0, 0, 0], &good));
            assert!(!md5_verify(secret, "postgres", salt, ""));
        }
    }

    #[test]
    fn plain_secret_is_salted_with_the_user_name() {
        let salt = [5, 6, 7, 8];
        let good = md5_hash(b"postgres", b"secret", salt);
        let plain = Secret::Plain("secret".into());
        assert!(!md5_verify(&plain, "postgres2", salt, &good));
    }

    #[test]
    fn scram_secret_cannot_answer_md5() {
        let salt = [1, 2, 3, 4];
        let secret = Secret::Scram(super::super::ScramSecret::from_password("secret", b"salt", 1));
        assert!(!md5_verify(&secret, "postgres", salt, &md5_hash(b"postgres", b"secret", salt)));
    }

    #[test]
    fn challenge_response_from_secret_matches_client() {
        let salt = [9, 8, 7, 6];
        assert_eq!(md5_challenge_response(PG_POSTGRES_SECRET, salt), md5_hash(b"postgres", b"secret", salt));
    }
}
