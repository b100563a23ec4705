//! ClientSession: one actor per client connection.
//!
//! The actor is the client's address in the system: it takes [`CancelQuery`] (a CancelRequest
//! with this client's key arrived elsewhere) and [`Kill`]. Its work runs as one future on the
//! actor's arbiter: the login ([`client_login`](super::client_login)), the welcome
//! (ParameterStatus, BackendKeyData, ReadyForQuery), then the [`Relay`] loop until the client
//! leaves. The actor stops when that future ends, and gives back its `max_client_conn` slot
//! and its cancel key.
//!
//! During an online restart ([`super::takeover`]) it also takes [`WakeForHandover`]: its relay
//! looks whether it is idle, and if so the session hands its client to the new process. A
//! session started by [`ClientSession::moved_in`] is the other end: a client moved here, served
//! from its next query without a login.

use std::rc::Rc;
use std::sync::Arc;

use actix::fut::wrap_future;
use actix::prelude::*;
use bytes::BytesMut;

use crate::actors::census::{ClientEntry, ClientLogin};
use crate::actors::client_login::{accept, Accepted, ConsoleLogin, LoginError, Wire};
use crate::actors::console::Console;
use crate::actors::control::ADMIN_DATABASES;
use crate::actors::messages::{CancelQuery, Kill};
use crate::actors::registry::Shared;
use crate::actors::relay::{send_cancel, CancelState, Control, HandedOver, Relay, RelayEnd};
use crate::actors::replication::{self, Replication, ReplicationPipe};
use crate::actors::router::shared_local_router;
use crate::actors::takeover::{self, WakeForHandover};
use crate::local_queue::{local_queue, LocalReceiver, LocalSender};
use crate::net::{Endpoint, Framed, Socket};
use crate::params::TrackedParams;
use crate::protocol::backend;
use crate::protocol::cancel_key::{KeyId, SecretKey};
use crate::protocol::error::sqlstate;
use crate::protocol::prepared::ClientStatements;
use crate::protocol::PgError;
use crate::takeover::{MovedClient, MovedStatement, ParamSet};

pub struct ClientSession {
    shared: Arc<Shared>,
    socket: Option<Socket>,
    cancel: Rc<CancelState>,
    control: LocalSender<Control>,
    control_rx: Option<LocalReceiver<Control>>,
    holdings: Rc<Holdings>,
    /// This client in the census (SHOW CLIENTS), from the moment it connected.
    entry: Option<Arc<ClientEntry>>,
    /// A client moved here by an online restart, with what its session held.
    moved: Option<Box<MovedClient>>,
}

impl ClientSession {
    pub fn new(shared: Arc<Shared>, socket: Socket) -> ClientSession {
        let (control, control_rx) = local_queue();
        ClientSession {
            shared,
            socket: Some(socket),
            cancel: Rc::new(CancelState::default()),
            control,
            control_rx: Some(control_rx),
            holdings: Rc::default(),
            entry: None,
            moved: None,
        }
    }

    /// A client the process this one took over from handed over, idle between transactions.
    pub fn moved_in(shared: Arc<Shared>, socket: Socket, moved: Box<MovedClient>) -> ClientSession {
        let mut session = ClientSession::new(shared, socket);
        session.moved = Some(moved);
        session
    }
}

impl Actor for ClientSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (Some(socket), Some(control_rx)) = (self.socket.take(), self.control_rx.take()) else {
            ctx.stop();
            return;
        };
        let unix_port = self.shared.config().general.listen_port;
        let (remote, local) = socket.endpoints(unix_port);
        let remote_pid = socket.peer_credentials().map_or(0, |(_, pid)| pid);
        let entry = self.shared.census.enter_client(ctx.address(), remote, local, remote_pid);
        self.entry = Some(entry.clone());
        let session = Session {
            entry,
            shared: self.shared.clone(),
            cancel: self.cancel.clone(),
            holdings: self.holdings.clone(),
        };
        // Two futures, one after the other, so that an idle session keeps only the relay's
        // state, not the login's.
        let login: std::pin::Pin<Box<dyn std::future::Future<Output = _>>> = match self.moved.take() {
            Some(moved) => Box::pin(session.moved_in(socket, control_rx, moved)),
            None => Box::pin(session.login(socket, control_rx)),
        };
        ctx.spawn(wrap_future(login).map(|serve, session: &mut Self, ctx: &mut Context<Self>| match serve {
            Ok(Serve::Relay(relay)) => {
                let run = relay.run();
                log::trace!("relay future: {} bytes", std::mem::size_of_val(&run));
                ctx.spawn(wrap_future(run).map(|end, session: &mut Self, ctx: &mut Context<Self>| {
                    let reason = match end {
                        RelayEnd::Closed(reason) => reason,
                        RelayEnd::Moved(handed) => session.move_out(*handed),
                    };
                    session.closing(&reason);
                    ctx.stop()
                }));
            }
            Ok(Serve::Replication(pipe)) => {
                ctx.spawn(wrap_future(pipe.run()).map(
                    |reason, session: &mut Self, ctx: &mut Context<Self>| {
                        session.closing(&reason);
                        ctx.stop()
                    },
                ));
            }
            Ok(Serve::Console(console)) => {
                ctx.spawn(wrap_future(console.run()).map(
                    |_, session: &mut Self, ctx: &mut Context<Self>| {
                        session.closing("client close request");
                        ctx.stop()
                    },
                ));
            }
            Err(reason) => {
                if let Some(reason) = reason {
                    session.closing(&reason);
                }
                ctx.stop()
            }
        }));
    }
}

impl ClientSession {
    /// `log_disconnections`: why the client went, and how long it stayed.
    fn closing(&self, reason: &str) {
        let Some(entry) = &self.entry else { return };
        if self.shared.config().general.log_disconnections {
            let age = self.shared.census.clock.since(entry.connected).as_secs();
            log::info!("{} closing because: {reason} (age={age}s)", entry.describe());
        }
    }
}

/// What a session holds in the process's shared books, given back when its actor goes: one
/// allocation, shared by the actor and its login future.
#[derive(Default)]
struct Holdings {
    /// It holds a `max_client_conn` slot.
    admitted: std::cell::Cell<bool>,
    cancel_key: std::cell::Cell<Option<KeyId>>,
    /// (database, user) this client is counted under once logged in.
    counted: std::cell::RefCell<Option<(String, String)>>,
}

/// In Drop rather than `stopped`: a session whose code panicked is dropped without being
/// stopped, and must still give back its `max_client_conn` slot, its cancel key and its
/// per-database and per-user counts.
impl Drop for ClientSession {
    fn drop(&mut self) {
        if self.holdings.admitted.get() {
            self.shared.client_left();
        }
        if let Some(key) = self.holdings.cancel_key.get() {
            self.shared.forget_cancel_key(key);
        }
        if let Some((database, user)) = self.holdings.counted.borrow_mut().take() {
            self.shared.login_left(&database, &user);
        }
        if let Some(entry) = &self.entry {
            self.shared.census.leave_client(entry.id);
        }
    }
}

impl ClientSession {
    /// Hands the client to the new process: its socket, and what its session holds. Returns
    /// what the log says of it.
    fn move_out(&mut self, handed: HandedOver) -> String {
        let HandedOver { client, params, initial_params, statements } = handed;
        let (Some(entry), Some(key)) = (&self.entry, self.holdings.cancel_key.get()) else {
            return "online restart: a client without a login cannot move".into();
        };
        let (Some(login), Some(secret)) = (entry.login(), self.shared.cancel_secret(key)) else {
            return "online restart: a client without a login cannot move".into();
        };
        let set =
            |p: &TrackedParams| ParamSet { reported: p.reported().to_vec(), session: p.session().to_vec() };
        let moved = MovedClient {
            database: login.database.clone(),
            user: login.user.clone(),
            application_name: entry.application_name(),
            process_id: key.process_id,
            secret_key: secret.as_bytes().to_vec(),
            params: set(&params),
            initial_params: set(&initial_params),
            statements: statements
                .entries()
                .map(|(name, def)| MovedStatement {
                    name: name.to_string(),
                    query: def.query.clone(),
                    param_types: def.param_types.clone(),
                })
                .collect(),
        };
        let sent = client
            .socket
            .detach()
            .map_err(|e| e.to_string())
            .and_then(|socket| takeover::send_moved(moved, socket));
        match sent {
            Ok(()) => "moved to the new process (online restart)".into(),
            Err(e) => format!("online restart: could not move ({e})"),
        }
    }
}

impl Handler<WakeForHandover> for ClientSession {
    type Result = ();

    fn handle(&mut self, _: WakeForHandover, _: &mut Context<Self>) {
        self.control.send(Control::HandOver);
    }
}

impl Handler<Kill> for ClientSession {
    type Result = ();

    fn handle(&mut self, msg: Kill, _: &mut Context<Self>) {
        self.control.send(Control::Kill(Box::new(msg.0)));
    }
}

impl Handler<CancelQuery> for ClientSession {
    type Result = ();

    fn handle(&mut self, _: CancelQuery, ctx: &mut Context<Self>) {
        let Some(target) = self.cancel.target.borrow().clone() else {
            return; // Nothing running on a server: nothing to cancel.
        };
        self.cancel.in_flight.set(self.cancel.in_flight.get() + 1);
        let entry = self.entry.clone();
        if let Some(entry) = &entry {
            entry.cancel_sent();
        }
        let cancel = self.cancel.clone();
        let control = self.control.clone();
        let wait = self.shared.config().general.cancel_wait_timeout;
        ctx.spawn(wrap_future(async move {
            let sent = match wait.is_zero() {
                true => Ok(send_cancel(&target).await),
                false => tokio::time::timeout(wait, send_cancel(&target)).await,
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("could not forward cancel request to {}: {e}", target.addr),
                Err(_) => {
                    // The request may still reach PostgreSQL later and cancel whatever runs on
                    // that server then: the client goes, and its server is closed, not reused.
                    log::warn!("cancel request to {} not delivered within cancel_wait_timeout", target.addr);
                    control.send(Control::Kill(Box::new(PgError::fatal(
                        sqlstate::CONNECTION_FAILURE,
                        "cancel request could not be delivered within cancel_wait_timeout",
                    ))));
                    return;
                }
            }
            cancel.in_flight.set(cancel.in_flight.get().saturating_sub(1));
            if let Some(entry) = &entry {
                entry.cancel_delivered();
            }
            control.send(Control::CancelDelivered);
        }));
    }
}

/// What serves a client once it has logged in. Moved once, right after login, so the size
/// difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Serve {
    Relay(Relay),
    Console(Console),
    Replication(ReplicationPipe),
}

/// The session's login and welcome, run as a future on the actor's arbiter.
struct Session {
    entry: Arc<ClientEntry>,
    shared: Arc<Shared>,
    cancel: Rc<CancelState>,
    holdings: Rc<Holdings>,
}

impl Session {
    /// A client moved here by an online restart: counted, filed under its own cancel key, and
    /// served by a relay that starts with its parameters and statements, without a login.
    async fn moved_in(
        self,
        socket: Socket,
        control_rx: LocalReceiver<Control>,
        moved: Box<MovedClient>,
    ) -> Result<Serve, Option<String>> {
        let MovedClient {
            database,
            user,
            application_name,
            process_id,
            secret_key,
            params,
            initial_params,
            statements,
        } = *moved;
        let mut conn = Framed::new(socket);
        // The process it comes from admitted it: no limit turns it away now.
        self.shared.count_moved_client(&database, &user);
        self.holdings.admitted.set(true);
        self.holdings.counted.replace(Some((database.clone(), user.clone())));
        let statements =
            ClientStatements::restore(statements.into_iter().map(|s| (s.name, s.query, s.param_types)));
        let member = self.shared.pool(&database, &user);
        let (member, statements) = match (member, statements) {
            (Ok(member), Ok(statements)) => (member, statements),
            (Err(error), _) => {
                error.encode(&mut conn.outbox);
                conn.say_goodbye().await;
                return Err(Some(error.message));
            }
            (_, Err(error)) => return Err(Some(error.to_string())),
        };
        let pool = member.pool().clone();
        self.entry.logged_in(
            ClientLogin { database, user, pool: Some(pool.clone()), replication: Replication::None },
            &application_name,
        );
        if self.shared.config().general.log_connections {
            log::info!("{} moved in from the process this one took over from", self.entry.describe());
        }
        if let Some(key) = SecretKey::from_bytes(&secret_key)
            .and_then(|secret| self.shared.adopt_cancel_key(self.entry.clone(), process_id, secret))
        {
            self.holdings.cancel_key.set(Some(key));
        }
        let config = self.shared.config();
        let mut relay = Relay::new(
            conn,
            member,
            shared_local_router(&pool),
            TrackedParams::default(),
            self.cancel.clone(),
            control_rx,
            config.general.max_packet_size,
            self.entry.clone(),
        );
        let params = TrackedParams::from_parts(params.reported, params.session).share(&pool.shared_params);
        let initial = TrackedParams::from_parts(initial_params.reported, initial_params.session);
        relay.restore(params, initial, statements);
        Ok(Serve::Relay(relay))
    }
}

/// Why a login was cut short.
enum LoginCut {
    /// `client_login_timeout`.
    Timeout,
    /// Newer connections pushed it out (`Shared::start_login`).
    Crowded,
}

impl Session {
    /// Logs the client in and greets it; returns what serves it from then on (a relay, or the
    /// console), or None when the connection is over (refused, a cancel request, gone).
    /// Err carries the reason to log when a refused client is disconnected.
    async fn login(
        self,
        socket: Socket,
        control_rx: LocalReceiver<Control>,
    ) -> Result<Serve, Option<String>> {
        let mut wire = Wire::new(socket);
        let mut admitted = false;
        // client_login_timeout: a client that does not finish logging in is disconnected.
        let limit = match self.shared.config().general.client_login_timeout {
            t if t.is_zero() => std::time::Duration::from_secs(u32::MAX as u64),
            t => t,
        };
        let pending = self.shared.start_login();
        let attempt = tokio::time::timeout(limit, accept(&mut wire, &self.shared, &mut admitted));
        let login = tokio::select! {
            login = attempt => login.map_err(|_| LoginCut::Timeout),
            () = pending.evicted() => Err(LoginCut::Crowded),
        };
        drop(pending);
        self.holdings.admitted.set(admitted);
        let login = match login {
            Ok(Ok(Accepted::Login(login))) => login,
            Ok(Ok(Accepted::Console(login))) => return self.console(wire, control_rx, login).await,
            Ok(Ok(Accepted::Cancel { process_id, secret_key })) => {
                self.shared.cancel(process_id, &secret_key).await;
                return Err(None);
            }
            Ok(Err(LoginError::Refused(error))) => return Err(self.refuse(&mut wire, error).await),
            Ok(Err(LoginError::Gone)) => return Err(None),
            // Closed without a word: the client may not even speak the protocol yet.
            Err(LoginCut::Timeout) => return Err(Some("client_login_timeout".into())),
            Err(LoginCut::Crowded) => {
                return Err(Some(
                    "evicted: max_client_conn connections were logging in, and this one for longest".into(),
                ))
            }
        };
        let mut login = login;
        if self.shared.config().general.application_name_add_host {
            add_host(&mut login.startup, &self.entry.remote);
        }
        // The peer's address costs a system call: only asked for when it is logged.
        if log::log_enabled!(log::Level::Debug) {
            log::debug!("client {}: login as {} to {}", wire.conn.socket.peer(), login.user, login.database);
        }
        if let Err(error) = self.shared.admit_login(&login.database, &login.user) {
            wire.conn.outbox.clear();
            return Err(self.refuse(&mut wire, error).await);
        }
        self.holdings.counted.replace(Some((login.database.clone(), login.user.clone())));
        if let Some(tls) = &wire.tls {
            self.entry.set_tls(tls.description.clone());
        }
        let application_name = login.startup.iter().find(|(n, _)| n == "application_name");
        self.entry.logged_in(
            ClientLogin {
                database: login.database.clone(),
                user: login.user.clone(),
                pool: Some(login.member.pool().clone()),
                replication: login.replication,
            },
            application_name.map_or("", |(_, v)| v.as_str()),
        );
        self.logged_in(&login.database, &login.user, login.replication);

        let (key, process_id, secret_key) =
            self.shared.register_cancel_key(self.entry.clone(), login.protocol_minor);
        self.holdings.cancel_key.set(Some(key));
        if login.replication != Replication::None {
            let pool = login.member.pool().clone();
            let key = (process_id, &secret_key);
            return match replication::open(&pool, login.replication, &login.startup, &mut wire.conn, key)
                .await
            {
                Ok(server) => Ok(Serve::Replication(ReplicationPipe {
                    client: wire.conn,
                    server,
                    control_rx,
                    member: login.member,
                })),
                Err(error) => {
                    self.pooler_error(&error);
                    Err(self.refuse(&mut wire, error).await)
                }
            };
        }
        let config = self.shared.config();
        let router = shared_local_router(login.member.pool());
        let pool = login.member.pool().clone();
        let mut relay = Relay::new(
            wire.conn,
            login.member,
            router,
            TrackedParams::default(),
            self.cancel.clone(),
            control_rx,
            config.general.max_packet_size,
            self.entry.clone(),
        );
        let welcome = match relay.welcome().await {
            Ok(welcome) => welcome,
            Err(error) => {
                self.pooler_error(&error);
                let mut buf = BytesMut::new();
                error.encode(&mut buf);
                relay.queue_to_client(&buf);
                relay.run_closing().await;
                return Err(Some(error.message));
            }
        };
        let (reported, tracked) = TrackedParams::for_new_client(&welcome, &login.startup);
        let tracked = tracked.share(&pool.shared_params);
        let mut hello = BytesMut::new();
        for (name, value) in &reported {
            backend::parameter_status(&mut hello, name, value);
        }
        backend::backend_key_data(&mut hello, process_id, secret_key.as_bytes());
        backend::ready_for_query(&mut hello, b'I');
        relay.queue_to_client(&hello);
        relay.set_params(tracked);
        Ok(Serve::Relay(relay))
    }

    /// `log_connections`: a client logged in.
    fn logged_in(&self, database: &str, user: &str, replication: Replication) {
        if self.shared.config().general.log_connections {
            log::info!(
                "{} login attempt: db={database} user={user} tls={} replication={}",
                self.entry.describe(),
                match self.entry.tls() {
                    "" => "no",
                    tls => tls,
                },
                match replication {
                    Replication::None => "no",
                    Replication::Physical => "yes",
                    Replication::Logical => "database",
                }
            );
        }
    }

    /// `log_pooler_errors`: an error pgcorral itself sends a client.
    fn pooler_error(&self, error: &PgError) {
        if self.shared.config().general.log_pooler_errors {
            log::warn!("{} pooler error: {}", self.entry.describe(), error.message);
        }
    }

    /// Tells the client why it is refused; returns the reason for the log.
    async fn refuse(&self, wire: &mut Wire, error: PgError) -> Option<String> {
        self.pooler_error(&error);
        error.encode(&mut wire.conn.outbox);
        wire.conn.say_goodbye().await;
        Some(error.message)
    }

    async fn console(
        self,
        mut wire: Wire,
        control_rx: LocalReceiver<Control>,
        login: ConsoleLogin,
    ) -> Result<Serve, Option<String>> {
        let ConsoleLogin { user, database, startup, role, protocol_minor } = login;
        if let Err(error) = self.shared.admit_login(&database, &user) {
            wire.conn.outbox.clear();
            return Err(self.refuse(&mut wire, error).await);
        }
        log::debug!("client {}: console login as {user} ({role:?})", wire.conn.socket.peer());
        // Counted under the name PgBouncer lists the console as.
        let listed = ADMIN_DATABASES[0].to_string();
        self.holdings.counted.replace(Some((database.clone(), user.clone())));
        let application_name = startup.iter().find(|(n, _)| n == "application_name");
        self.entry.logged_in(
            ClientLogin { database: listed, user, pool: None, replication: Replication::None },
            application_name.map_or("", |(_, v)| v.as_str()),
        );
        let (key, process_id, secret_key) =
            self.shared.register_cancel_key(self.entry.clone(), protocol_minor);
        self.holdings.cancel_key.set(Some(key));
        let Wire { mut conn, tls } = wire;
        if let Some(tls) = tls {
            self.entry.set_tls(tls.description);
        }
        for (name, value) in CONSOLE_PARAMETERS {
            backend::parameter_status(&mut conn.outbox, name, value);
        }
        backend::backend_key_data(&mut conn.outbox, process_id, secret_key.as_bytes());
        backend::ready_for_query(&mut conn.outbox, b'I');
        let console = Console::new(conn, self.shared.clone(), role, control_rx, self.entry.clone());
        let user = self.entry.login().map_or(String::new(), |l| l.user.clone());
        self.logged_in(ADMIN_DATABASES[0], &user, Replication::None);
        Ok(Serve::Console(console))
    }
}

/// `application_name_add_host`: the client's address goes at the end of the application_name
/// it logs in with (as PgBouncer writes it, even when it had none), so that PostgreSQL's
/// pg_stat_activity and logs show where a query came from.
fn add_host(startup: &mut Vec<(String, String)>, remote: &Endpoint) {
    let suffix = format!(" - {}:{}", remote.addr, remote.port);
    match startup.iter_mut().find(|(name, _)| name == "application_name") {
        Some((_, value)) => value.push_str(&suffix),
        None => startup.push(("application_name".into(), suffix)),
    }
}

/// What the console reports about itself at login, as PgBouncer's does.
const CONSOLE_PARAMETERS: [(&str, &str); 7] = [
    ("server_version", "1.25.1/bouncer"),
    ("client_encoding", "UTF8"),
    ("server_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "GMT"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "on"),
];
