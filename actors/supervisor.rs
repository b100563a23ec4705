//! Supervisor: the root of the actor system.
//!
//! Owns the configuration, the registry of pools ([`Shared`]), the worker arbiters and signal
//! handling. At start it runs one arbiter per worker, tells each its worker slot, and starts
//! the Listeners there. Takes [`Reload`] (also sent by SIGHUP): the configuration and auth_file
//! are re-read and applied; a file with an error is rejected whole and the running
//! configuration stays. SIGINT and SIGTERM stop the system.
//!
//! Server connections heal themselves through their Router: a ServerConnection that dies
//! releases its permit and its Router opens a replacement when clients need one; the Pool actor
//! keeps `min_pool_size` warm. actix restarts no actor that panicked, so the Supervisor checks
//! every second that each pool's Pool actor lives and starts a new one if not; a Router that
//! died is replaced on its worker by the next client or server that needs it
//! ([`crate::actors::router::live_router`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::fut::wrap_future;
use actix::prelude::*;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::actors::listener::{BoundListener, Listener};
use crate::actors::messages::Reload;
use crate::actors::registry::Shared;
use crate::actors::router::set_worker_index;
use crate::config::Config;

/// The signals the daemon handles, installed before anything else happens: until a handler
/// exists, a SIGHUP or SIGTERM would kill the process and leave its pidfile behind.
pub struct Signals {
    hup: Signal,
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Must run inside the actor system's runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }
}

/// How often shared actors are checked for having died.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

pub struct Supervisor {
    shared: Arc<Shared>,
    signals: Option<Signals>,
    config_path: PathBuf,
    /// Per worker, the listeners to run there.
    listeners: Vec<Vec<BoundListener>>,
    workers: Vec<Arbiter>,
}

impl Supervisor {
    pub fn new(
        shared: Arc<Shared>,
        signals: Signals,
        config_path: PathBuf,
        listeners: Vec<Vec<BoundListener>>,
    ) -> Supervisor {
        Supervisor { shared, signals: Some(signals), config_path, listeners, workers: Vec::new() }
    }

    fn watch_signals(&mut self, ctx: &mut Context<Self>) {
        let me = ctx.address();
        let Some(Signals { mut hup, mut int, mut term }) = self.signals.take() else { return };
        let signals = async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        log::info!("got SIGHUP, reloading configuration");
                        let _ = me.send(Reload).await;
                    }
                    _ = int.recv() => { log::info!("got SIGINT, shutting down"); break; }
                    _ = term.recv() => { log::info!("got SIGTERM, shutting down"); break; }
                }
            }
            System::current().stop();
        };
        ctx.spawn(wrap_future(signals));
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.watch_signals(ctx);
        for (index, listeners) in std::mem::take(&mut self.listeners).into_iter().enumerate() {
            let arbiter = Arbiter::new();
            arbiter.spawn_fn(move || set_worker_index(index));
            for bound in listeners {
                let shared = self.shared.clone();
                Listener::start_in_arbiter(&arbiter.handle(), move |_| Listener::new(shared, bound));
            }
            self.workers.push(arbiter);
        }
        log::info!("pgcorral started with {} workers", self.workers.len());
        ctx.run_interval(WATCH_PERIOD, |supervisor, _| {
            supervisor.shared.revive_pools();
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for worker in &self.workers {
            worker.stop();
        }
    }
}

impl Handler<Reload> for Supervisor {
    type Result = Result<(), String>;

    fn handle(&mut self, _: Reload, _: &mut Context<Self>) -> Result<(), String> {
        match Config::load(&self.config_path) {
            Ok((config, warnings)) => {
                for warning in &warnings {
                    log::warn!("{warning}");
                }
                self.shared.set_config(config);
                log::info!("configuration reloaded from {}", self.config_path.display());
                Ok(())
            }
            Err(e) => {
                log::error!("reload failed, keeping the running configuration: {e}");
                Err(e.to_string())
            }
        }
    }
}
