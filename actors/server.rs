//! ServerConnection: one actor per PostgreSQL backend connection.
//!
//! It logs in (whatever authentication PostgreSQL asks for), then alternates between idle (it
//! holds the socket) and lent (the socket travels in a [`ServerLink`] to the client's relay loop,
//! so query bytes never cross a mailbox). Takes [`Lend`], [`Return`] and [`Close`]; tells its
//! Router when it is idle ([`ServerIdle`]) and when it is gone ([`ServerGone`]), and gives its
//! permit back to the pool when it stops, whatever the reason.
//!
//! Before a lease it checks that the idle socket has neither closed nor spoken out of turn (a
//! backend terminated by `pg_terminate_backend` sends a FATAL and closes). After a lease it
//! makes the server clean before anyone else gets it: reset query, ROLLBACK, or close.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;

use crate::actors::messages::*;
use crate::actors::pool::{PoolSettings, PoolShared};
use crate::actors::router::Router;
use crate::auth::{self, BackendLoginError, LoginRequest};
use crate::config::PoolMode;
use crate::net::{DetachedSocket, ServerAddr, Socket};
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;

/// How often an idle server checks `server_idle_timeout` and `server_lifetime` (PgBouncer's
/// janitor runs about as often).
const JANITOR_PERIOD: Duration = Duration::from_secs(1);

/// A logged-in server connection, as it travels between its actor and a client.
#[derive(Debug)]
pub struct ServerLink {
    pub socket: Socket,
    pub addr: ServerAddr,
    pub process_id: i32,
    pub secret_key: i32,
    /// The server's current ParameterStatus values, kept up to date by whoever reads its output.
    pub params: Vec<(String, String)>,
    guard: LendGuard,
}

/// While a server is lent, its link knows the way home: dropped anywhere but back in its actor
/// (a client's future dropped mid-lease, a panic), it tells the actor, which closes and gives
/// its permit back instead of waiting forever for a socket that no longer exists.
#[derive(Default)]
struct LendGuard(Option<Addr<ServerConnection>>);

impl Drop for LendGuard {
    fn drop(&mut self) {
        if let Some(home) = self.0.take() {
            home.do_send(LinkLost);
        }
    }
}

impl std::fmt::Debug for LendGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "lent" } else { "home" })
    }
}

impl ServerLink {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(entry) => entry.1 = value.to_string(),
            None => self.params.push((name.to_string(), value.to_string())),
        }
    }

    /// Runs a query of pgcorral's own, keeping the parameter cache true.
    pub async fn run(&mut self, sql: &str) -> Result<(), BackendLoginError> {
        let reported = auth::run_simple_query(&mut self.socket, sql).await?;
        for (name, value) in reported {
            self.set_param(&name, &value);
        }
        Ok(())
    }
}

/// A server connection in transit between workers: its socket out of any reactor.
#[derive(Debug)]
pub struct DetachedLink {
    /// When the connection was opened: `server_lifetime` counts from there on any worker.
    born: Instant,
    socket: DetachedSocket,
    addr: ServerAddr,
    process_id: i32,
    secret_key: i32,
    params: Vec<(String, String)>,
}

impl ServerLink {
    pub fn detach(self, born: Instant) -> std::io::Result<DetachedLink> {
        Ok(DetachedLink {
            born,
            socket: self.socket.detach()?,
            addr: self.addr,
            process_id: self.process_id,
            secret_key: self.secret_key,
            params: self.params,
        })
    }

    /// True when the idle socket has neither closed nor sent anything unasked.
    fn is_healthy(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.socket.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl DetachedLink {
    fn attach(self) -> std::io::Result<ServerLink> {
        Ok(ServerLink {
            socket: self.socket.attach()?,
            addr: self.addr,
            process_id: self.process_id,
            secret_key: self.secret_key,
            params: self.params,
            guard: LendGuard::default(),
        })
    }
}

/// What must happen to a server when its lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLease {
    /// Clean: straight back to idle.
    Reuse,
    /// Session over: run `server_reset_query` first.
    Reset,
    /// The client left inside a transaction block with nothing in flight: roll back, then reset.
    Rollback,
    /// The protocol state is unknown (client left mid-query, I/O error): never lend it again.
    Close,
}

pub struct ServerConnection {
    pool: Arc<PoolShared>,
    router: Addr<Router>,
    link: Option<ServerLink>,
    /// A server that moved here from another worker, attached once this actor runs.
    arriving: Option<DetachedLink>,
    login_error: Option<PgError>,
    close_on_return: bool,
    /// Moved to another worker: its permit went along, so stopping must not release it.
    migrated: bool,
    born: Instant,
    idle_since: Instant,
}

impl ServerConnection {
    /// A new connection: it logs in when started.
    pub fn new(pool: Arc<PoolShared>, router: Addr<Router>) -> ServerConnection {
        ServerConnection {
            pool,
            router,
            link: None,
            arriving: None,
            login_error: None,
            close_on_return: false,
            migrated: false,
            born: Instant::now(),
            idle_since: Instant::now(),
        }
    }

    /// An already logged-in connection handed over by another worker, with its permit.
    pub fn adopt(pool: Arc<PoolShared>, router: Addr<Router>, link: DetachedLink) -> ServerConnection {
        ServerConnection { arriving: Some(link), ..ServerConnection::new(pool, router) }
    }

    fn become_idle(&mut self, link: ServerLink, fresh: bool, ctx: &mut Context<Self>) {
        if self.close_on_return || self.past_lifetime() {
            ctx.stop();
            return;
        }
        self.idle_since = Instant::now();
        self.link = Some(link);
        self.router.do_send(ServerIdle { server: ctx.address(), fresh });
    }
}

impl ServerConnection {
    fn past_lifetime(&self) -> bool {
        let lifetime = self.pool.settings().server_lifetime;
        !lifetime.is_zero() && self.born.elapsed() >= lifetime
    }

    /// Closes an idle server past `server_lifetime`, or idle past `server_idle_timeout` while
    /// the pool is above `min_pool_size`. A lent server is left alone.
    fn janitor(&mut self, ctx: &mut Context<Self>) {
        if self.link.is_none() {
            return;
        }
        let settings = self.pool.settings();
        let idle_too_long = !settings.server_idle_timeout.is_zero()
            && self.idle_since.elapsed() >= settings.server_idle_timeout
            && self.pool.server_count() > settings.min_pool_size;
        if idle_too_long || self.past_lifetime() {
            log::debug!("pool {}: closing server (idle timeout or lifetime)", self.pool.key);
            ctx.stop();
        }
    }
}

/// Connects and logs in, then runs `connect_query`.
async fn open(settings: Arc<PoolSettings>) -> Result<ServerLink, PgError> {
    let addr = settings.addr.clone();
    let connect_failed = |detail: String| {
        PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection failed ({addr}): {detail}"))
    };
    let timeout = settings.server_connect_timeout;
    let mut socket = tokio::time::timeout(timeout, addr.connect())
        .await
        .map_err(|_| connect_failed("timed out".into()))?
        .map_err(|e| connect_failed(e.to_string()))?;
    let request = LoginRequest {
        user: &settings.server_user,
        database: &settings.dbname,
        password: settings.password.as_ref(),
        params: &settings.startup_params,
    };
    let outcome = tokio::time::timeout(timeout, auth::login(&mut socket, &request))
        .await
        .map_err(|_| connect_failed("login timed out".into()))?
        .map_err(|e| login_error(e, &connect_failed))?;
    let mut link = ServerLink {
        socket,
        addr: addr.clone(),
        process_id: outcome.process_id,
        secret_key: outcome.secret_key,
        params: outcome.params,
        guard: LendGuard::default(),
    };
    if let Some(query) = &settings.connect_query {
        link.run(query).await.map_err(|e| login_error(e, &connect_failed))?;
    }
    Ok(link)
}

fn login_error(e: BackendLoginError, connect_failed: &dyn Fn(String) -> PgError) -> PgError {
    match e {
        // The server's own words reach the client, with its SQLSTATE (e.g. 28P01, 3D000, 53300).
        BackendLoginError::Server { code, message, .. } => {
            PgError::fatal(&code, format!("server login failed: {message}"))
        }
        other => connect_failed(other.to_string()),
    }
}

impl Actor for ServerConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(JANITOR_PERIOD, |server, ctx| server.janitor(ctx));
        if let Some(arriving) = self.arriving.take() {
            self.born = arriving.born;
            match arriving.attach() {
                Ok(link) => self.become_idle(link, false, ctx),
                Err(e) => {
                    log::warn!(
                        "pool {}: could not take over a server from another worker: {e}",
                        self.pool.key
                    );
                    ctx.stop();
                }
            }
            return;
        }
        let settings = self.pool.settings();
        ctx.spawn(wrap_future(open(settings)).map(|result, server: &mut Self, ctx| match result {
            Ok(link) => {
                server.pool.set_welcome_once(&link.params);
                log::debug!("pool {}: new server connection {}", server.pool.key, link.process_id);
                server.become_idle(link, true, ctx);
            }
            Err(error) => {
                server.login_error = Some(error);
                ctx.stop();
            }
        }));
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        if !self.migrated {
            self.pool.release();
        }
        let login_error = self.login_error.take();
        self.router.do_send(ServerGone { server: ctx.address(), login_error });
    }
}

impl Handler<Lend> for ServerConnection {
    type Result = Option<ServerLink>;

    fn handle(&mut self, _: Lend, ctx: &mut Context<Self>) -> Option<ServerLink> {
        let link = self.link.take()?;
        let mut probe = [0u8; 1];
        match link.socket.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(link),
            _ => {
                log::info!(
                    "pool {}: idle server {} closed or sent data unasked; replacing it",
                    self.pool.key,
                    link.process_id
                );
                ctx.stop();
                None
            }
        }
    }
}

impl Handler<Return> for ServerConnection {
    type Result = ();

    fn handle(&mut self, msg: Return, ctx: &mut Context<Self>) {
        let mut link = msg.link;
        link.guard.0 = None;
        let settings = self.pool.settings();
        let cleanup: Vec<String> = match msg.after {
            AfterLease::Reuse if settings.reset_query_always => vec![settings.reset_query.clone()],
            AfterLease::Reuse => Vec::new(),
            AfterLease::Reset => vec![settings.reset_query.clone()],
            AfterLease::Rollback
                if settings.pool_mode == PoolMode::Session || settings.reset_query_always =>
            {
                vec!["ROLLBACK".into(), settings.reset_query.clone()]
            }
            AfterLease::Rollback => vec!["ROLLBACK".into()],
            AfterLease::Close => {
                ctx.stop();
                return;
            }
        };
        let cleanup: Vec<String> = cleanup.into_iter().filter(|q| !q.trim().is_empty()).collect();
        if cleanup.is_empty() {
            self.become_idle(link, false, ctx);
            return;
        }
        let work = async move {
            for query in &cleanup {
                link.run(query).await?;
            }
            Ok::<_, BackendLoginError>(link)
        };
        ctx.spawn(wrap_future(work).map(|result, server: &mut Self, ctx| match result {
            Ok(link) => server.become_idle(link, false, ctx),
            Err(e) => {
                log::warn!("pool {}: server cleanup failed, closing it: {e}", server.pool.key);
                ctx.stop();
            }
        }));
    }
}

impl Handler<Migrate> for ServerConnection {
    type Result = ();

    fn handle(&mut self, msg: Migrate, ctx: &mut Context<Self>) {
        if !msg.to.connected() {
            return;
        }
        let Some(link) = self.link.take() else { return };
        if !link.is_healthy() {
            ctx.stop();
            return;
        }
        match link.detach(self.born) {
            Ok(detached) => {
                self.migrated = true;
                msg.to.do_send(Adopt(detached));
            }
            Err(e) => log::warn!("pool {}: could not hand a server to another worker: {e}", self.pool.key),
        }
        ctx.stop();
    }
}

impl Handler<LinkLost> for ServerConnection {
    type Result = ();

    fn handle(&mut self, _: LinkLost, ctx: &mut Context<Self>) {
        log::warn!("pool {}: a lent server connection was lost with its client; closing it", self.pool.key);
        ctx.stop();
    }
}

impl Handler<Close> for ServerConnection {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        if self.link.is_some() {
            ctx.stop();
        } else {
            self.close_on_return = true;
        }
    }
}
