//! Opening one server connection: the walk over the database's hosts, the login on each, the
//! protocol version fallback and the `target_session_attrs` check, then `connect_query`.
//!
//! Hosts are tried in the order the pool's [`HostRotation`] gives. A host that cannot be
//! reached (refused, timed out, TLS failed, starting up or shutting down) is skipped for the
//! next one and tried last until `server_login_retry` has passed; a server of the wrong kind for
//! `target_session_attrs` is closed and the next host tried. An answer that would be the same
//! on every host (a wrong password, no such database) ends the walk at once, as libpq does.

use std::sync::Arc;
use std::time::Instant;

use crate::actors::census::ServerEntry;
use crate::actors::hosts::HostRotation;
use crate::actors::pool::{Permit, PoolSettings, PoolShared};
use crate::actors::server::ServerLink;
use crate::auth::{self, query_rows, BackendLoginError, LoginOutcome, LoginRequest};
use crate::config::hosts::{ServerRole, TargetSessionAttrs};
use crate::net::{Framed, ServerAddr};
use crate::params::sorted_session;
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;
use crate::tls::negotiate_server_tls;

/// How one attempt on one host failed.
enum Failed {
    /// Reaching the server, its TLS handshake, or the login's time limit.
    Connect(String),
    Login(BackendLoginError),
    /// It logged in, but is not what `target_session_attrs` asks for.
    WrongRole(ServerRole),
}

impl Failed {
    /// Whether the next host may do better: the host is down, starting or stopping, or of
    /// the wrong kind. A refused password or a missing database would be refused everywhere.
    fn next_host_may_do_better(&self) -> bool {
        match self {
            Failed::Connect(_) | Failed::WrongRole(_) => true,
            Failed::Login(BackendLoginError::Server { code, .. }) => {
                matches!(code.as_str(), sqlstate::CANNOT_CONNECT_NOW | sqlstate::ADMIN_SHUTDOWN)
            }
            Failed::Login(BackendLoginError::Io(_)) => true,
            Failed::Login(_) => false,
        }
    }
}

/// Connects and logs in to the first suitable host, then runs `connect_query`.
pub async fn open(
    settings: Arc<PoolSettings>,
    entry: Arc<ServerEntry>,
    permit: Permit,
) -> Result<ServerLink, PgError> {
    let (addr, conn, outcome) = walk_hosts(&settings, &entry.pool, &settings.startup_params).await?;
    finish(&settings, entry, &addr, conn, outcome, permit).await
}

/// Logs in to the first suitable host with `params` as the startup parameters (a replication
/// connection's own): the connection and what the server said.
pub async fn walk(
    settings: &PoolSettings,
    pool: &PoolShared,
    params: &[(String, String)],
) -> Result<(Framed, LoginOutcome), PgError> {
    walk_hosts(settings, pool, params).await.map(|(_, conn, outcome)| (conn, outcome))
}

async fn walk_hosts(
    settings: &PoolSettings,
    pool: &PoolShared,
    params: &[(String, String)],
) -> Result<(ServerAddr, Framed, LoginOutcome), PgError> {
    let hosts: &HostRotation = &pool.hosts;
    let order = hosts.order(settings.servers.len(), settings.load_balance_hosts, Instant::now());
    let attrs = settings.target_session_attrs;
    // prefer-standby: a standby first; only if no host is one, any server, as libpq does.
    let passes: &[TargetSessionAttrs] = match attrs {
        TargetSessionAttrs::PreferStandby => &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any],
        _ => std::slice::from_ref(&attrs),
    };
    let mut last = None;
    let mut wrong_role = Vec::new();
    for (pass, want) in passes.iter().enumerate() {
        // The second pass only retries the hosts that were up but of the wrong kind.
        let candidates = if pass == 0 { order.clone() } else { std::mem::take(&mut wrong_role) };
        for index in candidates {
            let addr = &settings.servers[index];
            match on_host(settings, pool, addr, params, *want).await {
                Ok((conn, outcome)) => {
                    hosts.reached(index);
                    return Ok((addr.clone(), conn, outcome));
                }
                Err(failed) => {
                    match &failed {
                        Failed::Connect(_) | Failed::Login(BackendLoginError::Io(_)) => {
                            hosts.unreachable(index, Instant::now(), settings.server_login_retry)
                        }
                        Failed::WrongRole(_) => wrong_role.push(index),
                        Failed::Login(_) => {}
                    }
                    if settings.servers.len() > 1 {
                        log::info!("pool {}: server {addr}: {}", pool.key, describe(&failed, *want));
                    }
                    if !failed.next_host_may_do_better() {
                        return Err(to_pg(addr, failed, *want));
                    }
                    last = Some((index, failed));
                }
            }
        }
    }
    let (index, failed) = last.expect("a database has at least one host");
    Err(to_pg(&settings.servers[index], failed, attrs))
}

/// One host: connect, TLS, log in (asking for protocol 3.2, and again for 3.0 if the server
/// refuses 3.2 instead of negotiating), then check its role if `want` cares.
async fn on_host(
    settings: &PoolSettings,
    pool: &PoolShared,
    addr: &ServerAddr,
    params: &[(String, String)],
    want: TargetSessionAttrs,
) -> Result<(Framed, LoginOutcome), Failed> {
    let asked = pool.server_protocol_minor();
    let (mut conn, outcome) = match login_once(settings, pool, addr, params, asked).await {
        Err(Failed::Login(BackendLoginError::VersionRefused { minor, message })) => {
            log::info!("pool {}: server refused protocol 3.{minor} ({message}); asking for 3.0", pool.key);
            pool.server_refuses_newer_protocol();
            login_once(settings, pool, addr, params, 0).await?
        }
        other => other?,
    };
    if want.checks_role() {
        let role = match role_reported(&outcome.params) {
            Some(role) => role,
            None => role_queried(&mut conn, settings).await?,
        };
        if !want.accepts(role) {
            return Err(Failed::WrongRole(role));
        }
    }
    Ok((conn, outcome))
}

async fn login_once(
    settings: &PoolSettings,
    pool: &PoolShared,
    addr: &ServerAddr,
    params: &[(String, String)],
    protocol_minor: u16,
) -> Result<(Framed, LoginOutcome), Failed> {
    let timeout = settings.server_connect_timeout;
    let tls_name = match addr {
        ServerAddr::Tcp { host, .. } => host.as_str(),
        ServerAddr::Unix { .. } => "",
    };
    let socket = tokio::time::timeout(timeout, async {
        let socket = addr.connect_with(&settings.tcp).await.map_err(|e| e.to_string())?;
        negotiate_server_tls(socket, &settings.server_tls, tls_name).await
    })
    .await
    .map_err(|_| Failed::Connect("timed out".into()))?
    .map_err(Failed::Connect)?;
    let mut conn = Framed::new(socket);
    let scram_keys = pool.scram_keys();
    let queried = pool.queried_secret();
    let request = LoginRequest {
        user: &settings.server_user,
        database: &settings.dbname,
        password: settings.password.as_ref().or(queried.as_ref()),
        scram_keys: scram_keys.as_ref(),
        params,
        protocol_minor,
    };
    let outcome = tokio::time::timeout(timeout, auth::login(&mut conn, &request))
        .await
        .map_err(|_| Failed::Connect("login timed out".into()))?
        .map_err(Failed::Login)?;
    Ok((conn, outcome))
}

/// The role PostgreSQL 14 and later report at login.
pub fn role_reported(params: &[(String, String)]) -> Option<ServerRole> {
    let param = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, v)| v == "on");
    Some(ServerRole {
        in_hot_standby: param("in_hot_standby")?,
        default_read_only: param("default_transaction_read_only")?,
    })
}

/// Older servers report neither: ask.
async fn role_queried(conn: &mut Framed, settings: &PoolSettings) -> Result<ServerRole, Failed> {
    let sql =
        "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('default_transaction_read_only')";
    let rows = tokio::time::timeout(settings.server_connect_timeout, query_rows(conn, sql, 1))
        .await
        .map_err(|_| Failed::Connect("role check timed out".into()))?
        .map_err(Failed::Login)?;
    let row = rows.into_iter().next().unwrap_or_default();
    let on = |i: usize| row.get(i).cloned().flatten().is_some_and(|v| v == "t" || v == "on");
    Ok(ServerRole { in_hot_standby: on(0), default_read_only: on(1) })
}

fn describe(failed: &Failed, want: TargetSessionAttrs) -> String {
    match failed {
        Failed::Connect(detail) => detail.clone(),
        Failed::Login(e) => e.to_string(),
        Failed::WrongRole(role) => format!(
            "not {} (in_hot_standby={}, default_transaction_read_only={})",
            want.as_str(),
            if role.in_hot_standby { "on" } else { "off" },
            if role.default_read_only { "on" } else { "off" },
        ),
    }
}

fn to_pg(addr: &ServerAddr, failed: Failed, want: TargetSessionAttrs) -> PgError {
    let detail = describe(&failed, want);
    match failed {
        // The server's own words reach the client, with its SQLSTATE (e.g. 28P01, 3D000, 53300).
        Failed::Login(BackendLoginError::Server { code, message, .. }) => {
            PgError::fatal(&code, format!("server login failed: {message}"))
        }
        _ => connect_failed(addr, detail),
    }
}

fn connect_failed(addr: &ServerAddr, detail: String) -> PgError {
    PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection failed ({addr}): {detail}"))
}

/// The link, once logged in: its census entry, then `connect_query`.
async fn finish(
    settings: &PoolSettings,
    entry: Arc<ServerEntry>,
    addr: &ServerAddr,
    conn: Framed,
    outcome: LoginOutcome,
    permit: Permit,
) -> Result<ServerLink, PgError> {
    log::debug!(
        "pool {}: server {} on {addr} logged in with protocol 3.{}",
        entry.pool.key,
        outcome.process_id,
        outcome.protocol_minor
    );
    let endpoints = conn.socket.endpoints(addr.port());
    let tls = conn.socket.tls_description();
    // Cancels go to the address this connection reached, not to the name, which may resolve
    // to another address by then (round robin, or a moved name).
    let reached = match (addr, &endpoints.0) {
        (ServerAddr::Tcp { port, .. }, remote) if remote.addr.parse::<std::net::IpAddr>().is_ok() => {
            ServerAddr::Tcp { host: remote.addr.clone(), port: *port }
        }
        _ => addr.clone(),
    };
    let mut link = ServerLink::logged_in(conn, reached, settings.tcp, outcome, entry, permit);
    let application_name = link.param("application_name").unwrap_or_default().to_string();
    link.entry.logged_in(endpoints, link.process_id, &application_name, tls);
    if let Some(query) = &settings.connect_query {
        let failed = |e| to_pg(addr, Failed::Login(e), settings.target_session_attrs);
        link.run(query).await.map_err(failed)?;
        // What connect_query set is this connection's starting point, not a client's doing.
        let set_now = link.learn_session().await.map_err(failed)?;
        link.baseline = sorted_session(set_now);
        link.session.clear();
    }
    Ok(link)
}
