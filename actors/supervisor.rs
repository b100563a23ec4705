//! Supervisor: the root of the actor system.
//!
//! Owns the configuration, the registry of pools ([`Shared`]), the worker arbiters and signal
//! handling. At start it runs one arbiter per worker, tells each its worker slot, and starts
//! the Listeners there. Takes [`Reload`] (also sent by SIGHUP): the configuration and auth_file
//! are re-read and applied; a file with an error is rejected whole and the running
//! configuration stays. Takes [`Shutdown`] (also sent by signals): SIGINT waits until every
//! server is back in its pool, SIGTERM until every client has left, SIGQUIT or a second
//! request exits at once. SIGUSR1 pauses and SIGUSR2 resumes, as the console's PAUSE and
//! RESUME. Every `stats_period` it moves the statistics window on and logs the stats line.
//!
//! Server connections heal themselves through their Router: a connection that dies gives its
//! permit back and its Router opens a replacement when clients need one; the Pool actor keeps
//! `min_pool_size` warm. actix restarts no actor that panicked, so Router and Pool catch their
//! own panics and restart in place. As a last resort for an actor stopped some other way, the
//! Supervisor checks every second that each pool's Pool actor lives and starts a new one if
//! not, and a dead Router is replaced on its worker by the next client or server that needs it
//! ([`crate::actors::router::live_router`]).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::fut::wrap_future;
use actix::prelude::*;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::actors::census::{ClientState, ServerState};
use crate::actors::control;
use crate::actors::inspect;
use crate::actors::listener::{BoundListener, Listener, StopAccepting};
use crate::actors::messages::{Kill, Reload, Shutdown};
use crate::actors::metrics_server::{MetricsServer, StopServing};
use crate::actors::registry::Shared;
use crate::actors::router::set_worker_index;
use crate::actors::takeover::{self, BeginHandover, TakeBack};
use crate::admin::command::ShutdownMode;
use crate::config::{self, Config};
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;
use crate::stats;
use crate::takeover::ListenerKind;

/// The signals the daemon handles, installed before anything else happens: until a handler
/// exists, a SIGHUP or SIGTERM would kill the process and leave its pidfile behind.
pub struct Signals {
    hup: Signal,
    int: Signal,
    term: Signal,
    quit: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    /// Must run inside the actor system's runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// How often shared actors are checked for having died.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// How often a graceful shutdown checks whether it may exit.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

pub struct Supervisor {
    shared: Arc<Shared>,
    signals: Option<Signals>,
    config_path: PathBuf,
    /// Per worker, the listeners to run there.
    listeners: Vec<Vec<BoundListener>>,
    workers: Vec<Arbiter>,
    accepting: Vec<Addr<Listener>>,
    /// A graceful shutdown under way (its poll, which exits when the mode's condition holds):
    /// a second request exits at once; RESUME cancels it.
    shutdown: Option<(ShutdownMode, SpawnHandle)>,
    /// `metrics_addr`'s socket, until the MetricsServer takes it.
    metrics: Option<std::net::TcpListener>,
    metrics_server: Option<Addr<MetricsServer>>,
    /// A second descriptor of every listening socket, for an online restart to hand over
    /// (the same socket, so its accept queue goes with it). Dropped when a shutdown begins,
    /// or the sockets would stay open, queueing connections nobody accepts.
    handover_fds: Vec<(ListenerKind, OwnedFd)>,
    /// The takeover socket a later `pgcorral -R` connects to, and its path.
    takeover_socket: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    /// Started with `-R`: the process taken over from, whose clients are on their way.
    inherited: Option<takeover::Inherited>,
}

impl Supervisor {
    pub fn new(
        shared: Arc<Shared>,
        signals: Signals,
        config_path: PathBuf,
        listeners: Vec<Vec<BoundListener>>,
        metrics: Option<std::net::TcpListener>,
    ) -> Supervisor {
        Supervisor {
            shared,
            signals: Some(signals),
            config_path,
            listeners,
            workers: Vec::new(),
            accepting: Vec::new(),
            shutdown: None,
            metrics_server: None,
            handover_fds: Vec::new(),
            takeover_socket: None,
            inherited: None,
            metrics,
        }
    }

    /// The online restart's two ends: the socket a later `-R` takes this process over by, and
    /// (started with `-R`) the process this one takes over from.
    pub fn with_takeover(
        mut self,
        socket: Option<(std::os::unix::net::UnixListener, PathBuf)>,
        inherited: Option<takeover::Inherited>,
    ) -> Supervisor {
        self.takeover_socket = socket;
        self.inherited = inherited;
        self
    }

    fn watch_signals(&mut self, ctx: &mut Context<Self>) {
        let me = ctx.address();
        let Some(Signals { mut hup, mut int, mut term, mut quit, mut usr1, mut usr2 }) = self.signals.take()
        else {
            return;
        };
        let shared = self.shared.clone();
        let signals = async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        log::info!("got SIGHUP, reloading configuration");
                        let _ = me.send(Reload).await;
                    }
                    _ = int.recv() => {
                        log::info!("got SIGINT, shutting down once servers are back in their pools");
                        me.do_send(Shutdown(ShutdownMode::WaitForServers));
                    }
                    _ = term.recv() => {
                        log::info!("got SIGTERM, shutting down once clients have left");
                        me.do_send(Shutdown(ShutdownMode::WaitForClients));
                    }
                    _ = quit.recv() => {
                        log::info!("got SIGQUIT, exiting now");
                        me.do_send(Shutdown(ShutdownMode::Now));
                    }
                    _ = usr1.recv() => {
                        log::info!("got SIGUSR1, pausing");
                        let shared = shared.clone();
                        actix::spawn(async move {
                            if let Err(e) = control::pause(&shared, None).await {
                                log::warn!("SIGUSR1: {}", e.message);
                            }
                        });
                    }
                    _ = usr2.recv() => {
                        log::info!("got SIGUSR2, resuming");
                        let shared = shared.clone();
                        actix::spawn(async move {
                            if let Err(e) = control::resume_all(&shared, None).await {
                                log::warn!("SIGUSR2: {}", e.message);
                            }
                        });
                    }
                }
            }
        };
        ctx.spawn(wrap_future(signals));
    }

    /// Every `stats_period`: moves the averages window on, and logs PgBouncer's stats line
    /// when `log_stats` is on.
    fn stats_tick(&mut self, ctx: &mut Context<Self>) {
        let period = self.shared.config().general.stats_period.max(Duration::from_secs(1));
        ctx.run_later(period, |supervisor, ctx| {
            let shared = &supervisor.shared;
            let current = inspect::totals_per_database(shared).into_iter().collect();
            let averages = shared.stats_window.lock().refresh(current);
            if shared.config().general.log_stats {
                log::info!("{}", stats::log_line(&averages));
            }
            supervisor.stats_tick(ctx);
        });
    }

    /// Stops accepting, then exits when `ready` says so. Under WAIT_FOR_SERVERS, a client that
    /// waits for a server is told the server is shutting down and let go, as PgBouncer does:
    /// the pools are paused, so it would wait for nothing.
    fn shut_down_when(&mut self, ctx: &mut Context<Self>, mode: ShutdownMode, ready: fn(&Shared) -> bool) {
        for listener in self.accepting.drain(..) {
            listener.do_send(StopAccepting);
        }
        self.handover_fds.clear();
        let poll = ctx.run_interval(SHUTDOWN_POLL, move |supervisor, _| {
            if mode == ShutdownMode::WaitForServers {
                for client in supervisor.shared.census.clients() {
                    if client.state() == ClientState::Waiting {
                        client
                            .session
                            .do_send(Kill(PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "server shutting down")));
                    }
                }
            }
            if ready(&supervisor.shared) {
                log::info!("shutdown complete");
                System::current().stop();
            }
        });
        self.shutdown = Some((mode, poll));
    }

    /// Starts a Listener actor for each socket, on the worker it belongs to.
    fn start_listeners(&mut self, listeners: Vec<Vec<BoundListener>>) {
        for (worker, listeners) in self.workers.iter().zip(listeners) {
            for bound in listeners {
                let dup = match &bound {
                    BoundListener::Tcp(l) => l.try_clone().map(|l| (ListenerKind::Tcp, OwnedFd::from(l))),
                    BoundListener::Unix(l) => l.try_clone().map(|l| (ListenerKind::Unix, OwnedFd::from(l))),
                };
                match dup {
                    Ok(dup) => self.handover_fds.push(dup),
                    Err(e) => log::warn!("an online restart could not take over a listening socket: {e}"),
                }
                let shared = self.shared.clone();
                let listener =
                    Listener::start_in_arbiter(&worker.handle(), move |_| Listener::new(shared, bound));
                self.accepting.push(listener);
            }
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.shared.set_supervisor(ctx.address());
        self.watch_signals(ctx);
        let listeners = std::mem::take(&mut self.listeners);
        for index in 0..listeners.len() {
            let arbiter = Arbiter::new();
            arbiter.spawn_fn(move || set_worker_index(index));
            self.workers.push(arbiter);
        }
        self.start_listeners(listeners);
        self.shared.set_worker_arbiters(self.workers.iter().map(Arbiter::handle).collect());
        if let Some(inherited) = self.inherited.take() {
            inherited
                .receive_clients(self.shared.clone(), self.workers.iter().map(Arbiter::handle).collect());
        }
        if let Some((listener, path)) = self.takeover_socket.take() {
            takeover::serve(listener, path, self.shared.clone(), ctx.address());
        }
        log::info!("pgcorral started with {} workers", self.workers.len());
        ctx.run_interval(WATCH_PERIOD, |supervisor, _| {
            supervisor.shared.revive_pools();
            supervisor.shared.free_unused_pools();
        });
        self.stats_tick(ctx);
        if let Some(listener) = self.metrics.take() {
            if let Ok(dup) = listener.try_clone() {
                self.handover_fds.push((ListenerKind::Metrics, OwnedFd::from(dup)));
            }
            self.metrics_server = Some(MetricsServer::new(self.shared.clone(), listener).start());
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for worker in &self.workers {
            worker.stop();
        }
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) {
        if self.shutdown.is_some() || msg.0 == ShutdownMode::Now {
            log::info!("exiting now");
            System::current().stop();
            return;
        }
        self.shared.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
        crate::daemon::notify_systemd("STOPPING=1");
        match msg.0 {
            ShutdownMode::WaitForServers => {
                // PgBouncer's SIGINT: pause (transactions under way finish, servers close as
                // they come back), exit once no server is left lent.
                control::hold_all_for_shutdown(&self.shared);
                self.shut_down_when(ctx, msg.0, |shared| {
                    shared
                        .census
                        .servers()
                        .iter()
                        .all(|s| !matches!(s.state(), ServerState::Active | ServerState::Tested))
                });
            }
            ShutdownMode::WaitForClients | ShutdownMode::Now => {
                self.shut_down_when(ctx, msg.0, |shared| {
                    shared
                        .census
                        .clients()
                        .iter()
                        .all(|c| c.login().is_some_and(|login| login.pool.is_none()))
                });
            }
        }
    }
}

/// RESUME (or SIGUSR2) during a graceful shutdown: PgBouncer cancels the shutdown. pgcorral
/// also listens again, since a pooler that stays up without listening would serve nobody new;
/// if its sockets cannot be bound again (another process took the port), the shutdown goes on
/// and the caller is told why.
#[derive(Message)]
#[rtype(result = "Result<bool, String>")]
pub struct CancelShutdown;

impl Handler<CancelShutdown> for Supervisor {
    /// Ok(false): no shutdown was under way.
    type Result = Result<bool, String>;

    fn handle(&mut self, _: CancelShutdown, ctx: &mut Context<Self>) -> Result<bool, String> {
        let Some((mode, _)) = &self.shutdown else { return Ok(false) };
        if takeover::handing_over() {
            return Err("a new process took over; its clients are moving there".into());
        }
        let mode = *mode;
        let config = self.shared.config();
        let listeners = crate::daemon::bind_listeners(&config.general, self.workers.len()).map_err(|e| {
            log::warn!("cannot cancel the shutdown: {e}");
            format!("cannot cancel the shutdown, the sockets cannot be bound again: {e}")
        })?;
        if let Some((_, poll)) = self.shutdown.take() {
            ctx.cancel_future(poll);
        }
        self.start_listeners(listeners);
        self.shared.shutting_down.store(false, std::sync::atomic::Ordering::Relaxed);
        crate::daemon::notify_systemd("READY=1");
        log::info!("canceling shutdown ({mode:?}): listening again");
        Ok(true)
    }
}

/// A new process takes over (`pgcorral -R`): it gets the listening sockets, this process stops
/// accepting, and exits once every client that can move has moved (the others, which hold a
/// server for their whole session, finish here first).
impl Handler<BeginHandover> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: BeginHandover, ctx: &mut Context<Self>) {
        if self.shutdown.is_some() {
            let _ = msg.reply.send(Err("the running process is shutting down".into()));
            return;
        }
        let fds = std::mem::take(&mut self.handover_fds);
        if msg.reply.send(Ok(fds)).is_err() {
            return;
        }
        if let Some(metrics) = self.metrics_server.take() {
            metrics.do_send(StopServing);
        }
        self.shared.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
        crate::daemon::notify_systemd("STOPPING=1");
        for listener in self.accepting.drain(..) {
            listener.do_send(StopAccepting);
        }
        let poll = ctx.run_interval(SHUTDOWN_POLL, |supervisor, ctx| {
            let left =
                supervisor.shared.census.clients().iter().any(|c| c.login().is_none_or(|l| l.pool.is_some()));
            if !left {
                if let Some((_, poll)) = supervisor.shutdown.take() {
                    ctx.cancel_future(poll);
                }
                // The takeover thread stops the system once the new process has heard.
                if !takeover::finish() {
                    log::info!("shutdown complete");
                    System::current().stop();
                }
            }
        });
        self.shutdown = Some((ShutdownMode::WaitForClients, poll));
    }
}

impl Handler<TakeBack> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: TakeBack, ctx: &mut Context<Self>) {
        if let Some((_, poll)) = self.shutdown.take() {
            ctx.cancel_future(poll);
        }
        let (mut tcp, mut unix, mut metrics) = (Vec::new(), None, None);
        for (kind, fd) in msg.0 {
            match kind {
                ListenerKind::Tcp => tcp.push(std::net::TcpListener::from(fd)),
                ListenerKind::Unix => unix = Some(std::os::unix::net::UnixListener::from(fd)),
                ListenerKind::Metrics => metrics = Some(std::net::TcpListener::from(fd)),
            }
        }
        self.start_listeners(takeover::per_worker(tcp, unix, self.workers.len()));
        if let Some(listener) = metrics {
            if let Ok(dup) = listener.try_clone() {
                self.handover_fds.push((ListenerKind::Metrics, OwnedFd::from(dup)));
            }
            self.metrics_server = Some(MetricsServer::new(self.shared.clone(), listener).start());
        }
        self.shared.shutting_down.store(false, std::sync::atomic::Ordering::Relaxed);
        crate::daemon::notify_systemd("READY=1");
        // The takeover socket's path was removed for the new process: a later -R needs it.
        match takeover::bind_after_failed_takeover(&self.shared.config().general) {
            Ok(Some(listener)) => {
                if let Some(path) = takeover::socket_path(&self.shared.config().general) {
                    takeover::serve(listener, path, self.shared.clone(), ctx.address());
                }
            }
            Ok(None) => {}
            Err(e) => log::warn!("a later online restart cannot reach this process: {e}"),
        }
    }
}

impl Handler<Reload> for Supervisor {
    type Result = Result<(), String>;

    /// Applies the difference and logs it, one line per change; keys that need a restart keep
    /// their running values. A file with an error changes nothing.
    fn handle(&mut self, _: Reload, _: &mut Context<Self>) -> Result<(), String> {
        match Config::load(&self.config_path) {
            Ok((mut config, warnings)) => {
                for warning in &warnings {
                    log::warn!("{warning}");
                }
                let running = self.shared.config();
                let diff = config::diff::diff(&running, &config);
                config::diff::keep_restart_only(&running, &mut config, &diff.need_restart);
                for change in &diff.changes {
                    log::info!("reload: {change}");
                }
                crate::logging::reopen(config.general.logfile.as_deref());
                crate::logging::set_verbose(config.general.verbose);
                self.shared.set_config(config);
                for database in &diff.removed_databases {
                    self.shared.database_removed(database);
                }
                log::info!(
                    "configuration reloaded from {} ({} changes)",
                    self.config_path.display(),
                    diff.changes.len()
                );
                Ok(())
            }
            Err(e) => {
                log::error!("reload failed, keeping the running configuration: {e}");
                Err(e.to_string())
            }
        }
    }
}
