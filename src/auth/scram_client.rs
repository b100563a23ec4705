//! SCRAM-SHA-256 client side (RFC 5802, RFC 7677), for pgcorral logging in
//! to the PostgreSQL servers it pools connections for.
//!
//! It proves knowledge of the password either from the password itself or,
//! when pgcorral never had it, from pass-through [`ScramKeys`]: the ClientKey
//! a client revealed to pgcorral's [`ScramServer`](super::ScramServer) while
//! logging in, together with the ServerKey of the same verifier. That is how
//! PgBouncer logs in to a server on behalf of a client when only SCRAM
//! verifiers are stored; it works only when the server holds the very same
//! verifier (same salt and iteration count), since the ClientKey is derived
//! from them.
//!
//! pgcorral does not do channel binding towards servers: it always sends
//! the GS2 flag `n`, which PostgreSQL accepts over TLS as well. Sending `y`
//! would be taken by a TLS server that offers `-PLUS` as a downgrade attack.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::constant_time_eq;
use super::error::ScramClientError;
use super::kdf::MAX_ITERATIONS;
use super::secret::{hmac_sha256, prepared_password, salted_password, ScramSecret};

/// Random bytes in our nonce; libpq uses as many.
const CLIENT_NONCE_BYTES: usize = 18;

/// What `c=` carries when the GS2 header is `n,,`: base64("n,,").
const CBIND_NONE: &str = "biws";

/// The two keys that stand in for a password in a SCRAM exchange: the
/// ClientKey proves the client's side, the ServerKey checks the server's.
///
/// They are as good as the password for logging in to any server that holds
/// the matching verifier, so `Debug` does not show them.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramKeys {
    /// Derives the keys from a password, salted as PostgreSQL salts it for
    /// the given salt and iteration count, SASLprep included, like
    /// [`ScramSecret::from_password`].
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let salted = salted_password(prepared_password(password).as_bytes(), salt, iterations);
        ScramKeys {
            client_key: hmac_sha256(&salted, b"Client Key"),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// Whether these keys belong to `secret`, i.e. whether a server storing
    /// that verifier would accept them. Useful before trying pass-through
    /// against a server whose verifier pgcorral knows.
    pub fn matches_secret(&self, secret: &ScramSecret) -> bool {
        let stored_key = Sha256::digest(self.client_key);
        // Both comparisons run, so the timing does not tell which one failed.
        let stored_ok = constant_time_eq(&stored_key, &secret.stored_key);
        let server_ok = constant_time_eq(&self.server_key, &secret.server_key);
        stored_ok & server_ok
    }
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeys")
            .field("client_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

/// What the client proves its identity with.
enum Credentials {
    /// Salted only once the server has named the salt and iteration count.
    Password(String),
    Keys(ScramKeys),
}

enum State {
    AwaitingServerFirst { credentials: Credentials },
    AwaitingServerFinal { server_signature: [u8; 32] },
    Done,
}

/// One SCRAM-SHA-256 exchange with one server. Send
/// [`client_first`](Self::client_first) in SASLInitialResponse, feed the
/// AuthenticationSASLContinue data to [`server_first`](Self::server_first)
/// and send what it returns in SASLResponse, then feed the
/// AuthenticationSASLFinal data to [`server_final`](Self::server_final).
/// Only when that succeeds has the server shown that it knows the password.
pub struct ScramClient {
    client_nonce: String,
    client_first: String,
    state: State,
}

impl ScramClient {
    /// Starts an exchange that proves knowledge of `password`.
    pub fn with_password(password: &str) -> ScramClient {
        ScramClient::start(Credentials::Password(password.to_owned()), random_nonce())
    }

    /// Starts an exchange with pass-through keys instead of a password.
    pub fn with_keys(keys: &ScramKeys) -> ScramClient {
        ScramClient::start(Credentials::Keys(keys.clone()), random_nonce())
    }

    /// As [`with_keys`](Self::with_keys) with a chosen client nonce instead of a random one,
    /// for the fuzz harness, which needs a server-first-message that can extend it.
    pub(crate) fn with_keys_and_nonce(keys: &ScramKeys, client_nonce: &str) -> ScramClient {
        ScramClient::start(Credentials::Keys(keys.clone()), client_nonce.to_owned())
    }

    fn start(credentials: Credentials, client_nonce: String) -> ScramClient {
        // The user name is left empty, as libpq does: PostgreSQL takes the
        // role from the StartupMessage and ignores this one.
        let client_first = format!("n,,n=,r={client_nonce}");
        ScramClient { client_nonce, client_first, state: State::AwaitingServerFirst { credentials } }
    }

    /// client-first-message, for SASLInitialResponse.
    pub fn client_first(&self) -> &[u8] {
        self.client_first.as_bytes()
    }

    /// For an exchange that proves a password: the salt and iteration count the
    /// server-first-message asks it to be salted with, so that the caller can derive the keys
    /// off its thread and hand them over with [`Self::use_keys`]. None for pass-through keys
    /// (or a message [`Self::server_first`] will refuse).
    pub fn salting(&self, msg: &[u8]) -> Option<(Vec<u8>, u32)> {
        let State::AwaitingServerFirst { credentials: Credentials::Password(_) } = &self.state else {
            return None;
        };
        let first = parse_server_first(std::str::from_utf8(msg).ok()?).ok()?;
        (first.iterations <= MAX_ITERATIONS).then_some((first.salt, first.iterations))
    }

    /// The password's keys, derived by the caller for [`Self::salting`]'s salt and count.
    pub fn use_keys(&mut self, keys: ScramKeys) {
        if let State::AwaitingServerFirst { credentials } = &mut self.state {
            *credentials = Credentials::Keys(keys);
        }
    }

    /// Consumes server-first-message and returns client-final-message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramClientError> {
        // Any failure ends the exchange; so does a call at the wrong time.
        let credentials = match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitingServerFirst { credentials } => credentials,
            _ => return Err(protocol("server-first-message out of order")),
        };
        let msg = as_utf8(msg)?;
        let first = parse_server_first(msg)?;
        if !first.nonce.starts_with(&self.client_nonce) || first.nonce.len() == self.client_nonce.len() {
            return Err(protocol("server nonce does not extend ours"));
        }

        let keys = match credentials {
            // A server that asks for more rounds than this would have pgcorral spend
            // seconds to hours of CPU on one login.
            Credentials::Password(_) if first.iterations > MAX_ITERATIONS => {
                return Err(protocol(
                    "the server asks for more SCRAM iterations than pgcorral derives (1000000)",
                ));
            }
            Credentials::Password(password) => {
                ScramKeys::from_password(&password, &first.salt, first.iterations)
            }
            // The server's salt and iteration count do not matter: the keys
            // are already salted. If they were salted differently, the
            // server refuses the proof.
            Credentials::Keys(keys) => keys,
        };

        let final_without_proof = format!("c={CBIND_NONE},r={}", first.nonce);
        let bare = &self.client_first[3..]; // after "n,,"
        let auth_message = format!("{bare},{msg},{final_without_proof}");

        let stored_key = Sha256::digest(keys.client_key);
        let client_signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let mut proof = keys.client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        self.state = State::AwaitingServerFinal {
            server_signature: hmac_sha256(&keys.server_key, auth_message.as_bytes()),
        };
        Ok(format!("{final_without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Consumes server-final-message and checks the server's signature.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), ScramClientError> {
        let expected = match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitingServerFinal { server_signature } => server_signature,
            _ => return Err(protocol("server-final-message out of order")),
        };
        let msg = as_utf8(msg)?;
        let mut attrs = msg.split(',');
        let first = attrs.next().unwrap_or_default();
        if let Some(error) = first.strip_prefix("e=") {
            return Err(ScramClientError::ServerError(error.to_owned()));
        }
        let signature = first.strip_prefix("v=").ok_or(ScramClientError::MissingServerSignature)?;
        check_extensions(attrs)?;
        let signature =
            STANDARD.decode(signature).map_err(|_| protocol("server signature is not valid base64"))?;
        if !constant_time_eq(&signature, &expected) {
            return Err(ScramClientError::WrongServerSignature);
        }
        Ok(())
    }
}

struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    iterations: u32,
}

fn parse_server_first(msg: &str) -> Result<ServerFirst<'_>, ScramClientError> {
    let mut attrs = msg.split(',');
    let nonce = attrs.next().unwrap_or_default();
    if nonce.starts_with("m=") {
        return Err(protocol("mandatory SCRAM extensions are not supported"));
    }
    let nonce = nonce.strip_prefix("r=").ok_or_else(|| protocol("server-first-message has no nonce"))?;
    if !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(protocol("server nonce is not printable"));
    }
    let salt = attrs
        .next()
        .and_then(|a| a.strip_prefix("s="))
        .ok_or_else(|| protocol("server-first-message has no salt"))?;
    let salt = STANDARD
        .decode(salt)
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| protocol("salt is empty or not valid base64"))?;
    let iterations = attrs
        .next()
        .and_then(|a| a.strip_prefix("i="))
        .ok_or_else(|| protocol("server-first-message has no iteration count"))?;
    let iterations = Some(iterations)
        .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|i| i.parse::<u32>().ok())
        .filter(|&i| i > 0)
        .ok_or_else(|| protocol("iteration count is not a positive integer"))?;
    check_extensions(attrs)?;
    Ok(ServerFirst { nonce, salt, iterations })
}

/// Optional extensions are ignored but must look like attributes.
fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), ScramClientError> {
    for a in attrs {
        let b = a.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_alphabetic() || b[1] != b'=' {
            return Err(protocol("malformed SCRAM attribute"));
        }
    }
    Ok(())
}

fn random_nonce() -> String {
    let mut raw = [0u8; CLIENT_NONCE_BYTES];
    rand::fill(&mut raw);
    // Base64 is printable and has no ',', as the nonce grammar requires.
    STANDARD.encode(raw)
}

fn protocol(what: &str) -> ScramClientError {
    ScramClientError::Protocol(what.to_owned())
}

fn as_utf8(msg: &[u8]) -> Result<&str, ScramClientError> {
    std::str::from_utf8(msg).map_err(|_| protocol("SCRAM message is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::super::scram::ScramServer;
    use super::super::secret::Secret;
    use super::*;

    // From a PostgreSQL 15 server: CREATE ROLE scramuser LOGIN PASSWORD 'pencil'.
    const PG_SECRET: &str = "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=";

    fn pg_secret() -> ScramSecret {
        match Secret::parse(PG_SECRET) {
            Secret::Scram(s) => s,
            other => panic!("not a SCRAM secret: {other:?}"),
        }
    }

    /// Runs a whole exchange between our client and our server.
    fn exchange(server: &mut ScramServer, client: &mut ScramClient) -> Result<(), String> {
        let server_first = server.client_first(client.client_first()).map_err(|e| e.to_string())?;
        let client_final = client.server_first(&server_first).map_err(|e| e.to_string())?;
        let server_final = server.client_final(&client_final).map_err(|e| e.to_string())?;
        client.server_final(&server_final).map_err(|e| e.to_string())
    }

    #[test]
    fn rfc7677_example_exchange() {
        let mut client =
            ScramClient::start(Credentials::Password("pencil".into()), "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(client.client_first(), b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        // The RFC names the user "user" where PostgreSQL clients send an
        // empty name; use its name so that its proof comes out.
        client.client_first = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let last = client
            .server_first(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            )
            .unwrap();
        assert_eq!(
            last,
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        client.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
    }

    #[test]
    fn password_and_keys_against_postgres_verifier() {
        let secret = pg_secret();
        let mut client = ScramClient::with_password("pencil");
        exchange(&mut ScramServer::new(secret.clone()), &mut client).unwrap();

        let keys = ScramKeys::from_password("pencil", &secret.salt, secret.iterations);
        assert!(keys.matches_secret(&secret));
        let mut client = ScramClient::with_keys(&keys);
        exchange(&mut ScramServer::new(secret.clone()), &mut client).unwrap();
    }

    #[test]
    fn keys_recovered_by_our_server_log_in_again() {
        let secret = pg_secret();
        let mut server = ScramServer::new(secret.clone());
        exchange(&mut server, &mut ScramClient::with_password("pencil")).unwrap();
        let keys = server.pass_through_keys().unwrap();
        exchange(&mut ScramServer::new(secret), &mut ScramClient::with_keys(&keys)).unwrap();
    }

    #[test]
    fn wrong_password_or_keys_are_refused_by_the_server() {
        let secret = pg_secret();
        let e = exchange(&mut ScramServer::new(secret.clone()), &mut ScramClient::with_password("Pencil"));
        assert_eq!(e, Err("password authentication failed".into()));

        // Keys for the right password but another salt: the verifier differs.
        let keys = ScramKeys::from_password("pencil", b"other salt", secret.iterations);
        assert!(!keys.matches_secret(&secret));
        let e = exchange(&mut ScramServer::new(secret), &mut ScramClient::with_keys(&keys));
        assert_eq!(e, Err("password authentication failed".into()));
    }

    /// A client past server-first, talking to a server whose ServerKey is
    /// `server_secret`'s.
    fn client_awaiting_final(server_secret: ScramSecret) -> (ScramClient, Vec<u8>) {
        let mut client = ScramClient::with_password("pencil");
        let mut server = ScramServer::new(server_secret);
        let server_first = server.client_first(client.client_first()).unwrap();
        let client_final = client.server_first(&server_first).unwrap();
        (client, client_final)
    }

    #[test]
    fn server_signature_must_be_present_and_right() {
        let secret = pg_secret();
        // A server that knows StoredKey but not ServerKey (say, a stolen
        // half of the verifier) cannot sign.
        let mut impostor = secret.clone();
        impostor.server_key = [0; 32];
        let mut server = ScramServer::new(impostor);
        let mut client = ScramClient::with_password("pencil");
        let first = server.client_first(client.client_first()).unwrap();
        let last = client.server_first(&first).unwrap();
        let server_final = server.client_final(&last).unwrap();
        assert_eq!(client.server_final(&server_final), Err(ScramClientError::WrongServerSignature));

        let (mut client, _) = client_awaiting_final(secret.clone());
        let wrong = format!("v={}", STANDARD.encode([1u8; 32]));
        assert_eq!(client.server_final(wrong.as_bytes()), Err(ScramClientError::WrongServerSignature));

        for missing in ["", "x=1", "v"] {
            let (mut client, _) = client_awaiting_final(secret.clone());
            assert_eq!(
                client.server_final(missing.as_bytes()),
                Err(ScramClientError::MissingServerSignature),
                "{missing:?}"
            );
        }
        let (mut client, _) = client_awaiting_final(secret.clone());
        assert!(matches!(client.server_final(b"v=!!!"), Err(ScramClientError::Protocol(_))));
        let (mut client, _) = client_awaiting_final(secret);
        assert_eq!(
            client.server_final(b"e=invalid-proof"),
            Err(ScramClientError::ServerError("invalid-proof".into()))
        );
    }

    #[test]
    fn malformed_server_first_is_rejected() {
        let nonce = "abc";
        for first in [
            "",
            "r=abcXYZ",
            "r=abcXYZ,s=c2FsdA==",
            "m=ext,r=abcXYZ,s=c2FsdA==,i=1",
            "s=c2FsdA==,r=abcXYZ,i=1",
            // Nonce not extending ours, or not extending it at all.
            "r=abXYZ,s=c2FsdA==,i=1",
            "r=abc,s=c2FsdA==,i=1",
            "r=abcX\u{7f},s=c2FsdA==,i=1",
            "r=abcXYZ,s=,i=1",
            "r=abcXYZ,s=!!,i=1",
            "r=abcXYZ,s=c2FsdA==,i=0",
            "r=abcXYZ,s=c2FsdA==,i=-1",
            "r=abcXYZ,s=c2FsdA==,i=+1",
            "r=abcXYZ,s=c2FsdA==,i=99999999999",
            "r=abcXYZ,s=c2FsdA==,i=1,garbage",
        ] {
            let mut client = ScramClient::start(Credentials::Password("pw".into()), nonce.into());
            assert!(
                matches!(client.server_first(first.as_bytes()), Err(ScramClientError::Protocol(_))),
                "{first:?}"
            );
        }
        let mut client = ScramClient::start(Credentials::Password("pw".into()), nonce.into());
        assert!(client.server_first(b"r=abcXYZ,s=c2FsdA==,i=1,x=ext").is_ok());
        let mut client = ScramClient::start(Credentials::Password("pw".into()), nonce.into());
        assert!(matches!(client.server_first(b"r=abcXYZ\xff"), Err(ScramClientError::Protocol(_))));
    }

    #[test]
    fn steps_out_of_order_are_rejected() {
        let mut client = ScramClient::with_password("pw");
        assert!(matches!(client.server_final(b"v=AAAA"), Err(ScramClientError::Protocol(_))));

        let (mut client, _) = client_awaiting_final(pg_secret());
        assert!(matches!(client.server_first(b"r=x,s=c2FsdA==,i=1"), Err(ScramClientError::Protocol(_))));
        // The failed repeat ended the exchange.
        assert!(matches!(client.server_final(b"v=AAAA"), Err(ScramClientError::Protocol(_))));
    }

    #[test]
    fn client_nonces_differ() {
        assert_ne!(
            ScramClient::with_password("pw").client_first(),
            ScramClient::with_password("pw").client_first()
        );
    }

    #[test]
    fn keys_from_a_password_match_its_verifier() {
        // Keys and verifiers come from the same Hi(), or keys would not match
        // verifiers.
        let keys = ScramKeys::from_password("s3cr3t", b"salt", 17);
        assert!(keys.matches_secret(&ScramSecret::from_password("s3cr3t", b"salt", 17)));
    }

    #[test]
    fn debug_hides_keys() {
        let keys = ScramKeys { client_key: [0xab; 32], server_key: [0xcd; 32] };
        let shown = format!("{keys:?}");
        assert!(!shown.contains("171") && !shown.contains("205") && !shown.contains("ab"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
