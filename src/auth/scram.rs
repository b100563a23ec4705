//! SCRAM-SHA-256 server side (RFC 5802, RFC 7677), as PostgreSQL speaks it,
//! for clients logging in to pgcorral; plus the plaintext check used by
//! `auth_type = plain`.
//!
//! Differences from the RFCs that PostgreSQL has and that clients rely on:
//! the user name inside the SCRAM exchange is ignored (libpq sends `n=`),
//! because the user was already named in the StartupMessage; and passwords
//! are salted as raw bytes when SASLprep does not apply (see
//! [`ScramSecret::from_password`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::constant_time_eq;
use super::error::AuthError;
use super::md5::md5_secret;
use super::secret::{hmac_sha256, ScramSecret, Secret};

/// The only SASL mechanism pgcorral offers to clients, as it appears in
/// AuthenticationSASL and SASLInitialResponse.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

const SERVER_NONCE_BYTES: usize = 18;
const PLAIN_SALT_BYTES: usize = 16;
const PLAIN_ITERATIONS: u32 = 4096;

/// One SCRAM-SHA-256 exchange with one client. Drive it with
/// [`client_first`](Self::client_first) on the SASLInitialResponse data and
/// [`client_final`](Self::client_final) on the SASLResponse data; each step
/// may be called once, in that order.
pub struct ScramServer {
    secret: ScramSecret,
    server_nonce: String,
    state: State,
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal {
        /// Everything up to and including the second comma; the client must
        /// echo it back in `c=` so a downgrade of the binding flag is seen.
        gs2_header: String,
        /// The full nonce, client part followed by ours.
        nonce: String,
        /// client-first-message-bare "," server-first-message "," — the
        /// start of the AuthMessage both sides sign.
        auth_message_prefix: String,
    },
    Done,
}

impl ScramServer {
    /// Starts an exchange that verifies the client against a stored verifier.
    pub fn new(secret: ScramSecret) -> ScramServer {
        let mut raw = [0u8; SERVER_NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut raw);
        // Base64 has no ',' and is printable, as the nonce grammar requires.
        ScramServer::with_server_nonce(secret, STANDARD.encode(raw))
    }

    /// Starts an exchange for a user whose password pgcorral knows in
    /// plaintext. The verifier (random salt, 4096 rounds) is derived once per
    /// password and process: deriving it at every login made a SCRAM login
    /// ten times dearer than an md5 one.
    pub fn for_plain_password(password: &str) -> ScramServer {
        ScramServer::new(plain_verifier(password))
    }

    fn with_server_nonce(secret: ScramSecret, server_nonce: String) -> ScramServer {
        ScramServer { secret, server_nonce, state: State::AwaitingClientFirst }
    }

    /// Checks the mechanism named in the client's SASLInitialResponse.
    /// `SCRAM-SHA-256-PLUS` is refused because it is never offered.
    pub fn check_mechanism(mechanism: &str) -> Result<(), AuthError> {
        if mechanism == SCRAM_SHA_256 {
            Ok(())
        } else {
            Err(AuthError::UnsupportedMechanism(mechanism.to_owned()))
        }
    }

    /// Consumes client-first-message and returns server-first-message.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        // Any failure, including this call coming at the wrong time, ends
        // the exchange: a client gets no second try within one attempt.
        let state = std::mem::replace(&mut self.state, State::Done);
        if !matches!(state, State::AwaitingClientFirst) {
            return Err(protocol("client-first-message out of order"));
        }

        let msg = as_utf8(msg)?;
        let (gs2_header, bare) = split_gs2_header(msg)?;
        let client_nonce = parse_client_first_bare(bare)?;

        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first =
            format!("r={nonce},s={},i={}", STANDARD.encode(&self.secret.salt), self.secret.iterations);
        self.state = State::AwaitingClientFinal {
            gs2_header: gs2_header.to_owned(),
            nonce,
            auth_message_prefix: format!("{bare},{server_first},"),
        };
        Ok(server_first.into_bytes())
    }

    /// Consumes client-final-message, checks the proof and returns
    /// server-final-message, which lets the client check pgcorral in turn.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let (gs2_header, nonce, auth_message_prefix) = match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitingClientFinal { gs2_header, nonce, auth_message_prefix } => {
                (gs2_header, nonce, auth_message_prefix)
            }
            State::AwaitingClientFirst => {
                return Err(protocol("client-final-message before client-first-message"))
            }
            State::Done => return Err(protocol("SCRAM exchange already finished")),
        };

        let msg = as_utf8(msg)?;
        // The proof is by definition the last attribute and is not itself
        // signed, so everything before it is what goes into AuthMessage.
        let (without_proof, proof) =
            msg.rsplit_once(",p=").ok_or_else(|| protocol("client-final-message has no proof"))?;
        let mut attrs = without_proof.split(',');

        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or_else(|| protocol("client-final-message does not start with c="))?;
        let cbind =
            STANDARD.decode(cbind).map_err(|_| protocol("channel binding attribute is not valid base64"))?;
        // Without channel binding, cbind-input is the GS2 header alone.
        if cbind != gs2_header.as_bytes() {
            return Err(protocol("channel binding attribute does not match the GS2 header"));
        }

        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or_else(|| protocol("client-final-message has no nonce"))?;
        if client_nonce != nonce {
            return Err(protocol("nonce does not match"));
        }
        check_extensions(attrs)?;

        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| protocol("client proof is malformed"))?;

        let auth_message = format!("{auth_message_prefix}{without_proof}");
        let client_signature = hmac_sha256(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let derived_stored_key = Sha256::digest(client_key);
        if !constant_time_eq(&derived_stored_key, &self.secret.stored_key) {
            return Err(AuthError::WrongPassword);
        }

        let server_signature = hmac_sha256(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// The cached verifier for a plaintext password. The cache is bounded: a flood of
/// distinct passwords only empties it.
fn plain_verifier(password: &str) -> ScramSecret {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    const MAX_CACHED: usize = 10_000;
    static CACHE: OnceLock<Mutex<HashMap<String, ScramSecret>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(secret) = cache.lock().unwrap().get(password) {
        return secret.clone();
    }
    let mut salt = [0u8; PLAIN_SALT_BYTES];
    rand::thread_rng().fill_bytes(&mut salt);
    let secret = ScramSecret::from_password(password, &salt, PLAIN_ITERATIONS);
    let mut cache = cache.lock().unwrap();
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(password.to_owned(), secret.clone());
    secret
}

/// Checks a password a client sent in cleartext against a stored secret,
/// whatever its kind. Comparisons do not stop at the first differing byte.
pub fn verify_plaintext(secret: &Secret, user: &str, password: &str) -> bool {
    match secret {
        Secret::Plain(stored) => constant_time_eq(stored.as_bytes(), password.as_bytes()),
        Secret::Md5(stored) => constant_time_eq(stored.as_bytes(), md5_secret(user, password).as_bytes()),
        Secret::Scram(stored) => {
            let derived = ScramSecret::from_password(password, &stored.salt, stored.iterations);
            // Both keys, evaluated without short-circuit, so the timing does
            // not tell which one matched.
            let stored_ok = constant_time_eq(&derived.stored_key, &stored.stored_key);
            let server_ok = constant_time_eq(&derived.server_key, &stored.server_key);
            stored_ok & server_ok
        }
    }
}

fn protocol(what: &str) -> AuthError {
    AuthError::Protocol(what.to_owned())
}

fn as_utf8(msg: &[u8]) -> Result<&str, AuthError> {
    std::str::from_utf8(msg).map_err(|_| protocol("SCRAM message is not valid UTF-8"))
}

/// Splits client-first-message into the GS2 header (with its trailing comma)
/// and client-first-message-bare.
fn split_gs2_header(msg: &str) -> Result<(&str, &str), AuthError> {
    let (flag, rest) =
        msg.split_once(',').ok_or_else(|| protocol("client-first-message has no GS2 header"))?;
    match flag {
        // "n": the client does not do channel binding. "y": it does but
        // thinks we do not, which is true: pgcorral never offers -PLUS.
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(AuthError::ChannelBindingUnsupported),
        _ => return Err(protocol("unknown channel binding flag")),
    }
    let (authzid, bare) =
        rest.split_once(',').ok_or_else(|| protocol("client-first-message has an incomplete GS2 header"))?;
    if !authzid.is_empty() {
        // PostgreSQL has no notion of logging in as one role on behalf of
        // another through SCRAM, so refuse rather than silently ignore it.
        return Err(protocol("authorization identity is not supported"));
    }
    let header_len = flag.len() + 1 + authzid.len() + 1;
    Ok((&msg[..header_len], bare))
}

/// Returns the client nonce from client-first-message-bare.
fn parse_client_first_bare(bare: &str) -> Result<&str, AuthError> {
    let mut attrs = bare.split(',');
    let user = attrs.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(protocol("mandatory SCRAM extensions are not supported"));
    }
    // The user name is ignored: the StartupMessage already named the role.
    if !user.starts_with("n=") {
        return Err(protocol("client-first-message has no user name attribute"));
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or_else(|| protocol("client-first-message has no nonce"))?;
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
        return Err(protocol("client nonce is empty or not printable"));
    }
    check_extensions(attrs)?;
    Ok(nonce)
}

/// Optional extensions may follow; they are ignored, but must at least look
/// like attributes so garbage is not accepted as part of a signed message.
fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), AuthError> {
    for a in attrs {
        let b = a.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_alphabetic() || b[1] != b'=' {
            return Err(protocol("malformed SCRAM attribute"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    // From a PostgreSQL 15 server: CREATE ROLE scramuser LOGIN PASSWORD 'pencil'.
    const PG_SECRET: &str = "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=";

    fn pg_secret() -> ScramSecret {
        match Secret::parse(PG_SECRET) {
            Secret::Scram(s) => s,
            other => panic!("not a SCRAM secret: {other:?}"),
        }
    }

    /// Runs a whole exchange with postgres-protocol's client, which is what
    /// rust-postgres users will talk to pgcorral with.
    fn exchange(server: &mut ScramServer, password: &str, cb: ChannelBinding) -> Result<(), AuthError> {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let server_first = server.client_first(client.message())?;
        client.update(&server_first).expect("client accepts server-first");
        let server_final = server.client_final(client.message())?;
        client.finish(&server_final).expect("client accepts our server signature");
        Ok(())
    }

    #[test]
    fn postgres_secret_accepts_right_password_with_either_gs2_flag() {
        // unrequested() sends "y,,", unsupported() sends "n,,".
        for cb in [ChannelBinding::unrequested(), ChannelBinding::unsupported()] {
            let mut server = ScramServer::new(pg_secret());
            exchange(&mut server, "pencil", cb).unwrap();
        }
    }

    #[test]
    fn postgres_secret_rejects_wrong_password() {
        let mut server = ScramServer::new(pg_secret());
        assert_eq!(
            exchange(&mut server, "pencil2", ChannelBinding::unsupported()),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn plain_password_server() {
        for cb in [ChannelBinding::unrequested(), ChannelBinding::unsupported()] {
            let mut server = ScramServer::for_plain_password("s3cr3t");
            exchange(&mut server, "s3cr3t", cb).unwrap();
        }
        let mut server = ScramServer::for_plain_password("s3cr3t");
        assert_eq!(
            exchange(&mut server, "S3cr3t", ChannelBinding::unrequested()),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn channel_binding_is_refused() {
        let mut server = ScramServer::for_plain_password("pw");
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1, 2, 3]));
        assert!(client.message().starts_with(b"p=tls-server-end-point,,"));
        assert_eq!(server.client_first(client.message()), Err(AuthError::ChannelBindingUnsupported));
    }

    #[test]
    fn rfc7677_example_exchange() {
        let secret =
            ScramSecret::from_password("pencil", &STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(), 4096);
        let mut server = ScramServer::with_server_nonce(secret, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        let first = server.client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(
            first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let last = server
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(last, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    fn server_after_first(first: &str) -> ScramServer {
        let mut server =
            ScramServer::with_server_nonce(ScramSecret::from_password("pw", b"salt", 1), "SERVER".into());
        server.client_first(first.as_bytes()).unwrap();
        server
    }

    #[test]
    fn tampered_client_final_is_a_protocol_error() {
        let proof = STANDARD.encode([0u8; 32]);
        for (first, last) in [
            // Client said "y" first, then claims "n": a downgrade.
            ("y,,n=,r=abc", format!("c=biws,r=abcSERVER,p={proof}")),
            // Nonce changed.
            ("n,,n=,r=abc", format!("c=biws,r=abcSERVEX,p={proof}")),
            // Nonce missing.
            ("n,,n=,r=abc", format!("c=biws,p={proof}")),
            // No proof.
            ("n,,n=,r=abc", "c=biws,r=abcSERVER".to_owned()),
            // Proof of the wrong length.
            ("n,,n=,r=abc", "c=biws,r=abcSERVER,p=AAAA".to_owned()),
            // c= not base64.
            ("n,,n=,r=abc", format!("c=b!ws,r=abcSERVER,p={proof}")),
        ] {
            let mut server = server_after_first(first);
            assert!(
                matches!(server.client_final(last.as_bytes()), Err(AuthError::Protocol(_))),
                "{first} / {last}"
            );
        }
    }

    #[test]
    fn wrong_proof_is_wrong_password() {
        let mut server = server_after_first("n,,n=,r=abc");
        let last = format!("c=biws,r=abcSERVER,p={}", STANDARD.encode([7u8; 32]));
        assert_eq!(server.client_final(last.as_bytes()), Err(AuthError::WrongPassword));
    }

    #[test]
    fn user_name_is_ignored_and_extensions_tolerated() {
        for first in ["n,,n=,r=abc", "n,,n=someone,r=abc", "n,,n=,r=abc,x=ext"] {
            server_after_first(first);
        }
    }

    #[test]
    fn malformed_client_first_is_rejected() {
        for first in [
            "",
            "n",
            "n,",
            "x,,n=,r=abc",
            "n,a=other,n=,r=abc",
            "n,,m=ext,n=,r=abc",
            "n,,r=abc",
            "n,,n=",
            "n,,n=,r=",
            "n,,n=,r=a\u{7f}c",
            "n,,n=,r=abc,garbage",
        ] {
            let mut server = ScramServer::for_plain_password("pw");
            assert!(
                matches!(server.client_first(first.as_bytes()), Err(AuthError::Protocol(_))),
                "{first:?}"
            );
        }
        let mut server = ScramServer::for_plain_password("pw");
        assert!(matches!(server.client_first(b"n,,n=,r=\xff"), Err(AuthError::Protocol(_))));
    }

    #[test]
    fn steps_out_of_order_are_rejected() {
        let mut server = ScramServer::for_plain_password("pw");
        assert!(matches!(server.client_final(b"c=biws,r=x,p=AAAA"), Err(AuthError::Protocol(_))));

        let mut server = ScramServer::for_plain_password("pw");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let first = server.client_first(client.message()).unwrap();
        assert!(matches!(server.client_first(client.message()), Err(AuthError::Protocol(_))));
        // The failed repeat ended the exchange.
        client.update(&first).unwrap();
        assert!(matches!(server.client_final(client.message()), Err(AuthError::Protocol(_))));
    }

    #[test]
    fn finished_exchange_cannot_be_replayed() {
        let mut server = ScramServer::for_plain_password("pw");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        server.client_final(client.message()).unwrap();
        assert!(matches!(server.client_final(client.message()), Err(AuthError::Protocol(_))));
    }

    #[test]
    fn mechanism_check() {
        assert!(ScramServer::check_mechanism("SCRAM-SHA-256").is_ok());
        assert_eq!(
            ScramServer::check_mechanism("SCRAM-SHA-256-PLUS"),
            Err(AuthError::UnsupportedMechanism("SCRAM-SHA-256-PLUS".into()))
        );
    }

    #[test]
    fn server_nonces_differ() {
        let mut a = ScramServer::for_plain_password("pw");
        let mut b = ScramServer::for_plain_password("pw");
        let fa = a.client_first(b"n,,n=,r=abc").unwrap();
        let fb = b.client_first(b"n,,n=,r=abc").unwrap();
        assert_ne!(fa, fb);
    }

    #[test]
    fn plaintext_against_every_secret_kind() {
        let secrets = [
            Secret::Plain("pencil".into()),
            Secret::Md5(md5_secret("scramuser", "pencil")),
            Secret::parse(PG_SECRET),
        ];
        for secret in &secrets {
            assert!(verify_plaintext(secret, "scramuser", "pencil"), "{secret:?}");
            assert!(!verify_plaintext(secret, "scramuser", "Pencil"), "{secret:?}");
            assert!(!verify_plaintext(secret, "scramuser", ""), "{secret:?}");
        }
        // md5 secrets are bound to the user name.
        assert!(!verify_plaintext(&secrets[1], "other", "pencil"));
    }
}
