//! SCRAM-SHA-256 server side (RFC 5802, RFC 7677), as PostgreSQL speaks it,
//! for clients logging in to pgcorral; plus the plaintext check used by
//! `auth_type = plain`.
//!
//! Differences from the RFCs that PostgreSQL has and that clients rely on:
//! the user name inside the SCRAM exchange is ignored (libpq sends `n=`),
//! because the user was already named in the StartupMessage; and passwords
//! are salted as raw bytes when SASLprep does not apply (see
//! [`ScramSecret::from_password`]).
//!
//! Two additions beyond plain verification:
//!
//! * channel binding (`SCRAM-SHA-256-PLUS` with `tls-server-end-point`,
//!   RFC 5929) for clients connected over TLS, with PostgreSQL's rules for
//!   which GS2 flag goes with which mechanism;
//! * pass-through keys: a successful exchange reveals the client's
//!   ClientKey, which together with the verifier's ServerKey lets pgcorral
//!   log in to a server holding the same verifier without ever learning the
//!   password (see [`ScramKeys`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::constant_time_eq;
use super::error::AuthError;
use super::md5::md5_secret;
use super::scram_client::ScramKeys;
use super::secret::{hmac_sha256, ScramSecret, Secret};

/// The SASL mechanism pgcorral always offers to clients, as it appears in
/// AuthenticationSASL and SASLInitialResponse.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// SCRAM-SHA-256 with channel binding, offered (first) only when the client
/// is connected over TLS and the channel binding data is known.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The only channel binding type PostgreSQL supports, and so pgcorral.
const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

const SERVER_NONCE_BYTES: usize = 18;
const PLAIN_SALT_BYTES: usize = 16;
const PLAIN_ITERATIONS: u32 = 4096;

/// One SCRAM-SHA-256 exchange with one client. Drive it with
/// [`client_first`](Self::client_first) on the SASLInitialResponse data and
/// [`client_final`](Self::client_final) on the SASLResponse data; each step
/// may be called once, in that order.
///
/// Over TLS, attach the channel binding data with
/// [`with_channel_binding`](Self::with_channel_binding), offer
/// [`mechanisms`](Self::mechanisms) and check the client's pick with
/// [`select_mechanism`](Self::select_mechanism) before `client_first`.
pub struct ScramServer {
    secret: ScramSecret,
    server_nonce: String,
    state: State,
    /// tls-server-end-point data: the hash of pgcorral's certificate.
    channel_binding: Option<Vec<u8>>,
    /// Whether the client picked SCRAM-SHA-256-PLUS.
    plus: bool,
    /// Recovered from the proof once it has been verified.
    client_key: Option<[u8; 32]>,
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
        rand::fill(&mut raw);
        // Base64 has no ',' and is printable, as the nonce grammar requires.
        ScramServer::with_server_nonce(secret, STANDARD.encode(raw))
    }

    /// Starts an exchange for a user whose password pgcorral knows in
    /// plaintext. The verifier (random salt, 4096 rounds) is derived once per
    /// user, password and process: deriving it at every login made a SCRAM login
    /// ten times dearer than an md5 one.
    pub fn for_plain_password(password: &str) -> ScramServer {
        ScramServer::for_plain_password_with("", password, PLAIN_ITERATIONS)
    }

    /// As [`for_plain_password`](Self::for_plain_password) for `user` with `scram_iterations`
    /// rounds. The salt is the user's own: two users with one password meet different salts,
    /// so the exchange does not tell that they share it.
    pub fn for_plain_password_with(user: &str, password: &str, iterations: u32) -> ScramServer {
        ScramServer::new(plain_verifier(user, password, iterations.max(1)))
    }

    /// As [`for_plain_password_with`](Self::for_plain_password_with) if the verifier is
    /// already derived: what a worker thread may do, the derivation itself being costly.
    pub fn cached_for_plain_password(user: &str, password: &str, iterations: u32) -> Option<ScramServer> {
        cached_plain_verifier(user, password, iterations.max(1)).map(ScramServer::new)
    }

    /// With a chosen server nonce instead of a random one: for tests and the fuzz harness,
    /// which need a reproducible exchange.
    pub(crate) fn with_server_nonce(secret: ScramSecret, server_nonce: String) -> ScramServer {
        ScramServer {
            secret,
            server_nonce,
            state: State::AwaitingClientFirst,
            channel_binding: None,
            plus: false,
            client_key: None,
        }
    }

    /// Sets the `tls-server-end-point` channel binding data (the hash of the
    /// certificate pgcorral presented on this connection, RFC 5929), which
    /// makes SCRAM-SHA-256-PLUS available. `None`, or empty data, means the
    /// connection cannot bind: it is not TLS, or the certificate's hash
    /// algorithm is unknown.
    pub fn with_channel_binding(mut self, data: Option<Vec<u8>>) -> ScramServer {
        self.channel_binding = data.filter(|d| !d.is_empty());
        self
    }

    /// The mechanisms to offer in AuthenticationSASL, most preferred first,
    /// as PostgreSQL lists them.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.channel_binding.is_some() {
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            &[SCRAM_SHA_256]
        }
    }

    /// Checks the mechanism named in the client's SASLInitialResponse and
    /// remembers it: the GS2 flag in client-first-message must agree with
    /// it. SCRAM-SHA-256-PLUS is accepted only with channel binding data.
    /// Not calling this is the same as selecting SCRAM-SHA-256.
    pub fn select_mechanism(&mut self, mechanism: &str) -> Result<(), AuthError> {
        if !matches!(self.state, State::AwaitingClientFirst) {
            self.state = State::Done;
            return Err(protocol("SASL mechanism selected after client-first-message"));
        }
        self.plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if self.channel_binding.is_some() => true,
            _ => return Err(AuthError::UnsupportedMechanism(mechanism.to_owned())),
        };
        Ok(())
    }

    /// Checks the mechanism named in the client's SASLInitialResponse, for
    /// an exchange without channel binding: `SCRAM-SHA-256-PLUS` is refused
    /// because it cannot have been offered.
    pub fn check_mechanism(mechanism: &str) -> Result<(), AuthError> {
        if mechanism == SCRAM_SHA_256 {
            Ok(())
        } else {
            Err(AuthError::UnsupportedMechanism(mechanism.to_owned()))
        }
    }

    /// The client's ClientKey, once [`client_final`](Self::client_final)
    /// has verified its proof; `None` before that or if it failed.
    ///
    /// ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage) (RFC 5802
    /// section 3): the proof hides it only from those who lack StoredKey.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }

    /// The keys with which pgcorral can log in to a server that holds the
    /// same verifier, on behalf of the client that just logged in; `None`
    /// until the client's proof has been verified.
    pub fn pass_through_keys(&self) -> Option<ScramKeys> {
        self.client_key.map(|client_key| ScramKeys { client_key, server_key: self.secret.server_key })
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
        let (gs2_header, bare) = split_gs2_header(msg, self.plus, self.channel_binding.is_some())?;
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
        // cbind-input is the GS2 header followed by the binding data; the
        // client echoing the header also shows that nobody rewrote its flag.
        match (&self.channel_binding, self.plus) {
            (Some(data), true) => {
                let expected = [gs2_header.as_bytes(), data].concat();
                if !constant_time_eq(&cbind, &expected) {
                    return Err(AuthError::ChannelBindingMismatch);
                }
            }
            _ => {
                if cbind != gs2_header.as_bytes() {
                    return Err(protocol(
                        "unexpected SCRAM channel-binding attribute in client-final-message",
                    ));
                }
            }
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

        self.client_key = Some(client_key);
        let server_signature = hmac_sha256(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// Verifiers derived for plaintext passwords, by (user, password). The cache is bounded: a
/// flood of distinct passwords only empties it.
type PlainVerifiers = parking_lot::Mutex<std::collections::HashMap<(String, String), ScramSecret>>;

fn plain_verifiers() -> &'static PlainVerifiers {
    static CACHE: std::sync::OnceLock<PlainVerifiers> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn cached_plain_verifier(user: &str, password: &str, iterations: u32) -> Option<ScramSecret> {
    let key = (user.to_owned(), password.to_owned());
    // A reload that changes scram_iterations makes the cached verifier stale.
    plain_verifiers().lock().get(&key).filter(|s| s.iterations == iterations).cloned()
}

fn plain_verifier(user: &str, password: &str, iterations: u32) -> ScramSecret {
    const MAX_CACHED: usize = 10_000;
    if let Some(secret) = cached_plain_verifier(user, password, iterations) {
        return secret;
    }
    let mut salt = [0u8; PLAIN_SALT_BYTES];
    rand::fill(&mut salt);
    let secret = ScramSecret::from_password(password, &salt, iterations);
    let mut cache = plain_verifiers().lock();
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert((user.to_owned(), password.to_owned()), secret.clone());
    secret
}

/// Checks a password a client sent in cleartext against a stored secret,
/// whatever its kind. Comparisons do not stop at the first differing byte.
pub fn verify_plaintext(secret: &Secret, user: &str, password: &str) -> bool {
    match secret {
        Secret::Plain(stored) => constant_time_eq(stored.as_bytes(), password.as_bytes()),
        Secret::Md5(stored) => constant_time_eq(stored.as_bytes(), md5_secret(user, password).as_bytes()),
        // A verifier asking for more rounds than pgcorral derives matches nothing: checking
        // it would cost seconds to hours of CPU per attempt.
        Secret::Scram(stored) if stored.iterations > super::kdf::MAX_ITERATIONS => false,
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

const PLUS_WITHOUT_BINDING: &str =
    "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data";

/// Splits client-first-message into the GS2 header (with its trailing comma)
/// and client-first-message-bare, checking the channel binding flag against
/// the mechanism the client picked (`plus`) and whether we could bind.
fn split_gs2_header(msg: &str, plus: bool, can_bind: bool) -> Result<(&str, &str), AuthError> {
    let (flag, rest) =
        msg.split_once(',').ok_or_else(|| protocol("client-first-message has no GS2 header"))?;
    match flag {
        // The client does not bind, or chose not to: fine with plain SCRAM.
        "n" if !plus => {}
        // The client can bind but thinks we cannot. If we can, we offered
        // -PLUS and someone removed it from the list on the way: a downgrade
        // attack, which the RFC says must fail.
        "y" if !plus => {
            if can_bind {
                return Err(AuthError::ChannelBindingNegotiation);
            }
        }
        "n" | "y" => return Err(protocol(PLUS_WITHOUT_BINDING)),
        f if f.starts_with("p=") => {
            if !plus {
                return Err(protocol(
                    "the client selected SCRAM-SHA-256 without channel binding, \
                     but the SCRAM message includes channel binding data",
                ));
            }
            let cb_type = &f[2..];
            if cb_type != TLS_SERVER_END_POINT {
                return Err(AuthError::UnsupportedChannelBindingType(sanitize(cb_type)));
            }
        }
        _ => return Err(protocol("unexpected channel-binding flag")),
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

/// Makes a client-chosen string fit to be quoted in an error message and a
/// log line: printable ASCII only, and not too long.
fn sanitize(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String =
        s.chars().take(MAX).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    out
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

    #[test]
    fn two_users_with_one_plaintext_password_meet_different_salts() {
        let alice = plain_verifier("alice", "shared", 4096);
        let bob = plain_verifier("bob", "shared", 4096);
        assert!(alice.salt != bob.salt, "the salt would tell that they share a password");
        assert!(plain_verifier("alice", "shared", 4096) == alice, "cached per user");
    }

    #[test]
    fn a_stored_verifier_with_billions_of_iterations_matches_nothing_and_costs_nothing() {
        let mut hostile = ScramSecret::from_password("pw", b"salt", 1);
        hostile.iterations = 4_000_000_000;
        assert!(!verify_plaintext(&Secret::Scram(hostile), "u", "pw"));
    }
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
    fn scram_iterations_shape_the_verifier_of_a_plain_password() {
        let mut server = ScramServer::for_plain_password_with("u", "pw-iter", 5000);
        let first = String::from_utf8(server.client_first(b"n,,n=,r=abc").unwrap()).unwrap();
        assert!(first.ends_with(",i=5000"), "{first}");
        let mut server = ScramServer::for_plain_password_with("u", "pw-iter", 4096);
        let first = String::from_utf8(server.client_first(b"n,,n=,r=abc").unwrap()).unwrap();
        assert!(first.ends_with(",i=4096"), "a changed count is not served from the cache: {first}");
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
    fn channel_binding_is_refused_without_binding_data() {
        let mut server = ScramServer::for_plain_password("pw");
        assert_eq!(server.mechanisms(), [SCRAM_SHA_256]);
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![1, 2, 3]));
        assert!(client.message().starts_with(b"p=tls-server-end-point,,"));
        // PLUS was not offered, so the client cannot have selected it.
        assert_eq!(
            server.select_mechanism(SCRAM_SHA_256_PLUS),
            Err(AuthError::UnsupportedMechanism(SCRAM_SHA_256_PLUS.into()))
        );
        assert!(matches!(server.client_first(client.message()), Err(AuthError::Protocol(_))));
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

    // ---- pass-through keys ----

    #[test]
    fn client_key_is_recovered_from_a_real_exchange() {
        let secret = pg_secret();
        let mut server = ScramServer::new(secret.clone());
        assert_eq!(server.client_key(), None);
        exchange(&mut server, "pencil", ChannelBinding::unsupported()).unwrap();

        // ClientKey = HMAC(SaltedPassword, "Client Key"), which is what
        // ScramKeys::from_password computes; ServerKey as in the verifier.
        let expected = ScramKeys::from_password("pencil", &secret.salt, secret.iterations);
        assert_eq!(server.client_key(), Some(expected.client_key));
        assert_eq!(
            server.pass_through_keys().unwrap().server_key,
            ScramSecret::from_password("pencil", &secret.salt, secret.iterations).server_key
        );
        assert_eq!(server.pass_through_keys(), Some(expected));
        assert!(server.pass_through_keys().unwrap().matches_secret(&secret));
    }

    #[test]
    fn no_client_key_after_a_failed_exchange() {
        let mut server = ScramServer::new(pg_secret());
        assert_eq!(
            exchange(&mut server, "wrong", ChannelBinding::unsupported()),
            Err(AuthError::WrongPassword)
        );
        assert_eq!(server.client_key(), None);
        assert_eq!(server.pass_through_keys(), None);
    }

    // ---- channel binding ----

    const CERT_HASH: [u8; 32] = [0x5a; 32];

    fn binding_server() -> ScramServer {
        ScramServer::with_server_nonce(pg_secret(), "SERVERNONCE".into())
            .with_channel_binding(Some(CERT_HASH.to_vec()))
    }

    /// Plays the client side of an exchange by hand, with the password
    /// "pencil": `gs2_header` is sent in client-first-message and
    /// `cbind_input` in `c=` of client-final-message. Returns the server's
    /// answer to client-final-message and the server signature the client
    /// expects.
    fn hand_exchange(
        server: &mut ScramServer,
        gs2_header: &str,
        cbind_input: &[u8],
    ) -> Result<(Vec<u8>, String), AuthError> {
        let bare = "n=,r=CLIENTNONCE";
        let server_first = server.client_first(format!("{gs2_header}{bare}").as_bytes())?;
        let server_first = String::from_utf8(server_first).unwrap();
        let mut attrs = server_first.split(',');
        let nonce = attrs.next().unwrap().strip_prefix("r=").unwrap();
        assert_eq!(nonce, "CLIENTNONCESERVERNONCE");
        let salt = STANDARD.decode(attrs.next().unwrap().strip_prefix("s=").unwrap()).unwrap();
        let iterations: u32 = attrs.next().unwrap().strip_prefix("i=").unwrap().parse().unwrap();

        let without_proof = format!("c={},r={nonce}", STANDARD.encode(cbind_input));
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let keys = ScramKeys::from_password("pencil", &salt, iterations);
        let stored_key = Sha256::digest(keys.client_key);
        let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys.client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        let last = server.client_final(format!("{without_proof},p={}", STANDARD.encode(proof)).as_bytes())?;
        let expected =
            format!("v={}", STANDARD.encode(hmac_sha256(&keys.server_key, auth_message.as_bytes())));
        Ok((last, expected))
    }

    #[test]
    fn plus_exchange_by_hand() {
        let mut server = binding_server();
        assert_eq!(server.mechanisms(), [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        let header = "p=tls-server-end-point,,";
        let cbind_input = [header.as_bytes(), &CERT_HASH].concat();
        let (last, expected) = hand_exchange(&mut server, header, &cbind_input).unwrap();
        assert_eq!(String::from_utf8(last).unwrap(), expected);
        assert!(server.client_key().is_some());
    }

    #[test]
    fn plus_exchange_with_postgres_protocol_client() {
        let mut server = ScramServer::new(pg_secret()).with_channel_binding(Some(CERT_HASH.to_vec()));
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        exchange(&mut server, "pencil", ChannelBinding::tls_server_end_point(CERT_HASH.to_vec())).unwrap();
        assert!(server.client_key().is_some());
    }

    #[test]
    fn plus_with_other_certificate_fails_the_binding_check() {
        let header = "p=tls-server-end-point,,";
        for cbind_input in
            [[header.as_bytes(), &[0x5b; 32]].concat(), header.as_bytes().to_vec(), b"n,,".to_vec()]
        {
            let mut server = binding_server();
            server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
            assert_eq!(
                hand_exchange(&mut server, header, &cbind_input),
                Err(AuthError::ChannelBindingMismatch)
            );
            assert_eq!(server.client_key(), None);
        }
        // Also with a real client bound to another certificate.
        let mut server = ScramServer::new(pg_secret()).with_channel_binding(Some(CERT_HASH.to_vec()));
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        assert_eq!(
            exchange(&mut server, "pencil", ChannelBinding::tls_server_end_point(vec![0x5b; 32])),
            Err(AuthError::ChannelBindingMismatch)
        );
    }

    #[test]
    fn plus_with_wrong_password_is_wrong_password() {
        let mut server = ScramServer::new(pg_secret()).with_channel_binding(Some(CERT_HASH.to_vec()));
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        assert_eq!(
            exchange(&mut server, "pencil2", ChannelBinding::tls_server_end_point(CERT_HASH.to_vec())),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn plus_requires_the_p_flag() {
        for first in ["n,,n=,r=abc", "y,,n=,r=abc"] {
            let mut server = binding_server();
            server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
            assert!(
                matches!(server.client_first(first.as_bytes()), Err(AuthError::Protocol(ref m)) if m.contains("PLUS")),
                "{first}"
            );
        }
    }

    #[test]
    fn p_flag_requires_plus() {
        // With binding data (PLUS offered but not picked) and without.
        for server in [binding_server(), ScramServer::for_plain_password("pw")] {
            let mut server = server;
            server.select_mechanism(SCRAM_SHA_256).unwrap();
            assert!(matches!(
                server.client_first(b"p=tls-server-end-point,,n=,r=abc"),
                Err(AuthError::Protocol(ref m)) if m.contains("without channel binding")
            ));
        }
    }

    #[test]
    fn only_tls_server_end_point_is_supported() {
        let mut server = binding_server();
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        assert_eq!(
            server.client_first(b"p=tls-unique,,n=,r=abc"),
            Err(AuthError::UnsupportedChannelBindingType("tls-unique".into()))
        );
        // What the client named is quoted, but tamed.
        let mut server = binding_server();
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        let long = format!("p=\u{1b}[31m{},,n=,r=abc", "x".repeat(100));
        let Err(AuthError::UnsupportedChannelBindingType(shown)) = server.client_first(long.as_bytes())
        else {
            panic!("accepted");
        };
        assert!(shown.starts_with("?[31mxxx") && shown.ends_with("...") && shown.len() == 67, "{shown}");
    }

    #[test]
    fn y_flag_when_plus_was_offered_is_a_downgrade() {
        let mut server = binding_server();
        server.select_mechanism(SCRAM_SHA_256).unwrap();
        assert_eq!(server.client_first(b"y,,n=,r=abc"), Err(AuthError::ChannelBindingNegotiation));
        // Not selecting a mechanism at all means plain SCRAM: same answer.
        let mut server = binding_server();
        assert_eq!(server.client_first(b"y,,n=,r=abc"), Err(AuthError::ChannelBindingNegotiation));
        // postgres-protocol's client says "y" when asked not to bind, so it
        // is refused too.
        let mut server = ScramServer::new(pg_secret()).with_channel_binding(Some(CERT_HASH.to_vec()));
        assert_eq!(
            exchange(&mut server, "pencil", ChannelBinding::unrequested()),
            Err(AuthError::ChannelBindingNegotiation)
        );
    }

    #[test]
    fn n_flag_is_fine_when_plus_was_offered() {
        let mut server = binding_server();
        server.select_mechanism(SCRAM_SHA_256).unwrap();
        let (last, expected) = hand_exchange(&mut server, "n,,", b"n,,").unwrap();
        assert_eq!(String::from_utf8(last).unwrap(), expected);
        // Claiming binding data in c= after saying "n" is not.
        let mut server = binding_server();
        let cbind_input = [b"n,,".as_slice(), &CERT_HASH].concat();
        assert!(matches!(hand_exchange(&mut server, "n,,", &cbind_input), Err(AuthError::Protocol(_))));
    }

    #[test]
    fn empty_binding_data_is_no_binding() {
        let mut server = ScramServer::for_plain_password("pw").with_channel_binding(Some(Vec::new()));
        assert_eq!(server.mechanisms(), [SCRAM_SHA_256]);
        assert!(server.select_mechanism(SCRAM_SHA_256_PLUS).is_err());
        exchange(&mut server, "pw", ChannelBinding::unrequested()).unwrap();
    }

    #[test]
    fn mechanism_selection() {
        let mut server = binding_server();
        for bad in ["SCRAM-SHA-1", "scram-sha-256", ""] {
            assert_eq!(server.select_mechanism(bad), Err(AuthError::UnsupportedMechanism(bad.into())));
        }
        server.select_mechanism(SCRAM_SHA_256_PLUS).unwrap();
        server.select_mechanism(SCRAM_SHA_256).unwrap();
        server.client_first(b"n,,n=,r=abc").unwrap();
        // Too late now; and the exchange is over.
        assert!(matches!(server.select_mechanism(SCRAM_SHA_256), Err(AuthError::Protocol(_))));
        assert!(matches!(
            server.client_final(b"c=biws,r=abcSERVERNONCE,p=AAAA"),
            Err(AuthError::Protocol(_))
        ));
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
