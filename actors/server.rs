//! ServerConnection: one actor per PostgreSQL backend connection.
//!
//! It logs in (whatever authentication PostgreSQL asks for), cleans the server up after a
//! session or an abandoned transaction (reset query, ROLLBACK), and tells its Router when the
//! connection ends. The connection itself — socket, BackendKeyData, ParameterStatus and its
//! [`Permit`] in the pool's limits — is a [`ServerLink`] that travels: it waits in its Router
//! while idle and sits in the client's relay loop while lent, so a lease costs one message each
//! way and query bytes never cross a mailbox. Wherever the link is dropped, its permit goes
//! back with it.
//!
//! Takes [`Return`] (clean this link up, then check it in), [`Close`], [`Retire`] (the link
//! moved to another worker with the permit) and [`LinkLost`]; sends [`Checkin`] and
//! [`ServerGone`] to its Router.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;

use crate::actors::census::ServerEntry;
use crate::actors::messages::*;
use crate::actors::pool::{Permit, PoolShared};
use crate::actors::relay::CancelTarget;
use crate::actors::router::{live_router, Router};
use crate::auth::{self, BackendLoginError};
use crate::config::PoolMode;
use crate::net::{DetachedSocket, Framed, ServerAddr, TcpSettings};
use crate::params::{sorted_session, TrackedParams, SESSION_PROBE};
use crate::protocol::prepared::{is_discard_all, ServerStatements};
use crate::protocol::PgError;

/// A logged-in server connection, as it travels between its Router and a client.
#[derive(Debug)]
pub struct ServerLink<C = Framed> {
    /// When the connection was opened: `server_lifetime` counts from here on any worker.
    pub born: Instant,
    /// The socket, with what was read from it and not yet consumed and what is queued for it
    /// (a bare detached socket while the connection moves between workers).
    pub conn: C,
    pub process_id: i32,
    /// Where and how to cancel what runs on it (the address reached, its key, up to 256 bytes
    /// in protocol 3.2): made once, and shared with each client it serves, at no cost per
    /// lease.
    pub cancel: Arc<CancelTarget>,
    /// The server's current ParameterStatus values, kept up to date by whoever reads its output.
    pub params: Vec<(String, String)>,
    /// The client values these parameters were last found to match; any ParameterStatus
    /// clears it. Saves comparing every tracked parameter on every lease.
    pub matches_client: Option<TrackedParams>,
    /// The pool's connection generation when this server logged in; older than the pool's
    /// means a reload changed how servers are reached, and this one is closed, not reused.
    pub generation: usize,
    /// This connection in the census (SHOW SERVERS); whoever holds the link keeps it current.
    pub entry: Arc<ServerEntry>,
    /// The named statements prepared on it for clients in transaction mode.
    pub statements: ServerStatements,
    /// The unreported parameters set in its session (by pgcorral for a client, or by a client),
    /// sorted by lower-case name; see `params`.
    pub session: Vec<(String, String)>,
    /// A `SET`, `RESET` or `DISCARD` ran since `session` was last known: read it again
    /// ([`ServerLink::learn_session`]) before trusting it.
    pub session_unknown: bool,
    /// What `connect_query` set in the session: the defaults of this connection, which a
    /// client's `RESET` must come back to rather than PostgreSQL's own.
    pub baseline: Vec<(String, String)>,
    guard: LendGuard,
    /// Its share of the pool's limits, given back when the link is dropped, wherever.
    permit: Permit,
}

/// While a server is lent, its link knows the way home: dropped anywhere but back in its Router
/// or actor (a client's future dropped mid-lease, a panic), it tells the actor, which stops and
/// tells the Router; the link's permit has gone back with it.
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
        self.matches_client = None;
        if name.eq_ignore_ascii_case("application_name") {
            self.entry.set_application_name(value);
        }
        match self.params.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(entry) => entry.1 = value.to_string(),
            None => self.params.push((name.to_string(), value.to_string())),
        }
    }

    /// Reads which parameters are set in the server's session. Returns them all, reported and
    /// not; `session` keeps the unreported ones.
    pub async fn learn_session(&mut self) -> Result<Vec<(String, String)>, BackendLoginError> {
        let bound = self.own_query_bound();
        let rows = match tokio::time::timeout(bound, auth::query_rows(&mut self.conn, SESSION_PROBE, 10_000))
            .await
        {
            Ok(rows) => rows?,
            Err(_) => return Err(self.no_answer("the session parameter read-back", bound)),
        };
        let set_now: Vec<(String, String)> = rows
            .into_iter()
            .filter_map(|row| match (row.first(), row.get(1)) {
                (Some(Some(name)), Some(value)) => Some((name.clone(), value.clone().unwrap_or_default())),
                _ => None,
            })
            .collect();
        Ok(self.session_now(set_now))
    }

    /// The session was just reset whole (`RESET ALL`, `DISCARD ALL`): nothing is set in it
    /// any more, which pgcorral knows without asking.
    pub fn session_was_reset(&mut self) {
        self.session_now(Vec::new());
    }

    /// Records which parameters the session now sets (`set_now`, as read from pg_settings)
    /// and returns those that differ from the connection's starting point.
    fn session_now(&mut self, set_now: Vec<(String, String)>) -> Vec<(String, String)> {
        // A connect_query value no longer set was RESET to PostgreSQL's default: that differs
        // from the connection's starting point, and is marked so (no real value holds a NUL).
        let mut unreported: Vec<(String, String)> = self
            .baseline
            .iter()
            .filter(|(name, _)| self.param(name).is_none())
            .filter(|(name, _)| !set_now.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)))
            .map(|(name, _)| (name.clone(), "\0reset".to_string()))
            .collect();
        let set_now: Vec<(String, String)> =
            set_now.into_iter().filter(|entry| !self.baseline.contains(entry)).collect();
        unreported.extend(set_now.iter().filter(|(name, _)| self.param(name).is_none()).cloned());
        self.session = sorted_session(unreported);
        self.session_unknown = false;
        self.matches_client = None;
        set_now
    }

    /// How long one of pgcorral's own round trips may take (a reset, check or connect query, a
    /// parameter sync or read-back): `server_connect_timeout`, what a fresh server is given to
    /// log in. A server that has not answered by then is hung, and the caller closes it.
    fn own_query_bound(&self) -> Duration {
        self.entry.pool.settings().server_connect_timeout
    }

    fn no_answer(&self, what: &str, bound: Duration) -> BackendLoginError {
        log::warn!("pool {}: server did not answer {what} within {bound:?}; closing it", self.entry.pool.key);
        BackendLoginError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer to {what}"),
        ))
    }

    /// Runs a query of pgcorral's own, keeping the parameter cache true; a server that does not
    /// answer within [`Self::own_query_bound`] is an error, and must be closed.
    pub async fn run(&mut self, sql: &str) -> Result<(), BackendLoginError> {
        let bound = self.own_query_bound();
        match tokio::time::timeout(bound, self.run_unbounded(sql)).await {
            Ok(result) => result,
            Err(_) => Err(self.no_answer(&format!("\"{sql}\""), bound)),
        }
    }

    async fn run_unbounded(&mut self, sql: &str) -> Result<(), BackendLoginError> {
        // A reset query that drops prepared statements (DISCARD ALL, the default, or one that
        // DEALLOCATEs some) leaves the books wrong; dropping them all keeps books and server
        // in step, at the price of a Parse each later.
        let upper = sql.to_ascii_uppercase();
        let drops_statements = upper.contains("DISCARD") || upper.contains("DEALLOCATE");
        if drops_statements && !self.statements.is_empty() && !is_discard_all(sql) {
            let reported = auth::run_simple_query(&mut self.conn, "DEALLOCATE ALL").await?;
            for (name, value) in reported {
                self.set_param(&name, &value);
            }
        }
        if drops_statements {
            self.statements.clear();
            self.entry.set_prepared(0);
        }
        let reported = auth::run_simple_query(&mut self.conn, sql).await?;
        for (name, value) in reported {
            self.set_param(&name, &value);
        }
        if upper.contains("RESET ALL") || is_discard_all(sql) {
            self.session.clear();
            self.session_unknown = false;
            self.matches_client = None;
        } else if upper.contains("SET") || upper.contains("DISCARD") {
            self.session_unknown = true;
            self.matches_client = None;
        }
        Ok(())
    }
}

/// A server connection in transit between workers: the same link, its socket out of any
/// reactor (and so `Send` to another thread), its permit inside.
pub type DetachedLink = ServerLink<DetachedSocket>;

impl ServerLink {
    /// A connection that just logged in to `addr`, holding its permit.
    pub(crate) fn logged_in(
        conn: Framed,
        addr: ServerAddr,
        tcp: TcpSettings,
        outcome: crate::auth::LoginOutcome,
        entry: Arc<ServerEntry>,
        permit: Permit,
    ) -> ServerLink {
        let process_id = outcome.process_id;
        ServerLink {
            born: Instant::now(),
            conn,
            process_id,
            cancel: Arc::new(CancelTarget { addr, process_id, secret_key: outcome.secret_key, tcp }),
            params: outcome.params,
            matches_client: None,
            statements: ServerStatements::default(),
            session: Vec::new(),
            session_unknown: false,
            baseline: Vec::new(),
            generation: entry.generation,
            entry,
            guard: LendGuard::default(),
            permit,
        }
    }
}

impl<C> ServerLink<C> {
    /// The same connection over another form of its socket: besides `logged_in`, which makes
    /// one, the only place that names every field, so that moving a connection moves its
    /// socket and nothing is copied or forgotten.
    fn with_conn<D>(self, convert: impl FnOnce(C) -> std::io::Result<D>) -> std::io::Result<ServerLink<D>> {
        let ServerLink {
            born,
            conn,
            process_id,
            cancel,
            params,
            matches_client,
            generation,
            entry,
            statements,
            session,
            session_unknown,
            baseline,
            guard,
            permit,
        } = self;
        Ok(ServerLink {
            born,
            conn: convert(conn)?,
            process_id,
            cancel,
            params,
            matches_client,
            generation,
            entry,
            statements,
            session,
            session_unknown,
            baseline,
            guard,
            permit,
        })
    }
}

impl ServerLink {
    /// Marks the link as lent out by `home`.
    pub fn lend(&mut self, home: Addr<ServerConnection>) {
        self.guard = LendGuard(Some(home));
    }

    /// The link is back where it belongs (Router or actor).
    pub fn settle(&mut self) {
        self.guard.0 = None;
    }

    /// When the connection was opened.
    pub fn born(&self) -> Instant {
        self.born
    }

    pub fn detach(mut self) -> std::io::Result<DetachedLink> {
        self.settle();
        // Only an idle connection moves, and an idle one has nothing in flight either way.
        if !self.conn.inbox.is_empty() || !self.conn.outbox.is_empty() {
            return Err(std::io::Error::other("server connection has bytes in flight"));
        }
        self.with_conn(|conn| conn.socket.detach())
    }

    /// True when the idle socket has neither closed nor sent anything unasked (a backend
    /// ended by `pg_terminate_backend` or a restart sends a FATAL and closes).
    /// Costs no system call while the reactor has seen nothing: what every lease asks.
    pub fn is_healthy(&self) -> bool {
        let mut probe = [0u8; 1];
        self.conn.inbox.is_empty()
            && matches!(self.conn.socket.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// [`Self::is_healthy`] with a system call: for a connection that just moved to this
    /// worker, whose reactor has not polled its socket yet.
    pub fn is_healthy_now(&self) -> bool {
        self.conn.inbox.is_empty()
            && matches!(self.conn.socket.peek_now(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl DetachedLink {
    /// Registers the socket with this thread's reactor.
    pub fn attach(self) -> std::io::Result<ServerLink> {
        self.with_conn(|socket| Ok(Framed::new(socket.attach()?)))
    }
}

pub use crate::session::AfterLease;

pub struct ServerConnection {
    pool: Arc<PoolShared>,
    router: Addr<Router>,
    /// The permit to log in with, when started; none for a connection adopted from another
    /// worker, whose permit is in its link.
    login: Option<Permit>,
    login_error: Option<PgError>,
    /// Moved to another worker: its census entry went along, so stopping must not remove it.
    retired: bool,
    entry: Arc<ServerEntry>,
}

impl ServerConnection {
    /// A new connection: it logs in when started and checks itself in to `router`.
    pub fn new(pool: Arc<PoolShared>, router: Addr<Router>, permit: Permit) -> ServerConnection {
        // The generation first: settings newer than it only make the server close early.
        let entry = pool.census.enter_server(pool.clone(), pool.connection_generation());
        ServerConnection { pool, router, login: Some(permit), login_error: None, retired: false, entry }
    }

    /// The actor for a connection handed over by another worker, with its permit in its link;
    /// the Router that adopts it keeps the link.
    pub fn adopted(pool: Arc<PoolShared>, router: Addr<Router>, entry: Arc<ServerEntry>) -> ServerConnection {
        ServerConnection { pool, router, login: None, login_error: None, retired: false, entry }
    }
}

/// In Drop, so that a connection whose actor panicked also leaves the census.
impl Drop for ServerConnection {
    fn drop(&mut self) {
        if !self.retired {
            self.pool.census.leave_server(self.entry.id);
        }
    }
}

impl Actor for ServerConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(permit) = self.login.take() else { return };
        let settings = self.pool.settings();
        ctx.spawn(wrap_future(super::server_open::open(settings, self.entry.clone(), permit)).map(
            |result, server: &mut Self, ctx| match result {
                Ok(link) => {
                    server.pool.set_welcome_once(&link.params);
                    log::debug!("pool {}: new server connection {}", server.pool.key, link.process_id);
                    live_router(&mut server.router, &server.pool).do_send(Checkin {
                        server: ctx.address(),
                        link,
                        fresh: true,
                    });
                }
                Err(error) => {
                    server.login_error = Some(error);
                    ctx.stop();
                }
            },
        ));
    }

    /// The permit went with the link (or with a failed login) before this.
    fn stopped(&mut self, ctx: &mut Context<Self>) {
        let login_error = self.login_error.take();
        live_router(&mut self.router, &self.pool).do_send(ServerGone { server: ctx.address(), login_error });
    }
}

impl Handler<Return> for ServerConnection {
    type Result = ();

    fn handle(&mut self, msg: Return, ctx: &mut Context<Self>) {
        let mut link = msg.link;
        link.settle();
        let settings = self.pool.settings();
        let queries: Vec<String> = match msg.after {
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

            // An empty check query (PgBouncer's `<empty>`) is sent as it is.
            AfterLease::Check => settings.server_check_query.iter().cloned().collect(),
        };
        let queries: Vec<String> = match msg.after {
            AfterLease::Check => queries,
            _ => queries.into_iter().filter(|q| !q.trim().is_empty()).collect(),
        };
        let what = if msg.after == AfterLease::Check { "check" } else { "cleanup" };
        link.entry.tested(self.pool.census.clock.now());
        let work = async move {
            for query in &queries {
                link.run(query).await?;
            }
            Ok::<_, BackendLoginError>(link)
        };
        ctx.spawn(wrap_future(work).map(move |result, server: &mut Self, ctx| match result {
            Ok(link) => live_router(&mut server.router, &server.pool).do_send(Checkin {
                server: ctx.address(),
                link,
                fresh: false,
            }),
            Err(e) => {
                log::warn!("pool {}: server {what} failed, closing it: {e}", server.pool.key);
                ctx.stop();
            }
        }));
    }
}

impl Handler<Retire> for ServerConnection {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        self.retired = true;
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
        ctx.stop();
    }
}
