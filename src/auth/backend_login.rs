//! pgcorral logging in to a PostgreSQL server as an ordinary client: the
//! startup handshake and authentication on a freshly opened server
//! connection, and the simple queries (connect_query, reset queries) run on
//! it outside of any client's session.
//!
//! Messages are framed by [`Framed`] rather than with `Message::parse`, which
//! has no length cap and rejects tags it does not know; a server connection
//! must not be able to make pgcorral allocate without bound.

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::message::frontend;

use super::kdf;
use super::md5::md5_challenge_response;
use super::scram::SCRAM_SHA_256;
use super::scram_client::{ScramClient, ScramKeys};
use super::secret::Secret;
use crate::net::{Framed, ReadError, Stream};
use crate::protocol::cancel_key::SecretKey;
use crate::protocol::error::sqlstate;
use crate::protocol::fields::Fields;
use crate::protocol::{Frame, PgError, ProtocolError};

/// Largest message accepted during login, and largest ErrorResponse,
/// NoticeResponse or ParameterStatus kept while running a simple query.
/// Real ones are a few hundred bytes; this only stops a broken or hostile
/// server from making pgcorral buffer without limit.
const MAX_KEPT_MESSAGE: usize = 1 << 20;

/// What to log in as.
pub struct LoginRequest<'a> {
    pub user: &'a str,
    pub database: &'a str,
    /// `Plain` answers cleartext, md5 and SCRAM requests. `Md5` answers md5
    /// requests only, hashing the stored digest with the salt as PgBouncer
    /// does. A SCRAM verifier cannot answer anything by itself: proving
    /// knowledge of it needs the ClientKey, which the verifier does not
    /// contain; see `scram_keys`.
    pub password: Option<&'a Secret>,
    /// Pass-through keys, typically recovered from the client's own SCRAM
    /// login to pgcorral. Used for a SCRAM request when `password` is not a
    /// plaintext password (absent, or a verifier); a plaintext password
    /// wins, since it works whatever verifier the server holds.
    pub scram_keys: Option<&'a ScramKeys>,
    /// Further startup parameters, e.g. client_encoding, DateStyle,
    /// TimeZone, application_name. `user` and `database` here are ignored in
    /// favour of the fields above.
    pub params: &'a [(String, String)],
    /// The minor version of protocol 3 to ask for: 2 where the server may speak it (PostgreSQL
    /// answers a newer minor than its own with NegotiateProtocolVersion), 0 for a server known
    /// to refuse anything newer.
    pub protocol_minor: u16,
}

/// What the server told pgcorral while logging in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOutcome {
    /// Every ParameterStatus, in the order received.
    pub params: Vec<(String, String)>,
    /// From BackendKeyData; what a CancelRequest for this connection needs.
    /// Zero if the server sent none.
    pub process_id: i32,
    pub secret_key: SecretKey,
    /// The minor protocol version agreed on: the one asked for, or the server's newest.
    pub protocol_minor: u16,
}

/// Why logging in to (or running a query on) a server connection failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendLoginError {
    /// The server sent an ErrorResponse. `severity` is the non-localised
    /// severity when the server sends one.
    #[error("server refused login: {severity} {code} {message}")]
    Server { severity: String, code: String, message: String },
    #[error("server asked for a password but none is configured for user \"{0}\"")]
    NoPassword(String),
    #[error("server asked for unsupported authentication {0}")]
    Unsupported(String),
    #[error("protocol violation during server login: {0}")]
    Protocol(String),
    #[error("i/o error during server login: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the protocol version itself before anything else (a server or
    /// pooler that does not negotiate: PgBouncer before 1.23 closes on 3.2): worth a new
    /// connection that asks for 3.0.
    #[error("server refused protocol 3.{minor}: {message}")]
    VersionRefused { minor: u16, message: String },
}

impl BackendLoginError {
    /// The SQLSTATE of a server error, for callers that act on specific ones
    /// (28P01 wrong password, 3D000 no such database, 57P03 starting up).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            BackendLoginError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Where a SCRAM exchange with the server stands.
enum Sasl {
    NotStarted,
    InProgress(Box<ScramClient>),
    /// The server's signature checked out: it knows the password too.
    Verified,
}

/// Sends a v3 StartupMessage and authenticates, then reads the server's
/// ParameterStatus and BackendKeyData messages up to ReadyForQuery.
///
/// On success the stream is positioned right after ReadyForQuery, so it can
/// be used for queries at once; nothing beyond it has been read.
pub async fn login<S: Stream>(
    conn: &mut Framed<S>,
    req: &LoginRequest<'_>,
) -> Result<LoginOutcome, BackendLoginError> {
    let buf = &mut conn.outbox;
    let extra = req
        .params
        .iter()
        .filter(|(k, _)| k != "user" && k != "database")
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let params = [("user", req.user), ("database", req.database)].into_iter().chain(extra);
    let start = buf.len();
    frontend::startup_message(params, buf).map_err(|e| encode_error("startup message", e))?;
    // postgres-protocol writes 3.0; the version is the four bytes after the length.
    let version = (3u32 << 16) | u32::from(req.protocol_minor);
    buf[start + 4..start + 8].copy_from_slice(&version.to_be_bytes());
    send(conn).await?;

    let mut sasl = Sasl::NotStarted;
    let mut authenticated = false;
    let mut outcome = LoginOutcome {
        params: Vec::new(),
        process_id: 0,
        secret_key: SecretKey::from_bytes(&[0; 4]).expect("a 4-byte key"),
        protocol_minor: req.protocol_minor,
    };
    let mut got_key_data = false;
    let mut first = true;

    loop {
        let frame = match next_header(conn).await {
            // Closed at once, before a word: what a server that cannot read the version does.
            Err(BackendLoginError::Io(e)) if first && req.protocol_minor > 0 => {
                return Err(BackendLoginError::VersionRefused {
                    minor: req.protocol_minor,
                    message: e.to_string(),
                })
            }
            other => other?,
        };
        let was_first = std::mem::replace(&mut first, false);
        match frame.tag {
            b'R' => {
                let body = read_body(conn, frame).await?;
                let mut r = Fields::new(&body, "Authentication");
                let code = r.i32()?;
                if authenticated {
                    return Err(protocol(format!("authentication request {code} after AuthenticationOk")));
                }
                match code {
                    0 => {
                        // A server that skips SASLFinal would have us trust it
                        // without ever proving it knows the password.
                        if !matches!(sasl, Sasl::NotStarted | Sasl::Verified) {
                            return Err(protocol(
                                "server sent AuthenticationOk before completing SCRAM".into(),
                            ));
                        }
                        authenticated = true;
                    }
                    3 => {
                        let password = plain_password(req, "cleartext password")?;
                        frontend::password_message(password.as_bytes(), &mut conn.outbox)
                            .map_err(|e| encode_error("password", e))?;
                        send(conn).await?;
                    }
                    5 => {
                        let salt: [u8; 4] = r.rest().try_into().map_err(|_| {
                            protocol("AuthenticationMD5Password without a 4-byte salt".into())
                        })?;
                        let response = match req.password {
                            Some(Secret::Plain(p)) => md5_hash(req.user.as_bytes(), p.as_bytes(), salt),
                            Some(Secret::Md5(s)) => md5_challenge_response(s, salt),
                            Some(Secret::Scram(_)) => {
                                return Err(scram_secret_cannot("md5 password", req.user))
                            }
                            None => return Err(BackendLoginError::NoPassword(req.user.into())),
                        };
                        frontend::password_message(response.as_bytes(), &mut conn.outbox)
                            .map_err(|e| encode_error("password", e))?;
                        send(conn).await?;
                    }
                    10 => {
                        if !matches!(sasl, Sasl::NotStarted) {
                            return Err(protocol("second AuthenticationSASL".into()));
                        }
                        let mut mechanisms = Vec::new();
                        loop {
                            let m = r.cstr()?;
                            if m.is_empty() {
                                break;
                            }
                            mechanisms.push(m);
                        }
                        // SCRAM-SHA-256-PLUS is only offered over TLS and
                        // would need the server certificate; plain SCRAM is
                        // always offered alongside it.
                        if !mechanisms.contains(&SCRAM_SHA_256) {
                            return Err(BackendLoginError::Unsupported(format!(
                                "SASL mechanisms {}",
                                mechanisms.join(", ")
                            )));
                        }
                        // The client sends the GS2 flag "n": pgcorral does
                        // not bind to the server's TLS channel.
                        let client = match req.scram_keys {
                            Some(keys) if !matches!(req.password, Some(Secret::Plain(_))) => {
                                ScramClient::with_keys(keys)
                            }
                            _ => ScramClient::with_password(plain_password(req, "SCRAM-SHA-256")?),
                        };
                        frontend::sasl_initial_response(
                            SCRAM_SHA_256,
                            client.client_first(),
                            &mut conn.outbox,
                        )
                        .map_err(|e| encode_error("SASLInitialResponse", e))?;
                        send(conn).await?;
                        sasl = Sasl::InProgress(Box::new(client));
                    }
                    11 => {
                        let Sasl::InProgress(client) = &mut sasl else {
                            return Err(protocol("unexpected AuthenticationSASLContinue".into()));
                        };
                        let server_first = r.rest();
                        // PBKDF2, whose cost the server chooses: off this worker's thread.
                        if let (Some((salt, iterations)), Some(Secret::Plain(password))) =
                            (client.salting(server_first), req.password)
                        {
                            let password = password.clone();
                            let keys = kdf::off_worker(move || {
                                ScramKeys::from_password(&password, &salt, iterations)
                            })
                            .await;
                            client.use_keys(keys);
                        }
                        let client_final = client
                            .server_first(server_first)
                            .map_err(|e| protocol(format!("bad SCRAM server-first-message: {e}")))?;
                        frontend::sasl_response(&client_final, &mut conn.outbox)
                            .map_err(|e| encode_error("SASLResponse", e))?;
                        send(conn).await?;
                    }
                    12 => {
                        let Sasl::InProgress(client) = &mut sasl else {
                            return Err(protocol("unexpected AuthenticationSASLFinal".into()));
                        };
                        client.server_final(r.rest()).map_err(|e| {
                            protocol(format!("server failed to prove it knows the password: {e}"))
                        })?;
                        sasl = Sasl::Verified;
                    }
                    2 => return Err(BackendLoginError::Unsupported("Kerberos V5".into())),
                    6 => return Err(BackendLoginError::Unsupported("SCM credentials".into())),
                    7 | 8 => return Err(BackendLoginError::Unsupported("GSSAPI".into())),
                    9 => return Err(BackendLoginError::Unsupported("SSPI".into())),
                    other => return Err(BackendLoginError::Unsupported(format!("request code {other}"))),
                }
            }
            b'E' => {
                let body = read_body(conn, frame).await?;
                let error = server_error(&body);
                // PostgreSQL never refuses a minor version (it negotiates): an error that comes
                // first, about the protocol, is a server that does not know 3.x.
                let about_protocol = matches!(
                    error.sqlstate(),
                    Some(sqlstate::PROTOCOL_VIOLATION | sqlstate::FEATURE_NOT_SUPPORTED)
                );
                if was_first && req.protocol_minor > 0 && about_protocol {
                    return Err(BackendLoginError::VersionRefused {
                        minor: req.protocol_minor,
                        message: error.to_string(),
                    });
                }
                return Err(error);
            }
            b'S' => {
                let body = read_body(conn, frame).await?;
                outcome.params.push(parameter_status(&body)?);
            }
            b'K' => {
                let body = read_body(conn, frame).await?;
                // Protocol 3.0 has a 4-byte key; 3.2 up to 256 bytes.
                let key = body.get(4..).and_then(SecretKey::from_bytes);
                let key = match key {
                    Some(key) if outcome.protocol_minor >= 2 || key.as_bytes().len() == 4 => key,
                    _ => return Err(protocol(format!("BackendKeyData of {} bytes", body.len()))),
                };
                outcome.process_id = Fields::new(&body, "BackendKeyData").i32()?;
                outcome.secret_key = key;
                got_key_data = true;
            }
            b'N' => conn.discard(frame.len).await?,
            // The server speaks an older minor version than we asked for (PostgreSQL before
            // 18 answers 3.0), or knows none of our options (we send none).
            b'v' => {
                let body = read_body(conn, frame).await?;
                let version = Fields::new(&body, "NegotiateProtocolVersion").i32()? as u32;
                let minor = (version & 0xffff) as u16;
                if version >> 16 != 3 || minor > req.protocol_minor || authenticated {
                    return Err(protocol(format!(
                        "NegotiateProtocolVersion offers {}.{minor} in answer to 3.{}",
                        version >> 16,
                        req.protocol_minor
                    )));
                }
                outcome.protocol_minor = minor;
            }
            b'Z' => {
                read_body(conn, frame).await?;
                if !authenticated {
                    return Err(protocol("ReadyForQuery before AuthenticationOk".into()));
                }
                if !got_key_data {
                    log::warn!(
                        "server sent no BackendKeyData for user \"{}\"; queries on it cannot be cancelled",
                        req.user
                    );
                }
                return Ok(outcome);
            }
            other => {
                return Err(protocol(format!("unexpected message {} during login", describe_tag(other))))
            }
        }
    }
}

/// Runs `sql` with the simple query protocol and reads everything up to
/// ReadyForQuery, discarding rows. Returns the ParameterStatus messages seen
/// (a `SET` may change reported parameters), or the first ErrorResponse; in
/// both cases the connection is left idle and ready for the next query.
///
/// `COPY ... FROM STDIN` is answered with CopyFail, so it ends as an error
/// rather than leaving the connection waiting for data.
pub async fn run_simple_query<S: Stream>(
    conn: &mut Framed<S>,
    sql: &str,
) -> Result<Vec<(String, String)>, BackendLoginError> {
    simple_query(conn, sql, None).await
}

/// Runs `sql` like [`run_simple_query`] and returns its rows as text (NULL as None); at most
/// `max_rows` are kept, so a query returning a table does not fill memory.
pub async fn query_rows<S: Stream>(
    conn: &mut Framed<S>,
    sql: &str,
    max_rows: usize,
) -> Result<Vec<Vec<Option<String>>>, BackendLoginError> {
    let mut rows = Vec::new();
    simple_query(conn, sql, Some((&mut rows, max_rows))).await?;
    Ok(rows)
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, BackendLoginError> {
    let mut r = Fields::new(body, "DataRow");
    let count = r.i16()?;
    let mut row = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let len = r.i32()?;
        if len < 0 {
            row.push(None);
        } else {
            let bytes = r.take(len as usize)?;
            row.push(Some(String::from_utf8_lossy(bytes).into_owned()));
        }
    }
    Ok(row)
}

type RowSink<'a> = Option<(&'a mut Vec<Vec<Option<String>>>, usize)>;

async fn simple_query<S: Stream>(
    conn: &mut Framed<S>,
    sql: &str,
    mut rows: RowSink<'_>,
) -> Result<Vec<(String, String)>, BackendLoginError> {
    frontend::query(sql, &mut conn.outbox).map_err(|e| encode_error("query", e))?;
    send(conn).await?;

    let mut params = Vec::new();
    let mut error = None;
    loop {
        let frame = next_header(conn).await?;
        match frame.tag {
            b'E' => {
                let body = read_body(conn, frame).await?;
                error.get_or_insert_with(|| server_error(&body));
            }
            b'S' => {
                let body = read_body(conn, frame).await?;
                params.push(parameter_status(&body)?);
            }
            b'G' => {
                conn.discard(frame.len).await?;
                frontend::copy_fail("pgcorral sends no COPY data in internal queries", &mut conn.outbox)
                    .map_err(|e| encode_error("CopyFail", e))?;
                send(conn).await?;
            }
            // Replication streams never end by themselves.
            b'W' => return Err(protocol("internal query started COPY BOTH".into())),
            b'Z' => {
                read_body(conn, frame).await?;
                return match error {
                    Some(e) => Err(e),
                    None => Ok(params),
                };
            }
            b'D' if rows.as_ref().is_some_and(|(kept, max)| kept.len() < *max) => {
                let body = read_body(conn, frame).await?;
                let row = data_row(&body)?;
                if let Some((kept, _)) = rows.as_mut() {
                    kept.push(row);
                }
            }
            // Rows, command tags, notices, notifications, COPY OUT data:
            // none of it matters to an internal query, and rows may be large,
            // so it is skipped without being buffered.
            _ => conn.discard(frame.len).await?,
        }
    }
}

fn protocol(what: String) -> BackendLoginError {
    BackendLoginError::Protocol(what)
}

fn encode_error(what: &str, e: std::io::Error) -> BackendLoginError {
    // The frontend writers only fail on values they cannot encode, such as
    // a NUL inside a string: a configuration problem, not a network one.
    protocol(format!("cannot encode {what}: {e}"))
}

fn scram_secret_cannot(what: &str, user: &str) -> BackendLoginError {
    BackendLoginError::Unsupported(format!(
        "{what}: only a SCRAM secret is configured for user \"{user}\", which cannot be used to log in to a server"
    ))
}

fn plain_password<'a>(req: &LoginRequest<'a>, what: &str) -> Result<&'a str, BackendLoginError> {
    match req.password {
        Some(Secret::Plain(p)) => Ok(p),
        Some(Secret::Md5(_)) => Err(BackendLoginError::Unsupported(format!(
            "{what}: only an md5 secret is configured for user \"{}\", which works only for md5",
            req.user
        ))),
        Some(Secret::Scram(_)) => Err(scram_secret_cannot(what, req.user)),
        None => Err(BackendLoginError::NoPassword(req.user.to_owned())),
    }
}

fn describe_tag(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

async fn send<S: Stream>(conn: &mut Framed<S>) -> Result<(), BackendLoginError> {
    Ok(conn.send().await?)
}

/// Waits for the next message's tag and length; its body may still be on the way.
async fn next_header<S: Stream>(conn: &mut Framed<S>) -> Result<Frame, BackendLoginError> {
    conn.next_header(usize::MAX).await.map_err(|e| read_error(e, None))
}

/// Reads the body of the message whose header is `frame`, if it is within the size kept.
async fn read_body<S: Stream>(conn: &mut Framed<S>, frame: Frame) -> Result<BytesMut, BackendLoginError> {
    match conn.read_message(MAX_KEPT_MESSAGE).await {
        Ok((_, body)) => Ok(body),
        Err(e) => Err(read_error(e, Some(frame.tag))),
    }
}

fn read_error(e: ReadError<ProtocolError>, tag: Option<u8>) -> BackendLoginError {
    let what = tag.map_or_else(|| "message".to_string(), |tag| format!("message {}", describe_tag(tag)));
    match e {
        ReadError::Closed => std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
        ReadError::Io(e) => e.into(),
        ReadError::Malformed(ProtocolError::TooLarge { size, .. }) => {
            protocol(format!("{what} of {size} bytes exceeds the {MAX_KEPT_MESSAGE}-byte limit"))
        }
        ReadError::Malformed(e) => protocol(format!("{what}: {e}")),
    }
}

impl From<ReadError<()>> for BackendLoginError {
    fn from(e: ReadError<()>) -> Self {
        match e {
            ReadError::Io(e) => e.into(),
            _ => std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
        }
    }
}

impl From<ProtocolError> for BackendLoginError {
    fn from(e: ProtocolError) -> Self {
        protocol(e.to_string())
    }
}

fn parameter_status(body: &[u8]) -> Result<(String, String), BackendLoginError> {
    let mut r = Fields::new(body, "ParameterStatus");
    let name = r.cstr()?.to_owned();
    let value = r.cstr()?.to_owned();
    Ok((name, value))
}

/// Turns an ErrorResponse body into `BackendLoginError::Server`. A body that
/// cannot be parsed is still a refusal, so it is reported as one with what
/// could be read rather than as a protocol error that hides it.
pub fn server_error(body: &[u8]) -> BackendLoginError {
    // One ErrorResponse reader for the whole daemon: PgError's.
    let PgError { severity, code, message } = PgError::parse_fields(body);
    BackendLoginError::Server { severity, code, message }
}

#[cfg(test)]
mod tests {
    use super::super::md5::{md5_secret, md5_verify};
    use super::super::scram::ScramServer;
    use super::super::secret::ScramSecret;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    // ---- a scripted server on the other end of an in-memory pipe ----

    async fn read_startup(s: &mut DuplexStream) -> Vec<(String, String)> {
        read_startup_of(s, 0).await
    }

    async fn read_startup_of(s: &mut DuplexStream, minor: u16) -> Vec<(String, String)> {
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(&body[..4], &(0x0003_0000 | i32::from(minor)).to_be_bytes(), "protocol 3.{minor}");
        let mut r = Fields::new(&body[4..], "test");
        let mut params = Vec::new();
        loop {
            let k = r.cstr().unwrap();
            if k.is_empty() {
                return params;
            }
            params.push((k.to_owned(), r.cstr().unwrap().to_owned()));
        }
    }

    async fn read_msg(s: &mut DuplexStream) -> (u8, Vec<u8>) {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    async fn write_msg(s: &mut DuplexStream, tag: u8, body: &[u8]) {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        s.write_all(&m).await.unwrap();
    }

    async fn write_auth(s: &mut DuplexStream, code: i32, data: &[u8]) {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        write_msg(s, b'R', &body).await;
    }

    /// What every server sends after AuthenticationOk.
    async fn finish_startup(s: &mut DuplexStream) {
        write_auth(s, 0, &[]).await;
        write_msg(s, b'S', b"server_version\x0015.0\x00").await;
        write_msg(s, b'N', b"SNOTICE\x00Mhello\x00\x00").await;
        write_msg(s, b'S', b"client_encoding\x00UTF8\x00").await;
        let mut key = 4242i32.to_be_bytes().to_vec();
        key.extend_from_slice(&(-7i32).to_be_bytes());
        write_msg(s, b'K', &key).await;
        write_msg(s, b'Z', b"I").await;
    }

    fn request<'a>(password: Option<&'a Secret>) -> LoginRequest<'a> {
        LoginRequest {
            user: "alice",
            database: "app",
            password,
            scram_keys: None,
            params: &[],
            protocol_minor: 0,
        }
    }

    #[tokio::test]
    async fn scram_login_against_our_own_scram_server() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut client = Framed::new(client);
        let server_task = tokio::spawn(async move {
            let params = read_startup(&mut server).await;
            assert_eq!(
                params,
                [
                    ("user".into(), "alice".into()),
                    ("database".into(), "app".into()),
                    ("application_name".into(), "psql".into()),
                ]
            );
            write_auth(&mut server, 10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").await;
            let mut scram = ScramServer::for_plain_password("pw");

            let (tag, body) = read_msg(&mut server).await;
            assert_eq!(tag, b'p');
            let mut r = Fields::new(&body, "test");
            ScramServer::check_mechanism(r.cstr().unwrap()).unwrap();
            let len = r.i32().unwrap() as usize;
            let rest = r.rest();
            assert_eq!(len, rest.len());
            let first = scram.client_first(rest).unwrap();
            write_auth(&mut server, 11, &first).await;

            let (tag, body) = read_msg(&mut server).await;
            assert_eq!(tag, b'p');
            let last = scram.client_final(&body).unwrap();
            write_auth(&mut server, 12, &last).await;
            finish_startup(&mut server).await;
            server
        });
        let password = Secret::Plain("pw".into());
        let params =
            [("application_name".to_owned(), "psql".to_owned()), ("user".to_owned(), "mallory".to_owned())];
        let req = LoginRequest { params: &params, ..request(Some(&password)) };
        let outcome = login(&mut client, &req).await.unwrap();
        assert_eq!(
            outcome,
            LoginOutcome {
                params: vec![
                    ("server_version".into(), "15.0".into()),
                    ("client_encoding".into(), "UTF8".into()),
                ],
                process_id: 4242,
                secret_key: SecretKey::from_bytes(&(-7i32).to_be_bytes()).unwrap(),
                protocol_minor: 0,
            }
        );
        server_task.await.unwrap();
    }

    /// A trust login asking for 3.2 from a server that plays `script` after the startup
    /// message.
    async fn login_3_2(script: Vec<(u8, Vec<u8>)>) -> Result<LoginOutcome, BackendLoginError> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut client = Framed::new(client);
        let server_task = tokio::spawn(async move {
            read_startup_of(&mut server, 2).await;
            for (tag, body) in script {
                write_msg(&mut server, tag, &body).await;
            }
            // Then it hangs up: what it wrote is still read.
        });
        let req = LoginRequest { protocol_minor: 2, ..request(None) };
        let outcome = login(&mut client, &req).await;
        server_task.await.unwrap();
        outcome
    }

    fn key_data(key: &[u8]) -> (u8, Vec<u8>) {
        let mut body = 77i32.to_be_bytes().to_vec();
        body.extend_from_slice(key);
        (b'K', body)
    }

    #[tokio::test]
    async fn protocol_3_2_is_asked_for_and_negotiated_down_when_the_server_is_older() {
        let ok = (b'R', 0i32.to_be_bytes().to_vec());
        let ready = (b'Z', b"I".to_vec());
        // PostgreSQL 18: 3.2 and a 32-byte key.
        let outcome = login_3_2(vec![ok.clone(), key_data(&[3; 32]), ready.clone()]).await.unwrap();
        assert_eq!((outcome.protocol_minor, outcome.secret_key.as_bytes()), (2, &[3u8; 32][..]));
        // PostgreSQL 15: NegotiateProtocolVersion 3.0 first, then a 4-byte key.
        let mut npv = 196_608i32.to_be_bytes().to_vec();
        npv.extend_from_slice(&0i32.to_be_bytes());
        let outcome =
            login_3_2(vec![(b'v', npv.clone()), ok.clone(), key_data(&[1, 2, 3, 4]), ready.clone()])
                .await
                .unwrap();
        assert_eq!((outcome.protocol_minor, outcome.secret_key.as_bytes()), (0, &[1u8, 2, 3, 4][..]));
        // A long key in 3.0, or a newer version than asked for: the server is broken.
        let long_in_3_0 = login_3_2(vec![(b'v', npv), ok.clone(), key_data(&[3; 32]), ready.clone()]).await;
        assert!(matches!(long_in_3_0, Err(BackendLoginError::Protocol(_))), "{long_in_3_0:?}");
        let mut newer = 196_611i32.to_be_bytes().to_vec();
        newer.extend_from_slice(&0i32.to_be_bytes());
        let newer = login_3_2(vec![(b'v', newer), ok, ready]).await;
        assert!(matches!(newer, Err(BackendLoginError::Protocol(_))), "{newer:?}");
    }

    #[tokio::test]
    async fn a_server_that_refuses_3_2_outright_is_told_apart_from_a_refused_login() {
        let error = |code: &str| (b'E', format!("SFATAL\0C{code}\0Munsupported protocol\0\0").into_bytes());
        let refused = login_3_2(vec![error("08P01")]).await;
        assert!(matches!(refused, Err(BackendLoginError::VersionRefused { minor: 2, .. })), "{refused:?}");
        let closed = login_3_2(vec![]).await;
        assert!(
            matches!(closed, Err(BackendLoginError::VersionRefused { .. })),
            "closed at once: {closed:?}"
        );
        // Any other first error is the server's answer to the login, not to the version.
        let no_db = login_3_2(vec![error("3D000")]).await;
        assert!(matches!(no_db, Err(BackendLoginError::Server { .. })), "{no_db:?}");
        let later = login_3_2(vec![(b'R', 0i32.to_be_bytes().to_vec()), error("08P01")]).await;
        assert!(matches!(later, Err(BackendLoginError::Server { .. })), "{later:?}");
    }

    /// Logs in to a scripted server that runs our SCRAM server against
    /// `verifier`, passing its server-final-message through `tamper`.
    async fn scram_login(
        verifier: ScramSecret,
        password: Option<Secret>,
        keys: Option<ScramKeys>,
        tamper: fn(Vec<u8>) -> Vec<u8>,
    ) -> Result<LoginOutcome, BackendLoginError> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut client = Framed::new(client);
        let server_task = tokio::spawn(async move {
            read_startup(&mut server).await;
            write_auth(&mut server, 10, b"SCRAM-SHA-256\0\0").await;
            let mut scram = ScramServer::new(verifier);
            let (_, body) = read_msg(&mut server).await;
            let mut r = Fields::new(&body, "test");
            assert_eq!(r.cstr().unwrap(), SCRAM_SHA_256);
            r.i32().unwrap();
            let first = r.rest();
            assert!(first.starts_with(b"n,,n=,r="), "{:?}", String::from_utf8_lossy(first));
            let first = scram.client_first(first).unwrap();
            write_auth(&mut server, 11, &first).await;
            let (_, body) = read_msg(&mut server).await;
            match scram.client_final(&body) {
                Ok(last) => {
                    write_auth(&mut server, 12, &tamper(last)).await;
                    finish_startup(&mut server).await;
                }
                Err(e) => {
                    assert_eq!(e, super::super::AuthError::WrongPassword);
                    write_msg(
                        &mut server,
                        b'E',
                        b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0",
                    )
                    .await;
                }
            }
        });
        let req = LoginRequest { scram_keys: keys.as_ref(), ..request(password.as_ref()) };
        let result = login(&mut client, &req).await;
        server_task.await.unwrap();
        result
    }

    #[tokio::test]
    async fn scram_login_with_password_or_keys() {
        let verifier = ScramSecret::from_password("pw", b"salt", 16);
        let keys = ScramKeys::from_password("pw", b"salt", 16);
        let bad_keys = ScramKeys::from_password("pw", b"other salt", 16);
        let plain = |p: &str| Some(Secret::Plain(p.into()));
        let same = |m: Vec<u8>| m;

        scram_login(verifier.clone(), plain("pw"), None, same).await.unwrap();
        scram_login(verifier.clone(), None, Some(keys.clone()), same).await.unwrap();
        // A verifier as the password: the keys answer for it.
        scram_login(verifier.clone(), Some(Secret::Scram(verifier.clone())), Some(keys.clone()), same)
            .await
            .unwrap();
        // So they do for an md5 secret, which cannot do SCRAM itself.
        let md5 = Some(Secret::Md5(md5_secret("alice", "pw")));
        scram_login(verifier.clone(), md5, Some(keys.clone()), same).await.unwrap();
        // A plaintext password takes precedence over keys.
        scram_login(verifier.clone(), plain("pw"), Some(bad_keys.clone()), same).await.unwrap();
        let e = scram_login(verifier.clone(), plain("nope"), Some(keys.clone()), same).await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("28P01"), "{e:?}");
        let e = scram_login(verifier, None, Some(bad_keys), same).await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("28P01"), "{e:?}");
    }

    #[tokio::test]
    async fn a_server_asking_for_billions_of_iterations_is_refused_at_once() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut client = Framed::new(client);
        let server_task = tokio::spawn(async move {
            read_startup(&mut server).await;
            write_auth(&mut server, 10, b"SCRAM-SHA-256\0\0").await;
            let (_, body) = read_msg(&mut server).await;
            let client_first = String::from_utf8_lossy(&body).into_owned();
            let nonce = client_first.split("r=").nth(1).expect("a client nonce").to_string();
            // Hours of PBKDF2 if pgcorral complied.
            let first = format!("r={nonce}SERVER,s=c2FsdA==,i=4000000000");
            write_auth(&mut server, 11, first.as_bytes()).await;
            let _ = server.read_to_end(&mut Vec::new()).await;
        });
        let password = Secret::Plain("pw".into());
        let e = login(&mut client, &request(Some(&password))).await.unwrap_err();
        assert!(matches!(&e, BackendLoginError::Protocol(m) if m.contains("more SCRAM iterations")), "{e:?}");
        drop(client);
        server_task.await.unwrap();
    }

    #[tokio::test]
    async fn server_signature_is_checked() {
        let verifier = ScramSecret::from_password("pw", b"salt", 16);
        let keys = ScramKeys::from_password("pw", b"salt", 16);
        let wrong = |_| {
            format!("v={}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 32]))
                .into_bytes()
        };
        let missing = |_| b"x=1".to_vec();
        let error = |_| b"e=other-error".to_vec();
        for (tamper, what) in [
            (wrong as fn(Vec<u8>) -> Vec<u8>, "does not match"),
            (missing, "no server signature"),
            (error, "other-error"),
        ] {
            for (password, keys) in [(Some(Secret::Plain("pw".into())), None), (None, Some(keys.clone()))] {
                match scram_login(verifier.clone(), password, keys, tamper).await {
                    Err(BackendLoginError::Protocol(m)) => assert!(m.contains(what), "{m}"),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    async fn md5_login(secret: Secret) -> Result<LoginOutcome, BackendLoginError> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut client = Framed::new(client);
        let server_task = tokio::spawn(async move {
            read_startup(&mut server).await;
            let salt = [1, 2, 3, 4];
            write_auth(&mut server, 5, &salt).await;
            let (tag, body) = read_msg(&mut server).await;
            assert_eq!(tag, b'p');
            let response = Fields::new(&body, "test").cstr().unwrap().to_owned();
            if md5_verify(&Secret::Plain("pw".into()), "alice", salt, &response) {
                finish_startup(&mut server).await;
            } else {
                write_msg(
                    &mut server,
                    b'E',
                    b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"alice\"\0\0",
                )
                .await;
            }
        });
        let result = login(&mut client, &request(Some(&secret))).await;
        server_task.await.unwrap();
        result
    }

    #[tokio::test]
    async fn md5_login_with_plain_and_md5_secrets() {
        md5_login(Secret::Plain("pw".into())).await.unwrap();
        md5_login(Secret::Md5(md5_secret("alice", "pw"))).await.unwrap();
        match md5_login(Secret::Plain("nope".into())).await {
            Err(BackendLoginError::Server { severity, code, message }) => {
                assert_eq!(severity, "FATAL");
                assert_eq!(code, "28P01");
                assert!(message.contains("alice"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Runs login against a server that sends `script` and then closes.
    async fn login_against(script: Vec<(u8, Vec<u8>)>, password: Option<&Secret>) -> BackendLoginError {
        let (client, mut server) = tokio::io::duplex(4 << 20);
        let mut client = Framed::new(client);
        tokio::spawn(async move {
            read_startup(&mut server).await;
            for (tag, body) in script {
                write_msg(&mut server, tag, &body).await;
            }
            // EOF for the client's reads, while still draining its writes so
            // they do not fail before it reaches the error under test.
            server.shutdown().await.unwrap();
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink).await;
        });
        login(&mut client, &request(password)).await.unwrap_err()
    }

    fn auth(code: i32, data: &[u8]) -> (u8, Vec<u8>) {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(data);
        (b'R', body)
    }

    #[tokio::test]
    async fn refusals_are_classified() {
        let plain = Secret::Plain("pw".into());
        let md5 = Secret::Md5(md5_secret("alice", "pw"));
        let scram = Secret::Scram(super::super::ScramSecret::from_password("pw", b"s", 1));

        let e = login_against(vec![auth(3, b"")], None).await;
        assert!(matches!(e, BackendLoginError::NoPassword(ref u) if u == "alice"), "{e:?}");
        for secret in [&md5, &scram] {
            let e = login_against(vec![auth(3, b"")], Some(secret)).await;
            assert!(matches!(e, BackendLoginError::Unsupported(_)), "{e:?}");
            let e = login_against(vec![auth(10, b"SCRAM-SHA-256\0\0")], Some(secret)).await;
            assert!(matches!(e, BackendLoginError::Unsupported(_)), "{e:?}");
        }
        let e = login_against(vec![auth(5, &[1, 2, 3, 4])], Some(&scram)).await;
        assert!(matches!(e, BackendLoginError::Unsupported(_)), "{e:?}");
        let e = login_against(vec![auth(7, b"")], Some(&plain)).await;
        assert!(matches!(e, BackendLoginError::Unsupported(ref m) if m == "GSSAPI"), "{e:?}");
        let e = login_against(vec![auth(10, b"SCRAM-SHA-256-PLUS\0\0")], Some(&plain)).await;
        assert!(matches!(e, BackendLoginError::Unsupported(_)), "{e:?}");

        // A server that claims success in the middle of SCRAM has not proven
        // it knows the password.
        let e = login_against(vec![auth(10, b"SCRAM-SHA-256\0\0"), auth(0, b"")], Some(&plain)).await;
        assert!(matches!(e, BackendLoginError::Protocol(_)), "{e:?}");
        // And one that sends a signature without having run the exchange.
        let e = login_against(vec![auth(12, b"v=AAAA")], Some(&plain)).await;
        assert!(matches!(e, BackendLoginError::Protocol(_)), "{e:?}");

        let e = login_against(vec![(b'Z', b"I".to_vec())], Some(&plain)).await;
        assert!(matches!(e, BackendLoginError::Protocol(_)), "{e:?}");
        let e = login_against(vec![auth(0, b""), (b'D', vec![0, 0])], Some(&plain)).await;
        assert!(matches!(e, BackendLoginError::Protocol(_)), "{e:?}");
        let e = login_against(
            vec![(b'N', vec![0; MAX_KEPT_MESSAGE + 1]), (b'E', vec![0; MAX_KEPT_MESSAGE + 1])],
            None,
        )
        .await;
        assert!(matches!(e, BackendLoginError::Protocol(ref m) if m.contains("limit")), "{e:?}");
        // Closed before ReadyForQuery.
        let e = login_against(vec![auth(0, b"")], None).await;
        assert!(matches!(e, BackendLoginError::Io(_)), "{e:?}");
    }

    #[tokio::test]
    async fn bad_length_is_a_protocol_error() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut client = Framed::new(client);
        tokio::spawn(async move {
            read_startup(&mut server).await;
            server.write_all(&[b'R', 0, 0, 0, 3]).await.unwrap();
            let _ = server.read_to_end(&mut Vec::new()).await;
        });
        let e = login(&mut client, &request(None)).await.unwrap_err();
        assert!(matches!(e, BackendLoginError::Protocol(_)), "{e:?}");
    }

    // ---- a throwaway PostgreSQL server ----

    const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

    /// A PostgreSQL cluster in a temporary directory, listening on
    /// 127.0.0.1 and on a Unix socket in that directory; removed on drop.
    struct TestPg {
        dir: std::path::PathBuf,
        port: u16,
        as_root: bool,
    }

    impl TestPg {
        /// Returns None when PostgreSQL is not installed.
        fn start(hba: &str) -> Option<TestPg> {
            use std::process::{Command, Stdio};
            if !std::path::Path::new(PG_BIN).join("initdb").exists() {
                return None;
            }
            let out = Command::new("id").arg("-u").output().expect("id -u");
            let as_root = String::from_utf8_lossy(&out.stdout).trim() == "0";
            let dir = std::env::temp_dir().join(format!(
                "pgc-auth-pg-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut pg = TestPg { dir, port: 0, as_root };
            if as_root {
                // initdb refuses to run as root, and the server must own its
                // data directory.
                assert!(Command::new("chown").args(["postgres:"]).arg(&pg.dir).status().unwrap().success());
            }
            let data = pg.dir.join("data");
            let ok = pg
                .command("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data)
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok, "initdb failed");
            std::fs::write(data.join("pg_hba.conf"), format!("local all all trust\n{hba}")).unwrap();

            // Another test run may hold a port; try a few.
            for _ in 0..5 {
                pg.port = 20000 + (rand::random::<u16>() % 12000);
                let opts = format!(
                    "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' -c fsync=off",
                    pg.port,
                    pg.dir.display()
                );
                let started = pg
                    .command("pg_ctl")
                    .arg("-D")
                    .arg(&data)
                    .arg("-l")
                    .arg(pg.dir.join("log"))
                    .args(["-w", "-o", &opts, "start"])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                if started {
                    return Some(pg);
                }
            }
            panic!("could not start PostgreSQL; see {}/log", pg.dir.display());
        }

        fn command(&self, program: &str) -> std::process::Command {
            let path = std::path::Path::new(PG_BIN).join(program);
            if self.as_root {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            } else {
                std::process::Command::new(path)
            }
        }

        /// Runs one query as the superuser over the Unix socket and returns
        /// its single value.
        fn psql_value(&self, sql: &str) -> String {
            let out = self
                .command("psql")
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .output()
                .unwrap();
            assert!(out.status.success(), "psql failed: {sql}");
            String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
        }

        /// Runs each statement as the superuser over the Unix socket.
        fn psql(&self, statements: &[&str]) {
            let mut c = self.command("psql");
            c.arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
            for s in statements {
                c.args(["-c", s]);
            }
            assert!(c.status().unwrap().success(), "psql failed: {statements:?}");
        }

        async fn connect(&self) -> Framed {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
            Framed::new(crate::net::Socket::Tcp(stream))
        }
    }

    impl Drop for TestPg {
        fn drop(&mut self) {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "stop"])
                .stdout(std::process::Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn sqlstate(r: Result<impl std::fmt::Debug, BackendLoginError>) -> String {
        match r {
            Err(BackendLoginError::Server { code, .. }) => code,
            other => panic!("expected a server error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn against_real_postgres() {
        let Some(pg) = TestPg::start(
            "host all trustuser 127.0.0.1/32 trust\n\
             host all md5user 127.0.0.1/32 md5\n\
             host all plainuser 127.0.0.1/32 password\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        ) else {
            eprintln!("PostgreSQL not installed in {PG_BIN}; skipping");
            return;
        };
        pg.psql(&[
            "CREATE ROLE trustuser LOGIN",
            "CREATE ROLE scramuser LOGIN PASSWORD 'scram-pw'",
            "CREATE ROLE plainuser LOGIN PASSWORD 'plain-pw'",
            "SET password_encryption = 'md5'",
            "CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'",
        ]);

        let try_login = |user: &'static str, password: Option<Secret>| {
            let pg = &pg;
            async move {
                let mut conn = pg.connect().await;
                let params = [
                    ("application_name".to_owned(), "pgcorral-test".to_owned()),
                    ("DateStyle".to_owned(), "ISO, DMY".to_owned()),
                ];
                let req = LoginRequest {
                    user,
                    database: "postgres",
                    password: password.as_ref(),
                    scram_keys: None,
                    params: &params,
                    protocol_minor: 2,
                };
                login(&mut conn, &req).await.map(|o| (o, conn))
            }
        };

        // trust
        let (outcome, _) = try_login("trustuser", None).await.unwrap();
        assert_ne!(outcome.process_id, 0);
        // Asked for 3.2: PostgreSQL 18 agrees, older servers negotiate 3.0 with a 4-byte key.
        let version = outcome.params.iter().find(|(n, _)| n == "server_version").unwrap().1.clone();
        let major: u32 = version.split(['.', ' ']).next().unwrap().parse().unwrap();
        let (minor, key_len) = if major >= 18 { (2, 32) } else { (0, 4) };
        assert_eq!(
            (outcome.protocol_minor, outcome.secret_key.as_bytes().len()),
            (minor, key_len),
            "{version}"
        );
        let param = |name: &str| outcome.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(param("application_name").as_deref(), Some("pgcorral-test"));
        assert_eq!(param("DateStyle").as_deref(), Some("ISO, DMY"));
        assert!(param("server_version").unwrap().starts_with("15"));

        // SCRAM
        let scram = || Some(Secret::Plain("scram-pw".into()));
        try_login("scramuser", scram()).await.unwrap();
        let wrong = || Some(Secret::Plain("wrong".into()));
        assert_eq!(sqlstate(try_login("scramuser", wrong()).await), "28P01");
        assert!(matches!(try_login("scramuser", None).await, Err(BackendLoginError::NoPassword(_))));

        // SCRAM pass-through: no password, only the keys. ServerKey comes
        // from the server's own verifier; ClientKey is what a client logging
        // in to pgcorral with the password would reveal, computed here from
        // the password and that verifier's salt and iteration count.
        let rolpassword = pg.psql_value("SELECT rolpassword FROM pg_authid WHERE rolname = 'scramuser'");
        let Secret::Scram(verifier) = Secret::parse(&rolpassword) else {
            panic!("scramuser has no SCRAM verifier: {rolpassword:?}");
        };
        let client_key = ScramKeys::from_password("scram-pw", &verifier.salt, verifier.iterations).client_key;
        let keys = ScramKeys { client_key, server_key: verifier.server_key };
        assert!(keys.matches_secret(&verifier));
        let login_with_keys = |password: Option<Secret>, keys: ScramKeys| {
            let pg = &pg;
            async move {
                let mut conn = pg.connect().await;
                let req = LoginRequest {
                    user: "scramuser",
                    database: "postgres",
                    password: password.as_ref(),
                    scram_keys: Some(&keys),
                    params: &[],
                    protocol_minor: 2,
                };
                login(&mut conn, &req).await.map(|o| (o, conn))
            }
        };
        let (_, mut conn) = login_with_keys(None, keys.clone()).await.unwrap();
        run_simple_query(&mut conn, "SELECT 1").await.unwrap();
        login_with_keys(Some(Secret::Scram(verifier.clone())), keys.clone()).await.unwrap();
        // A plaintext password, when there is one, is used instead.
        assert_eq!(sqlstate(login_with_keys(wrong(), keys.clone()).await), "28P01");
        let wrong_client_key = ScramKeys { client_key: [1; 32], ..keys.clone() };
        assert_eq!(sqlstate(login_with_keys(None, wrong_client_key).await), "28P01");
        // The server accepts the proof, but its signature is not what this
        // ServerKey predicts, so pgcorral does not trust it.
        let wrong_server_key = ScramKeys { server_key: [1; 32], ..keys };
        match login_with_keys(None, wrong_server_key).await {
            Err(BackendLoginError::Protocol(m)) => assert!(m.contains("signature"), "{m}"),
            other => panic!("{:?}", other.map(|(o, _)| o)),
        }

        // md5, with the password and with the stored secret
        try_login("md5user", Some(Secret::Plain("md5-pw".into()))).await.unwrap();
        try_login("md5user", Some(Secret::Md5(md5_secret("md5user", "md5-pw")))).await.unwrap();
        assert_eq!(sqlstate(try_login("md5user", wrong()).await), "28P01");

        // cleartext
        try_login("plainuser", Some(Secret::Plain("plain-pw".into()))).await.unwrap();
        assert_eq!(sqlstate(try_login("plainuser", wrong()).await), "28P01");

        // no such database
        let mut conn = pg.connect().await;
        let req = LoginRequest {
            user: "trustuser",
            database: "nosuchdb",
            password: None,
            scram_keys: None,
            params: &[],
            protocol_minor: 2,
        };
        assert_eq!(sqlstate(login(&mut conn, &req).await), "3D000");

        // queries on a logged-in connection
        let (_, mut conn) = try_login("scramuser", scram()).await.unwrap();
        let seen = run_simple_query(&mut conn, "SET application_name = 'renamed'").await.unwrap();
        assert_eq!(seen, [("application_name".to_owned(), "renamed".to_owned())]);
        assert!(run_simple_query(&mut conn, "SELECT generate_series(1, 10000)").await.unwrap().is_empty());
        assert_eq!(sqlstate(run_simple_query(&mut conn, "SELECT 1/0").await), "22012");
        run_simple_query(&mut conn, "SELECT 1").await.unwrap();
        // An error inside a multi-statement query string stops it there.
        assert_eq!(
            sqlstate(run_simple_query(&mut conn, "SELECT 1; SELECT nosuchcolumn; SELECT 2").await),
            "42703"
        );
        run_simple_query(&mut conn, "CREATE TEMP TABLE t (a int)").await.unwrap();
        assert_eq!(sqlstate(run_simple_query(&mut conn, "COPY t FROM STDIN").await), "57014");
        run_simple_query(&mut conn, "COPY (SELECT 1) TO STDOUT").await.unwrap();
        run_simple_query(&mut conn, "DISCARD ALL").await.unwrap();
        run_simple_query(&mut conn, "").await.unwrap();
    }
}
