//! Stored password secrets, as they appear in `userlist.txt`, in
//! `auth_query` results and in the config, in the three forms PostgreSQL
//! itself stores in `pg_authid.rolpassword`.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

/// A password as pgcorral knows it for one user.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The password itself. Works with every authentication method.
    Plain(String),
    /// `"md5"` followed by 32 lower-case hex digits of md5(password || user).
    Md5(String),
    /// A SCRAM-SHA-256 verifier; the password cannot be recovered from it.
    Scram(ScramSecret),
}

/// The parts of a SCRAM-SHA-256 verifier (RFC 5802 section 3).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Secret {
    /// Classifies a stored secret the way PostgreSQL's `get_password_type`
    /// does: anything that is not a well-formed md5 or SCRAM verifier is a
    /// plaintext password, including a malformed `SCRAM-SHA-256$...` string.
    pub fn parse(s: &str) -> Secret {
        if let Some(scram) = ScramSecret::parse(s) {
            return Secret::Scram(scram);
        }
        if is_md5_secret(s) {
            return Secret::Md5(s.to_owned());
        }
        Secret::Plain(s.to_owned())
    }
}

// PostgreSQL accepts only lower-case hex here; an upper-case string is a
// (strange) plaintext password, and treating it as md5 would make it
// unusable for anyone who really chose it.
fn is_md5_secret(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A password as SCRAM salts it: SASLprep'd (RFC 4013), as PostgreSQL and libpq do, so that a
/// password with a non-ASCII space or a full-width letter gives PostgreSQL's verifier. A
/// password SASLprep refuses (prohibited or unassigned characters) is used as it is, again as
/// PostgreSQL does.
pub(crate) fn prepared_password(password: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

/// PostgreSQL's salt length (`SCRAM_DEFAULT_SALT_LEN`).
const MOCK_SALT_BYTES: usize = 16;

impl ScramSecret {
    /// Derives the verifier PostgreSQL would store for `password`, SASLprep included (see
    /// [`prepared_password`]).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = salted_password(prepared_password(password).as_bytes(), salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// The verifier an unknown user is checked against, as PostgreSQL's mock authentication:
    /// its salt comes from the name and a key drawn once per process, so that one name always
    /// meets the same salt and two names different ones, as real users do. No password matches
    /// its keys, and checking it costs what checking a stored verifier costs.
    pub fn mock(user: &str, iterations: u32) -> ScramSecret {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(rand::random);
        let derive = |what: &[u8]| hmac_sha256(key, &[what, b"\0", user.as_bytes()].concat());
        ScramSecret {
            iterations,
            salt: derive(b"salt")[..MOCK_SALT_BYTES].to_vec(),
            stored_key: derive(b"stored key"),
            server_key: derive(b"server key"),
        }
    }

    fn parse(s: &str) -> Option<ScramSecret> {
        let rest = s.strip_prefix(SCRAM_PREFIX)?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;

        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations: u32 = iterations.parse().ok().filter(|&i| i > 0)?;
        let salt = STANDARD.decode(salt).ok().filter(|s| !s.is_empty())?;
        Some(ScramSecret {
            iterations,
            salt,
            stored_key: decode_key(stored_key)?,
            server_key: decode_key(server_key)?,
        })
    }
}

impl fmt::Display for ScramSecret {
    /// Formats the verifier in PostgreSQL's `rolpassword` syntax, so that
    /// `Secret::parse` reads it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

// Secrets end up inside config structs that get logged with {:?}; keep the
// password and verifier material out of those logs.
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
            Secret::Scram(s) => write!(f, "Secret::Scram({s:?})"),
        }
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt", &"<redacted>")
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

fn decode_key(s: &str) -> Option<[u8; 32]> {
    STANDARD.decode(s).ok()?.try_into().ok()
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Hi() from RFC 5802 section 2.2, which is PBKDF2 with HMAC-SHA-256 and a
/// single output block. Verifiers here and pass-through keys in `scram_client`
/// both start from it.
pub(crate) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let key = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes keys of any length");
    let mut mac = key.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut result = u;
    for _ in 1..iterations {
        // Cloning the keyed state avoids re-hashing the password into the
        // HMAC pads on each of the thousands of rounds.
        let mut mac = key.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mock_verifier_has_a_salt_of_its_own_per_name_and_matches_no_password() {
        let ghost = ScramSecret::mock("ghost", 4096);
        assert!(ghost == ScramSecret::mock("ghost", 4096), "one name, one salt, like a real user");
        assert!(ghost.salt != ScramSecret::mock("phantom", 4096).salt, "two names, two salts");
        assert_eq!((ghost.salt.len(), ghost.iterations), (16, 4096));
        for password in ["", "ghost", "password", "\0"] {
            assert!(!crate::auth::verify_plaintext(&Secret::Scram(ghost.clone()), "ghost", password));
        }
    }

    // Taken from a PostgreSQL 15 server after
    // CREATE ROLE scramuser LOGIN PASSWORD 'pencil'.
    const PG_SCRAM_SECRET: &str = "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=";
    const PG_SCRAM_PASSWORD: &str = "pencil";

    #[test]
    fn parses_postgres_scram_secret() {
        let Secret::Scram(s) = Secret::parse(PG_SCRAM_SECRET) else {
            panic!("not recognised as SCRAM");
        };
        assert_eq!(s.iterations, 4096);
        assert_eq!(s.salt.len(), 16);
        assert_eq!(s.to_string(), PG_SCRAM_SECRET);
    }

    #[test]
    fn from_password_reproduces_postgres_secret() {
        let Secret::Scram(pg) = Secret::parse(PG_SCRAM_SECRET) else {
            panic!("not recognised as SCRAM");
        };
        let ours = ScramSecret::from_password(PG_SCRAM_PASSWORD, &pg.salt, pg.iterations);
        assert_eq!(ours, pg);
    }

    #[test]
    fn malformed_scram_is_plain() {
        for s in [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==",
            "SCRAM-SHA-256$x:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=",
            "SCRAM-SHA-256$0:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=",
            // stored key one byte short
            "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUQ==:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=",
            "SCRAM-SHA-256$4096:not*base64$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=",
        ] {
            assert_eq!(Secret::parse(s), Secret::Plain(s.to_owned()), "{s}");
        }
    }

    #[test]
    fn classifies_md5_and_plain() {
        let md5 = "md553f48b7c4b76a86ce72276c5755f217d";
        assert_eq!(Secret::parse(md5), Secret::Md5(md5.to_owned()));
        for plain in [
            "md553F48B7C4B76A86CE72276C5755F217D",
            "md553f48b7c4b76a86ce72276c5755f217",
            "md553f48b7c4b76a86ce72276c5755f217dd",
            "md5zzf48b7c4b76a86ce72276c5755f217d",
            "secret",
            "",
        ] {
            assert_eq!(Secret::parse(plain), Secret::Plain(plain.to_owned()));
        }
    }

    #[test]
    fn debug_hides_secret_material() {
        let shown = format!("{:?} {:?}", Secret::parse("hunter2"), Secret::parse(PG_SCRAM_SECRET));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("Qu4l"), "{shown}");
    }
}
