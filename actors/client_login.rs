//! The login phase of a client connection, before any server is involved.
//!
//! Negotiates TLS (SSLRequest, or PostgreSQL 17's direct TLS) as `client_tls_sslmode` allows,
//! reads the startup packet (GSSENCRequest is answered `N`), recognises CancelRequests, enforces `max_client_conn` and `ignore_startup_parameters`, finds
//! the pool, and authenticates the client against `auth_file` with the configured `auth_type`
//! (trust, plain, md5, scram-sha-256). Every refusal is a PostgreSQL ErrorResponse with the
//! SQLSTATE PostgreSQL or PgBouncer would use.

use std::io;

use bytes::{Buf, BytesMut};

use crate::actors::console::Role;
use crate::actors::control::is_admin_database;
use crate::actors::pool::PoolMember;
use crate::actors::registry::Shared;
use crate::actors::replication::Replication;
use crate::auth::hba::{ConnKind, HbaMethod};
use crate::auth::kdf;
use crate::auth::{md5_verify, verify_plaintext, ScramKeys, ScramSecret, ScramServer, Secret};
use crate::config::{AuthType, Config};
use crate::net::{Framed, ReadError, Socket};
use crate::protocol::backend;
use crate::protocol::error::sqlstate;
use crate::protocol::frontend::{parse_password, parse_sasl_initial};
use crate::protocol::options::{is_parameter_name, parse_options};
use crate::protocol::startup::{parse_startup, Negotiation, StartupPacket};
use crate::protocol::{PgError, ProtocolError};
use crate::tls::{ClientTls, ClientTlsInfo};

/// Authentication messages are small; a larger one is an attack or a confused client.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// Startup parameters that describe the connection rather than set a run-time parameter.
const CONNECTION_PARAMS: &[&str] = &["user", "database"];

/// Why a login did not complete.
#[derive(Debug)]
pub enum LoginError {
    /// Tell the client, then close.
    Refused(PgError),
    /// The client went away (psql does this to ask for a password); nothing to say.
    Gone,
}

impl From<PgError> for LoginError {
    fn from(e: PgError) -> Self {
        LoginError::Refused(e)
    }
}

impl From<io::Error> for LoginError {
    fn from(_: io::Error) -> Self {
        LoginError::Gone
    }
}

impl From<ReadError<ProtocolError>> for LoginError {
    fn from(e: ReadError<ProtocolError>) -> Self {
        match e {
            ReadError::Malformed(e) => LoginError::Refused(e.to_pg()),
            ReadError::Closed | ReadError::Io(_) => LoginError::Gone,
        }
    }
}

pub enum Accepted {
    Cancel {
        process_id: i32,
        secret_key: Vec<u8>,
    },
    Login(Login),
    /// A login to the admin console (database `pgbouncer` or `pgcorral`).
    Console(ConsoleLogin),
}

pub struct ConsoleLogin {
    pub user: String,
    pub database: String,
    pub startup: Vec<(String, String)>,
    pub role: Role,
    /// The minor protocol version agreed on: 2 gives the client a long cancel key.
    pub protocol_minor: u16,
}

pub struct Login {
    pub user: String,
    pub database: String,
    pub startup: Vec<(String, String)>,
    /// The minor protocol version agreed on: 2 gives the client a long cancel key.
    pub protocol_minor: u16,
    /// `replication=true` or `database`: the client gets a server connection of its own.
    pub replication: Replication,
    /// The client's place in its pool, taken once it authenticated.
    pub member: PoolMember,
}

/// A client connection during its login: the framed socket, and what its TLS handshake
/// negotiated.
pub struct Wire {
    pub conn: Framed,
    /// Set once the client negotiated TLS.
    pub tls: Option<ClientTlsInfo>,
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

impl Wire {
    pub fn new(socket: Socket) -> Wire {
        Wire { conn: Framed::new(socket), tls: None }
    }

    /// Runs the TLS handshake and carries on over the encrypted socket.
    async fn start_tls(&mut self, tls: &ClientTls, direct: bool) -> Result<(), LoginError> {
        let plain = std::mem::replace(&mut self.conn.socket, Socket::Moving);
        let peer = plain.peer();
        match tls.accept(plain).await {
            Ok((socket, info)) => {
                self.conn.socket = socket;
                if direct && !info.alpn_postgresql {
                    // As PostgreSQL: direct TLS is only for clients that name the protocol.
                    return Err(PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "received direct SSL connection request without ALPN protocol negotiation extension",
                    )
                    .into());
                }
                self.tls = Some(info);
                Ok(())
            }
            Err(e) => {
                log::info!("client {peer}: TLS handshake failed: {e}");
                Err(LoginError::Gone)
            }
        }
    }

    async fn read_startup(&mut self) -> Result<StartupPacket, LoginError> {
        let packet = self.conn.read_until(|inbox| {
            let found = parse_startup(inbox)?;
            Ok::<_, ProtocolError>(found.map(|(packet, len)| {
                inbox.advance(len);
                packet
            }))
        });
        Ok(packet.await?)
    }

    /// Answers an SSLRequest or GSSENCRequest: one byte, before any framing.
    async fn answer(&mut self, byte: u8) -> io::Result<()> {
        self.conn.outbox.extend_from_slice(&[byte]);
        self.conn.send().await
    }

    /// Reads one `p` message body (password or SASL data).
    async fn read_password_message(&mut self) -> Result<BytesMut, LoginError> {
        match self.conn.read_message(MAX_AUTH_MESSAGE).await? {
            (b'p', body) => Ok(body),
            _ => Err(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "expected a password message during authentication",
            )
            .into()),
        }
    }
}

/// Runs the login up to and including AuthenticationOk (queued in `wire.conn.outbox`, not yet sent).
pub async fn accept(wire: &mut Wire, shared: &Shared, admitted: &mut bool) -> Result<Accepted, LoginError> {
    let client_tls = shared.config().tls.client.clone();
    if let Some(tls) = &client_tls {
        if wire.conn.socket.peek_first_byte().await? == Some(TLS_HANDSHAKE) {
            wire.start_tls(tls, true).await?;
        }
    }
    let params = loop {
        match wire.read_startup().await? {
            StartupPacket::Ssl => match &client_tls {
                Some(tls) if wire.tls.is_none() && !wire.conn.socket.is_unix() => {
                    // Bytes sent after the SSLRequest but before the handshake would be
                    // trusted as if they had been encrypted (CVE-2021-23222).
                    if !wire.conn.inbox.is_empty() {
                        return Err(PgError::fatal(
                            sqlstate::PROTOCOL_VIOLATION,
                            "received unencrypted data after SSL request",
                        )
                        .into());
                    }
                    wire.answer(b'S').await?;
                    wire.start_tls(tls, false).await?;
                }
                _ => wire.answer(b'N').await?,
            },
            StartupPacket::GssEnc => wire.answer(b'N').await?,
            StartupPacket::Cancel { process_id, secret_key } => {
                return Ok(Accepted::Cancel { process_id, secret_key })
            }
            StartupPacket::Startup { minor, mut params } => {
                let negotiation = Negotiation::of(minor, &mut params);
                // Before anything else, as PostgreSQL: the client learns what it may use.
                if negotiation.must_tell {
                    backend::negotiate_protocol_version(&mut wire.conn.outbox, &negotiation);
                }
                break (params, negotiation.minor);
            }
        }
    };
    let (params, protocol_minor) = params;
    // client_tls_sslmode = require and above: plaintext TCP logins are refused (Unix-socket
    // clients are local and never need TLS).
    if client_tls.as_ref().is_some_and(|tls| tls.sslmode().requires_tls())
        && wire.tls.is_none()
        && !wire.conn.socket.is_unix()
    {
        return Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "SSL required").into());
    }
    // Debug builds only (what the tests run): a bug's panic, on demand.
    #[cfg(debug_assertions)]
    if params.iter().any(|(name, _)| name == "pgcorral.test_panic") {
        shared.panic_holding_locks();
    }
    let config = shared.config();
    let param = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let user = param("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        PgError::fatal(sqlstate::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
    })?;
    let database = param("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    let settings = startup_settings(&params, &config)?;
    let replication = match param("replication") {
        Some(value) => {
            Replication::parse(&value).map_err(|e| PgError::fatal(sqlstate::INVALID_PARAMETER_VALUE, e))?
        }
        None => Replication::None,
    };
    if is_admin_database(&database) && replication != Replication::None {
        return Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "the admin console takes no replication connections",
        )
        .into());
    }
    if is_admin_database(&database) {
        let role = console_login(wire, &config, &user).await?;
        admit(shared, admitted)?;
        backend::authentication_ok(&mut wire.conn.outbox);
        return Ok(Accepted::Console(ConsoleLogin { user, database, startup: params, role, protocol_minor }));
    }
    let queried = match config.secret(&user) {
        Some(_) => None,
        None => shared.queried_secret(&config, &database, &user).await?,
    };
    let keys = authenticate(wire, &config, &user, &database, queried.as_deref()).await?;
    admit(shared, admitted)?;
    // Only now is anything made for the client: a failed login leaves no pool behind.
    let member = shared.pool(&database, &user)?;
    let pool = member.pool();
    if let Some(keys) = keys {
        pool.offer_scram_keys(&user, keys);
    }
    if let Some(secret) = queried {
        pool.set_queried_secret(Secret::parse(&secret));
    }
    if shared.holds.lock().disabled(&database) {
        return Err(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("database \"{database}\" is disabled"),
        )
        .into());
    }
    backend::authentication_ok(&mut wire.conn.outbox);
    Ok(Accepted::Login(Login { user, database, startup: settings, protocol_minor, replication, member }))
}

/// Counts an authenticated client against `max_client_conn`. Clients still logging in are
/// bounded apart (see `Shared::start_login`), so that connections that never finish their
/// login cannot lock out those that do.
fn admit(shared: &Shared, admitted: &mut bool) -> Result<(), LoginError> {
    if !shared.admit_client() {
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "no more connections allowed (max_client_conn)",
        )
        .into());
    }
    *admitted = true;
    Ok(())
}

/// Who may use the console, as in PgBouncer: `admin_users` and `stats_users` after the usual
/// authentication, and the user `pgbouncer` without a password over the Unix socket when it
/// runs as pgcorral's own OS user. Anyone else is told "not allowed".
async fn console_login(wire: &mut Wire, config: &Config, user: &str) -> Result<Role, LoginError> {
    let own_uid = unsafe { libc::getuid() };
    let peer_is_me = wire.conn.socket.peer_credentials().is_some_and(|(uid, _)| uid == own_uid);
    if user == "pgbouncer" && peer_is_me {
        return Ok(Role::Admin);
    }
    if config.general.auth_type == AuthType::Any {
        // `any` checks no one, and the console has no user of its own to log in as instead.
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "the admin console is closed to auth_type = any logins, except user pgbouncer over the Unix socket as pgcorral's OS user",
        )
        .into());
    }
    authenticate(wire, config, user, "pgbouncer", None).await?;
    let general = &config.general;
    if general.admin_users.iter().any(|u| u == user) {
        Ok(Role::Admin)
    } else if general.stats_users.iter().any(|u| u == user) {
        Ok(Role::Stats)
    } else {
        Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "not allowed").into())
    }
}

/// The run-time parameters a startup packet sets, its `options` spelled out, minus those
/// `ignore_startup_parameters` drops. PgBouncer refuses any parameter it does not track;
/// pgcorral makes every one follow its client from server to server (see `params`), so only
/// what no server could honour is refused.
fn startup_settings(params: &[(String, String)], config: &Config) -> Result<Vec<(String, String)>, PgError> {
    let ignored =
        |name: &str| config.general.ignore_startup_parameters.iter().any(|p| p.eq_ignore_ascii_case(name));
    let mut settings = Vec::new();
    for (name, value) in params {
        let lower = name.to_ascii_lowercase();
        if CONNECTION_PARAMS.contains(&lower.as_str()) || ignored(name) {
            continue;
        }
        if lower == "options" {
            let options = parse_options(value)
                .map_err(|e| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
            settings.extend(options.into_iter().filter(|(name, _)| !ignored(name)));
            continue;
        }
        // Not a run-time setting: it decides what kind of connection this is (see `accept`).
        if lower == "replication" {
            continue;
        }
        if !is_parameter_name(name) {
            return Err(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("unsupported startup parameter: {name}"),
            ));
        }
        settings.push((name.clone(), value.clone()));
    }
    Ok(settings)
}

fn auth_failed(user: &str) -> LoginError {
    PgError::fatal(sqlstate::INVALID_PASSWORD, format!("password authentication failed for user \"{user}\""))
        .into()
}

/// PgBouncer's words for a failed SCRAM exchange, whoever the user was.
fn sasl_failed() -> LoginError {
    PgError::fatal(sqlstate::INVALID_PASSWORD, "SASL authentication failed").into()
}

fn refused(message: String) -> LoginError {
    PgError::fatal(sqlstate::INVALID_AUTHORIZATION, message).into()
}

/// How one client must prove who it is: `auth_type`, or the matching `auth_hba_file` line.
enum Check {
    Trust,
    /// `auth_type = any`: no check at all.
    Any,
    Password,
    Md5,
    Scram,
    /// The TLS client certificate's common name, through an `auth_ident_file` map if named.
    Cert(Option<String>),
    /// The Unix-socket peer's OS user name, through a map if named.
    Peer(Option<String>),
}

/// The check `auth_hba_file` asks for on this connection; PostgreSQL's wording when no line
/// matches or the line says `reject`.
fn hba_check(wire: &Wire, config: &Config, user: &str, database: &str) -> Result<Check, LoginError> {
    let Some(hba) = &config.hba else { return Err(refused("auth_type = hba without auth_hba_file".into())) };
    let kind =
        if wire.conn.socket.is_unix() { ConnKind::Local } else { ConnKind::Host { ssl: wire.tls.is_some() } };
    let addr = wire.conn.socket.peer_ip();
    let place = match addr {
        Some(ip) => format!(
            "host \"{ip}\", user \"{user}\", database \"{database}\", {}",
            if wire.tls.is_some() { "SSL encryption" } else { "no encryption" }
        ),
        None => format!("user \"{user}\", database \"{database}\""),
    };
    let Some(rule) = hba.lookup(kind, addr, database, user) else {
        return Err(refused(format!("no pg_hba.conf entry for {place}")));
    };
    Ok(match rule.method {
        HbaMethod::Trust => Check::Trust,
        HbaMethod::Reject => return Err(refused(format!("pg_hba.conf rejects connection for {place}"))),
        HbaMethod::Md5 => Check::Md5,
        HbaMethod::ScramSha256 => Check::Scram,
        HbaMethod::Password => Check::Password,
        HbaMethod::Cert => Check::Cert(rule.map.clone()),
        HbaMethod::Peer => Check::Peer(rule.map.clone()),
    })
}

/// Whether `name` (a certificate's CN, an OS user) may log in as `user`: the same name, or
/// allowed by the ident map.
fn name_maps(config: &Config, map: &Option<String>, name: &str, user: &str) -> bool {
    match (map, &config.ident) {
        (None, _) => name == user,
        (Some(map), Some(ident)) => ident.allows(map, name, user),
        (Some(_), None) => false,
    }
}

/// Authenticates `user`: against its `auth_file` secret, its TLS certificate or its OS user,
/// as `auth_type` (or the hba line) says. An unknown user goes through the same exchange
/// against a throwaway secret and fails the same way, so that a login attempt does not reveal
/// which users exist. `queried` is the user's secret from `auth_query`, for users missing from
/// `auth_file`. Returns the SCRAM keys the client proved, for logging in to PostgreSQL
/// on its behalf (SCRAM pass-through).
async fn authenticate(
    wire: &mut Wire,
    config: &Config,
    user: &str,
    database: &str,
    queried: Option<&str>,
) -> Result<Option<ScramKeys>, LoginError> {
    let check = match config.general.auth_type {
        AuthType::Trust => Check::Trust,
        AuthType::Any => Check::Any,
        AuthType::Plain => Check::Password,
        AuthType::Md5 => Check::Md5,
        AuthType::ScramSha256 => Check::Scram,
        AuthType::Cert => Check::Cert(None),
        AuthType::Hba => hba_check(wire, config, user, database)?,
    };
    let stored = config.secret(user).or(queried).map(Secret::parse);
    let has_auth_file = config.general.auth_file.is_some();
    let known = stored.is_some();
    let asks_scram = matches!(check, Check::Scram) || (matches!(check, Check::Md5) && config.mostly_scram);
    // A cleartext password checked against a SCRAM verifier costs a key derivation: where most
    // users have one, an unknown user's check must cost one too.
    let mock_scram = asks_scram || (matches!(check, Check::Password) && config.mostly_scram);
    let secret = match stored {
        Some(secret) => secret,
        None if mock_scram => Secret::Scram(ScramSecret::mock(user, config.mock_scram_iterations)),
        None => Secret::Plain(decoy_password().to_string()),
    };
    let mut keys = None;
    let accepted = match check {
        Check::Any => true,
        Check::Trust => {
            if !(known || !has_auth_file || config.general.auth_type == AuthType::Hba) {
                return Err(refused("\"trust\" authentication failed".into()));
            }
            true
        }
        Check::Cert(map) => {
            let name = wire.tls.as_ref().and_then(|tls| tls.peer_common_name.clone());
            if !name.is_some_and(|cn| name_maps(config, &map, &cn, user)) {
                return Err(refused(format!("certificate authentication failed for user \"{user}\"")));
            }
            true
        }
        Check::Peer(map) => {
            let os_user = wire.conn.socket.peer_credentials().and_then(|(uid, _)| os_user_name(uid));
            if !os_user.is_some_and(|name| name_maps(config, &map, &name, user)) {
                return Err(refused(format!("peer authentication failed for user \"{user}\"")));
            }
            true
        }
        Check::Password => {
            backend::authentication_cleartext(&mut wire.conn.outbox);
            wire.conn.send().await?;
            let message = wire.read_password_message().await?;
            let password = parse_password(&message).map_err(|e| LoginError::Refused(e.to_pg()))?;
            let matches = match &secret {
                // PBKDF2 against a stored verifier: off this worker's thread.
                Secret::Scram(_) => {
                    let (secret, user) = (secret.clone(), user.to_string());
                    kdf::off_worker(move || verify_plaintext(&secret, &user, &password)).await
                }
                _ => verify_plaintext(&secret, user, &password),
            };
            known && matches
        }
        Check::Md5 if matches!(secret, Secret::Scram(_)) => {
            let (ok, proved) = scram_exchange(wire, user, &secret, config.general.scram_iterations).await?;
            keys = proved;
            if !(known && ok) {
                return Err(sasl_failed());
            }
            true
        }
        Check::Md5 => {
            let salt: [u8; 4] = rand::random();
            backend::authentication_md5(&mut wire.conn.outbox, salt);
            wire.conn.send().await?;
            let message = wire.read_password_message().await?;
            let response = parse_password(&message).map_err(|e| LoginError::Refused(e.to_pg()))?;
            known && md5_verify(&secret, user, salt, &response)
        }
        Check::Scram => {
            if matches!(secret, Secret::Md5(_)) {
                log::warn!("user \"{user}\": scram-sha-256 login impossible with an md5 secret in auth_file");
                return Err(auth_failed(user));
            }
            let (ok, proved) = scram_exchange(wire, user, &secret, config.general.scram_iterations).await?;
            keys = proved;
            if !(known && ok) {
                return Err(sasl_failed());
            }
            true
        }
    };
    if accepted {
        Ok(keys.filter(|_| known))
    } else {
        Err(auth_failed(user))
    }
}

/// The OS user name of a uid, for `peer` authentication.
fn os_user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // getpwuid_r: the reentrant form, since workers run on several threads.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_string)
}

/// The secret an unknown user is checked against: one random password per process, so that
/// its SCRAM verifier is cached like a real user's and a failed login takes the same time
/// whether or not the user exists.
fn decoy_password() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

/// SCRAM-SHA-256 (and SCRAM-SHA-256-PLUS over TLS): AuthenticationSASL, client-first,
/// server-first, client-final, server-final. Returns whether the client proved it knows the
/// password, and the keys it proved a stored SCRAM secret with.
async fn scram_exchange(
    wire: &mut Wire,
    user: &str,
    secret: &Secret,
    iterations: u32,
) -> Result<(bool, Option<ScramKeys>), LoginError> {
    let server = match secret {
        Secret::Scram(keys) => ScramServer::new(keys.clone()),
        Secret::Plain(password) => match ScramServer::cached_for_plain_password(user, password, iterations) {
            Some(server) => server,
            // The first login with this password derives its verifier, off this thread.
            None => {
                let (user, password) = (user.to_string(), password.clone());
                kdf::off_worker(move || ScramServer::for_plain_password_with(&user, &password, iterations))
                    .await
            }
        },
        Secret::Md5(_) => return Ok((false, None)),
    };
    let mut server = server.with_channel_binding(wire.tls.as_ref().map(|tls| tls.end_point.clone()));
    backend::authentication_sasl(&mut wire.conn.outbox, server.mechanisms());
    wire.conn.send().await?;
    let message = wire.read_password_message().await?;
    let (mechanism, first) = parse_sasl_initial(&message).map_err(|e| LoginError::Refused(e.to_pg()))?;
    let refuse = |e: crate::auth::AuthError| LoginError::Refused(PgError::fatal(e.sqlstate(), e.to_string()));
    server.select_mechanism(&mechanism).map_err(refuse)?;
    let server_first = server.client_first(&first).map_err(refuse)?;
    backend::authentication_sasl_continue(&mut wire.conn.outbox, &server_first);
    wire.conn.send().await?;
    let client_final = wire.read_password_message().await?;
    match server.client_final(&client_final) {
        Ok(server_final) => {
            backend::authentication_sasl_final(&mut wire.conn.outbox, &server_final);
            let keys = matches!(secret, Secret::Scram(_)).then(|| server.pass_through_keys()).flatten();
            Ok((true, keys))
        }
        Err(crate::auth::AuthError::WrongPassword) => Ok((false, None)),
        Err(e) => Err(refuse(e)),
    }
}
