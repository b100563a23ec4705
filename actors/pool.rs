//! One pool per (database, server user): its settings, its exact limits, and its Pool actor.
//!
//! [`PoolShared`] is what every worker sees of a pool. Limits are atomics so that a worker can
//! take a permit to open a server without a message to anyone, yet the totals stay exact across
//! workers: `pool_size` (+ `reserve_pool_size` once a client waited `reserve_pool_timeout`),
//! `max_db_connections` and `max_user_connections`. The per-worker [`Router`]s hold the idle
//! servers and waiting clients.
//!
//! The [`Pool`] actor owns the pool's lifecycle policy; it takes a periodic tick in which it keeps
//! `min_pool_size` servers open by sending [`Grow`] to a router, while the pool has clients.

use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::actors::census::Census;
use crate::actors::hosts::HostRotation;
use crate::actors::messages::PoolFreed;
use crate::actors::router::Router;
use crate::auth::{ScramKeys, Secret};
use crate::config::hosts::{LoadBalanceHosts, TargetSessionAttrs};
use crate::config::PoolMode;
use crate::net::{ServerAddr, TcpSettings};
use crate::params::SharedParams;
use crate::protocol::PgError;
use crate::stats::PoolStats;
use crate::tls::{ServerTls, TlsSettings};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The database name clients use (the `[databases]` key, or their own name for `*`).
    pub database: String,
    /// The user pgcorral logs in to PostgreSQL as.
    pub user: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

/// Everything needed to open and manage this pool's servers, resolved from the config.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The database's servers (`host=` and `port=` lists), tried in the order `hosts`
    /// (the pool's [`HostRotation`]) gives.
    pub servers: Arc<[ServerAddr]>,
    pub load_balance_hosts: LoadBalanceHosts,
    pub target_session_attrs: TargetSessionAttrs,
    pub dbname: String,
    pub server_user: String,
    pub password: Option<Secret>,
    /// Sent in every server's startup packet (the `[databases]` client_encoding, datestyle, ...).
    pub startup_params: Vec<(String, String)>,
    pub connect_query: Option<String>,
    /// How servers are asked for TLS; the settings it was built from decide, at a reload,
    /// whether servers must reconnect.
    pub server_tls: Arc<ServerTls>,
    pub server_tls_settings: TlsSettings,
    /// Socket options for servers opened from now on; not a reason to reconnect open ones.
    pub tcp: TcpSettings,
    pub pool_mode: PoolMode,
    /// The database logs in as its own `user=`: one pool serves every client user, and its
    /// `min_pool_size` is kept whether or not a client is connected.
    pub forced_user: bool,
    pub pool_size: usize,
    pub reserve_pool_size: usize,
    pub min_pool_size: usize,
    pub max_db_connections: usize,
    pub max_user_connections: usize,
    pub reserve_pool_timeout: Duration,
    /// Zero durations mean "never", as in PgBouncer.
    pub query_wait_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    pub server_connect_timeout: Duration,
    pub server_login_retry: Duration,
    pub server_round_robin: bool,
    pub query_wait_notify: Duration,
    pub client_idle_timeout: Duration,
    pub idle_transaction_timeout: Duration,
    pub query_timeout: Duration,
    pub transaction_timeout: Duration,
    pub cancel_wait_timeout: Duration,
    pub server_check_delay: Duration,
    /// `None`: no check; `Some("")`: an empty query (PgBouncer's `<empty>`).
    pub server_check_query: Option<String>,
    pub server_fast_close: bool,
    pub reset_query: String,
    pub reset_query_always: bool,
    pub max_prepared_statements: usize,
    pub log_pooler_errors: bool,
}

impl PoolSettings {
    /// Whether servers opened under `self` are what `other` would open: same place, database,
    /// user, password, startup parameters, connect_query and TLS settings.
    fn same_connection(&self, other: &PoolSettings) -> bool {
        self.server_tls_settings == other.server_tls_settings
            && self.servers == other.servers
            && self.target_session_attrs == other.target_session_attrs
            && self.dbname == other.dbname
            && self.server_user == other.server_user
            && self.password == other.password
            && self.startup_params == other.startup_params
            && self.connect_query == other.connect_query
    }
}

/// A counter with a ceiling (0 = none), shared by every worker. Database and user limits also
/// know the pools that share them, so that a pool refused by the shared limit can make another
/// pool give up an idle server, as PgBouncer does.
#[derive(Debug, Default)]
pub struct Limit {
    count: AtomicUsize,
    max: AtomicUsize,
    members: Mutex<Vec<Weak<PoolShared>>>,
}

impl Limit {
    pub fn new(max: usize) -> Limit {
        Limit { count: AtomicUsize::new(0), max: AtomicUsize::new(max), members: Mutex::new(Vec::new()) }
    }

    /// Registers a pool as counted by this limit.
    pub fn join(&self, pool: &Arc<PoolShared>) {
        self.members.lock().push(Arc::downgrade(pool));
    }

    fn members(&self) -> Vec<Arc<PoolShared>> {
        self.members.lock().iter().filter_map(Weak::upgrade).collect()
    }

    /// A freed pool is no longer counted here; true when no pool is left and nothing is
    /// counted, so that the limit itself can go.
    pub fn leave(&self, pool: &PoolShared) -> bool {
        let mut members = self.members.lock();
        members.retain(|member| !std::ptr::eq(member.as_ptr(), pool) && member.strong_count() > 0);
        members.is_empty() && self.count() == 0
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The ceiling; 0 for none.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Takes one unit if the count stays within `max + extra`.
    pub fn try_acquire(&self, extra: usize) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (max == 0 || n < max + extra).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn release(&self) {
        let _ = self.count.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// What a pool, the console and other workers tell one worker's router. The actor's address
/// in the daemon; the simulator's queue in `router::sim`.
pub trait RouterMailbox: Send + Sync {
    /// False once the router has stopped.
    fn connected(&self) -> bool;
    /// A permit was released: try again to open servers for waiters.
    fn permit_freed(&self);
    /// Another pool under a shared limit needs the slot: close one idle server.
    fn shed_idle(&self);
    /// `min_pool_size`: open one server.
    fn grow(&self);
    /// Worker `to` starves: send it an idle server if none is needed here.
    fn donate(&self, to: usize);
    /// Close idle servers: all, or those opened under older connection settings.
    fn close_idle(&self, outdated_only: bool);
    /// The pool was freed: stop.
    fn pool_freed(&self);
    fn as_any(&self) -> &dyn std::any::Any;
}

pub type Mailbox = Arc<dyn RouterMailbox>;

/// One server connection's unit of `pool_size` (or reserve), `max_db_connections` and
/// `max_user_connections`. It lives in the connection: with its ServerConnection while it logs
/// in, then in its [`ServerLink`](crate::actors::server::ServerLink) wherever that goes, moving
/// workers included. Dropped, wherever that happens, it gives the unit back and wakes the
/// routers starved for one; nobody releases a permit by hand.
#[must_use = "a permit dropped at once opens nothing and frees its slot"]
pub struct Permit {
    pool: Arc<PoolShared>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pool.release();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.pool.key)
    }
}

/// Whether the console holds a pool's traffic: new transactions wait while it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    None = 0,
    /// SUSPEND: servers stay open and idle.
    Suspended = 1,
    /// PAUSE or KILL: servers close as they come back.
    Paused = 2,
}

/// The ParameterStatus list every new client of a pool is greeted with.
pub type Welcome = Arc<Vec<(String, String)>>;

/// Why a permit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `pool_size` (+ reserve) reached: only this pool's own servers can help.
    PoolFull,
    /// `max_db_connections` or `max_user_connections` reached: other pools hold the slots.
    SharedLimit,
}

/// What one worker's router of a pool reports about itself, for balancing servers between
/// workers: when its oldest waiting client began to wait, as nanoseconds after the pool's
/// `epoch` plus one; zero while nobody waits.
#[derive(Debug, Default)]
struct WorkerLoad {
    oldest_waiter: AtomicU64,
}

/// How much longer than this worker's another worker's oldest client must have waited to be
/// sent a server: an eighth more (about what one server more or less changes in a queue served
/// by ten, so that a move is not undone by the next) and this much more, so that short waits
/// move nothing.
const WAIT_GAP: Duration = Duration::from_millis(2);

/// Server logins are failing: when the next attempt may start, and what clients are told
/// meanwhile.
#[derive(Debug, Clone)]
struct Backoff {
    until: Instant,
    error: PgError,
    failures: u32,
}

/// First wait after a failed login; doubled per failure up to `server_login_retry`.
const FIRST_RETRY: Duration = Duration::from_millis(250);

pub struct PoolShared {
    pub key: PoolKey,
    login_backoff: Mutex<Option<Backoff>>,
    /// Which host a new server connection tries first.
    pub hosts: HostRotation,
    /// The minor protocol version to ask servers for: 3.2 until a server refuses it outright
    /// (a pooler that does not negotiate), then 3.0 until the connection settings change.
    server_protocol_minor: std::sync::atomic::AtomicU16,
    /// SCRAM pass-through: the keys a client proved its stored SCRAM secret with, used to log
    /// in to PostgreSQL as that user when no password is configured for it.
    scram_keys: Mutex<Option<ScramKeys>>,
    /// The user's secret from `auth_query`, for server logins when auth_file has none.
    queried_secret: Mutex<Option<Secret>>,
    loads: Vec<WorkerLoad>,
    epoch: Instant,
    settings: RwLock<Arc<PoolSettings>>,
    /// Bumped by every settings change, so that holders of a copy can check it is current
    /// with a plain atomic read instead of taking the lock every worker shares.
    settings_version: AtomicUsize,
    servers: Limit,
    /// Clients logged in to this pool now, on any worker (see [`PoolMember`]).
    clients: AtomicUsize,
    /// Bumped by a reload that changes how servers are reached: servers opened before are
    /// closed as they come back instead of lent again (PgBouncer's "close_needed").
    connection_generation: AtomicUsize,
    /// The pool's [`Pool`] actor, which the Supervisor replaces if it dies: actix restarts no
    /// actor that panicked.
    pub(crate) lifecycle: Mutex<Option<Addr<Pool>>>,
    db_limit: Arc<Limit>,
    user_limit: Arc<Limit>,
    /// ParameterStatus of the first server that logged in: what new clients are told.
    welcome: RwLock<Option<Welcome>>,
    /// The tracked-parameter values this pool's clients share (see [`SharedParams`]).
    pub shared_params: SharedParams,
    routers: Mutex<Vec<Option<Mailbox>>>,
    starving: Vec<AtomicBool>,
    hold: AtomicU8,
    /// Since when the pool has had no client and no server (see [`PoolShared::unused_for`]).
    unused_since: Mutex<Option<Instant>>,
    /// Freed: no longer in the registry; whoever still holds it must look the pool up again.
    retired: AtomicBool,
    /// Traffic counters, one slot per worker.
    pub stats: PoolStats,
    /// Where this pool's server connections are entered (the daemon's one census).
    pub census: Arc<Census>,
}

impl std::fmt::Debug for PoolShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolShared({})", self.key)
    }
}

impl PoolShared {
    pub fn new(
        key: PoolKey,
        settings: PoolSettings,
        db_limit: Arc<Limit>,
        user_limit: Arc<Limit>,
        workers: usize,
        census: Arc<Census>,
    ) -> PoolShared {
        let servers = Limit::new(settings.pool_size);
        PoolShared {
            key,
            settings: RwLock::new(Arc::new(settings)),
            settings_version: AtomicUsize::new(0),
            servers,
            clients: AtomicUsize::new(0),
            connection_generation: AtomicUsize::new(0),
            lifecycle: Mutex::new(None),
            db_limit,
            user_limit,
            welcome: RwLock::new(None),
            shared_params: SharedParams::default(),
            routers: Mutex::new(vec![None; workers]),
            starving: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            loads: (0..workers).map(|_| WorkerLoad::default()).collect(),
            epoch: Instant::now(),
            login_backoff: Mutex::new(None),
            hosts: HostRotation::default(),
            server_protocol_minor: std::sync::atomic::AtomicU16::new(crate::protocol::startup::LATEST_MINOR),
            scram_keys: Mutex::new(None),
            queried_secret: Mutex::new(None),
            stats: PoolStats::new(workers),
            hold: AtomicU8::new(Hold::None as u8),
            unused_since: Mutex::new(None),
            retired: AtomicBool::new(false),
            census,
        }
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.read().clone()
    }

    /// Refreshes a held copy of the settings if they changed since it was taken.
    pub fn refresh_settings(&self, held: &mut (usize, Arc<PoolSettings>)) {
        let version = self.settings_version.load(Ordering::Acquire);
        if held.0 != version {
            *held = (version, self.settings());
        }
    }

    /// Applies reloaded settings; servers already open keep running and follow the new sizes
    /// as they come and go.
    pub fn update_settings(&self, settings: PoolSettings) {
        if !self.settings().same_connection(&settings) {
            self.connection_generation.fetch_add(1, Ordering::AcqRel);
            self.server_protocol_minor.store(crate::protocol::startup::LATEST_MINOR, Ordering::Relaxed);
            log::info!("pool {}: connection settings changed; servers reconnect as they come back", self.key);
        }
        self.servers.set_max(settings.pool_size);
        self.db_limit.set_max(settings.max_db_connections);
        self.user_limit.set_max(settings.max_user_connections);
        *self.settings.write() = Arc::new(settings);
        self.settings_version.fetch_add(1, Ordering::Release);
        self.wake_starving();
    }

    pub fn hold(&self) -> Hold {
        match self.hold.load(Ordering::Relaxed) {
            0 => Hold::None,
            1 => Hold::Suspended,
            _ => Hold::Paused,
        }
    }

    pub fn set_hold(&self, hold: Hold) {
        self.hold.store(hold as u8, Ordering::Relaxed);
    }

    /// PAUSE, SUSPEND, KILL or RESUME: sets the hold and tells every router; a paused pool's
    /// idle servers close now, a resumed pool serves the clients that queued meanwhile.
    pub fn hold_traffic(&self, hold: Hold) {
        let was = self.hold();
        self.set_hold(hold);
        for (_, router) in self.all_routers() {
            if hold == Hold::Paused {
                router.close_idle(false);
            }
            if hold == Hold::None && was != Hold::None {
                router.permit_freed();
            }
        }
    }

    /// RECONNECT: servers open now close as they come back; new ones connect afresh.
    pub fn reconnect(&self) {
        self.connection_generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn server_protocol_minor(&self) -> u16 {
        self.server_protocol_minor.load(Ordering::Relaxed)
    }

    pub fn server_refuses_newer_protocol(&self) {
        self.server_protocol_minor.store(0, Ordering::Relaxed);
    }

    pub fn server_count(&self) -> usize {
        self.servers.count()
    }

    pub fn connection_generation(&self) -> usize {
        self.connection_generation.load(Ordering::Acquire)
    }

    /// Counts a logged-in client of this pool for as long as the returned guard lives.
    pub fn member(self: &Arc<Self>) -> PoolMember {
        self.clients.fetch_add(1, Ordering::Relaxed);
        PoolMember(self.clone())
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// How long the pool has had no client and no server as of `now`; None while it has one.
    /// Called by the registry's sweep, under its lock, which also covers new members.
    pub fn unused_for(&self, now: Instant) -> Option<Duration> {
        let mut since = self.unused_since.lock();
        if self.client_count() > 0 || self.server_count() > 0 {
            *since = None;
            return None;
        }
        Some(now.saturating_duration_since(*since.get_or_insert(now)))
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Frees the pool: its Pool actor and its Routers stop. The registry has already removed it,
    /// under the same lock that counts new members, so nobody joins it any more.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let routers: Vec<_> = self.routers.lock().iter_mut().filter_map(Option::take).collect();
        for router in routers {
            router.pool_freed();
        }
        if let Some(actor) = self.lifecycle.lock().take() {
            actor.do_send(PoolFreed);
        }
    }

    pub fn set_lifecycle(&self, actor: Addr<Pool>) {
        *self.lifecycle.lock() = Some(actor);
    }

    /// False once the pool's actor has died (or before it was started).
    pub fn lifecycle_alive(&self) -> bool {
        self.lifecycle.lock().as_ref().is_some_and(|actor| actor.connected())
    }

    /// A permit to open one server. `reserve` allows `reserve_pool_size` beyond `pool_size`.
    pub fn try_acquire(self: &Arc<Self>, reserve: bool) -> Result<Permit, Refusal> {
        let extra = if reserve { self.settings().reserve_pool_size } else { 0 };
        if !self.servers.try_acquire(extra) {
            return Err(Refusal::PoolFull);
        }
        if !self.db_limit.try_acquire(0) {
            self.servers.release();
            return Err(Refusal::SharedLimit);
        }
        if !self.user_limit.try_acquire(0) {
            self.db_limit.release();
            self.servers.release();
            return Err(Refusal::SharedLimit);
        }
        Ok(Permit { pool: self.clone() })
    }

    /// Gives a permit back (a server closed) and tells starved routers to try again, in this
    /// pool and in every pool sharing its database or user limit.
    fn release(&self) {
        self.user_limit.release();
        self.db_limit.release();
        self.servers.release();
        self.wake_starving();
        for pool in self.db_limit.members().into_iter().chain(self.user_limit.members()) {
            if pool.key != self.key {
                pool.wake_starving();
            }
        }
    }

    /// Another pool under this pool's database or user limit has clients waiting: a server
    /// coming back idle here should close instead, so that the slot moves there.
    /// Read from the limits themselves, not from a copy of the settings that a reload may
    /// have outdated.
    pub fn shared_limit_contended(&self) -> bool {
        if self.db_limit.max() == 0 && self.user_limit.max() == 0 {
            return false;
        }
        self.db_limit
            .members()
            .into_iter()
            .chain(self.user_limit.members())
            .any(|pool| pool.key != self.key && pool.starving.iter().any(|f| f.load(Ordering::Relaxed)))
    }

    /// Refused by `max_db_connections` or `max_user_connections`: asks the other pools under
    /// those limits to close one idle server each, so that the slot can move here.
    pub fn shed_elsewhere(&self) {
        for pool in self.db_limit.members().into_iter().chain(self.user_limit.members()) {
            if pool.key != self.key {
                for (_, router) in pool.all_routers() {
                    router.shed_idle();
                }
            }
        }
    }

    fn wake_starving(&self) {
        let routers = self.routers.lock();
        for (worker, flag) in self.starving.iter().enumerate() {
            if flag.load(Ordering::Relaxed) {
                if let Some(router) = &routers[worker] {
                    router.permit_freed();
                }
            }
        }
    }

    pub fn set_starving(&self, worker: usize, starving: bool) {
        self.starving[worker].store(starving, Ordering::Relaxed);
    }

    /// While logins are backing off: the error to give clients and when to try again.
    pub fn login_blocked(&self, now: Instant) -> Option<(PgError, Instant)> {
        let backoff = self.login_backoff.lock();
        backoff.as_ref().filter(|b| b.until > now).map(|b| (b.error.clone(), b.until))
    }

    /// Records a failed login and sets the next attempt after an exponentially growing,
    /// jittered delay capped at `server_login_retry` (`jitter` in [0, 1) spreads it over
    /// ±20 %); logs once per step, not per client.
    pub fn login_failed(&self, error: &PgError, now: Instant, jitter: f64) {
        let mut backoff = self.login_backoff.lock();
        if backoff.as_ref().is_some_and(|b| b.until > now) {
            return; // another worker's failure already opened this step
        }
        let failures = backoff.as_ref().map_or(0, |b| b.failures) + 1;
        let cap = self.settings().server_login_retry;
        let doubled = FIRST_RETRY.saturating_mul(1u32 << (failures - 1).min(16));
        let delay = doubled.min(cap).mul_f64(jitter.clamp(0.0, 1.0) * 0.4 + 0.8);
        log::warn!(
            "pool {}: {}; next login attempt in {:.1} s",
            self.key,
            error.message,
            delay.as_secs_f64()
        );
        *backoff = Some(Backoff { until: now + delay, error: error.clone(), failures });
    }

    /// Keeps the SCRAM keys a client of this pool proved, when servers log in as that same
    /// user; a failed login with older keys (the password changed) is retried with new ones.
    pub fn offer_scram_keys(&self, user: &str, keys: ScramKeys) {
        if self.settings().server_user != user {
            return;
        }
        let mut held = self.scram_keys.lock();
        if held.as_ref() != Some(&keys) {
            *held = Some(keys);
            drop(held);
            // Clients waiting out a login backoff caused by missing keys need not wait longer.
            self.login_backoff.lock().take();
        }
    }

    pub fn set_queried_secret(&self, secret: Secret) {
        *self.queried_secret.lock() = Some(secret);
    }

    pub fn queried_secret(&self) -> Option<Secret> {
        self.queried_secret.lock().clone()
    }

    pub fn scram_keys(&self) -> Option<ScramKeys> {
        self.scram_keys.lock().clone()
    }

    pub fn login_succeeded(&self) {
        let mut backoff = self.login_backoff.lock();
        if backoff.take().is_some() {
            log::info!("pool {}: server login works again", self.key);
        }
    }

    pub fn workers(&self) -> usize {
        self.loads.len()
    }

    /// Tells other workers since when this worker's oldest client waits, if one does.
    pub fn publish_oldest_waiter(&self, worker: usize, since: Option<Instant>) {
        let nanos = since.map_or(0, |s| s.saturating_duration_since(self.epoch).as_nanos() as u64 + 1);
        self.loads[worker].oldest_waiter.store(nanos, Ordering::Relaxed);
    }

    /// Another worker whose oldest client has waited clearly longer than this worker's
    /// (`my_wait`). PgBouncer serves a pool's clients from one queue; sending freed servers to
    /// where the wait is longest keeps clients of one pool waiting alike whichever worker the
    /// kernel gave them to.
    pub fn needier_worker(&self, worker: usize, my_wait: Duration, now: Instant) -> Option<usize> {
        // Runs on most checkins under load: no allocation.
        let waits = self.loads.iter().map(|l| match l.oldest_waiter.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(now.saturating_duration_since(self.epoch + Duration::from_nanos(nanos - 1))),
        });
        let to = pick_needier_worker(waits, worker, my_wait)?;
        self.router(to).is_some_and(|r| r.connected()).then_some(to)
    }

    /// Another worker whose router has clients waiting at the limit, if any.
    pub fn starving_worker(&self, worker: usize) -> Option<usize> {
        let routers = self.routers.lock();
        self.starving
            .iter()
            .enumerate()
            .find(|(w, f)| *w != worker && f.load(Ordering::Relaxed))
            .map(|(w, _)| w)
            .filter(|&w| routers[w].as_ref().is_some_and(|r| r.connected()))
    }

    pub fn router(&self, worker: usize) -> Option<Mailbox> {
        self.routers.lock()[worker].clone()
    }

    /// Worker `worker`'s router actor, if it runs one that is alive.
    pub fn router_addr(&self, worker: usize) -> Option<Addr<Router>> {
        let router = self.router(worker)?;
        router.as_any().downcast_ref::<Addr<Router>>().filter(|addr| addr.connected()).cloned()
    }

    pub fn set_router(&self, worker: usize, router: Mailbox) {
        self.routers.lock()[worker] = Some(router);
    }

    pub fn all_routers(&self) -> Vec<(usize, Mailbox)> {
        let routers = self.routers.lock();
        routers
            .iter()
            .enumerate()
            .filter_map(|(w, r)| r.clone().filter(|r| r.connected()).map(|r| (w, r)))
            .collect()
    }

    pub fn welcome(&self) -> Option<Welcome> {
        self.welcome.read().clone()
    }

    /// Whether a server of this pool ever logged in.
    pub fn ever_logged_in(&self) -> bool {
        self.welcome.read().is_some()
    }

    pub fn set_welcome_once(&self, params: &[(String, String)]) {
        let mut welcome = self.welcome.write();
        if welcome.is_none() {
            *welcome = Some(Arc::new(params.to_vec()));
        }
    }
}

/// The worker (from `waits`: how long each one's oldest client has waited) that should get
/// the server this worker frees, whose oldest client has waited `mine`.
fn pick_needier_worker(
    waits: impl IntoIterator<Item = Option<Duration>>,
    worker: usize,
    mine: Duration,
) -> Option<usize> {
    let threshold = mine + mine / 8 + WAIT_GAP;
    waits
        .into_iter()
        .enumerate()
        .filter_map(|(w, wait)| wait.filter(|&t| w != worker && t > threshold).map(|t| (w, t)))
        .max_by_key(|&(_, t)| t)
        .map(|(w, _)| w)
}

/// A logged-in client, counted in its pool's `client_count` until dropped. A pool with a
/// member is never freed.
pub struct PoolMember(Arc<PoolShared>);

impl PoolMember {
    pub fn pool(&self) -> &Arc<PoolShared> {
        &self.0
    }
}

impl Drop for PoolMember {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pool's lifecycle policy.
pub struct Pool {
    shared: Arc<PoolShared>,
    next_worker: usize,
    /// Per server host name, the cache version its servers were opened under.
    dns_seen: std::collections::HashMap<String, u64>,
}

const TICK: Duration = Duration::from_secs(1);

impl Pool {
    pub fn new(shared: Arc<PoolShared>) -> Pool {
        Pool { shared, next_worker: 0, dns_seen: Default::default() }
    }
}

/// Keeps `min_pool_size` open (never above `pool_size`), spreading the servers across workers
/// that have a router, starting with worker `*next_worker`.
pub fn keep_warm(shared: &PoolShared, next_worker: &mut usize) {
    let settings = shared.settings();
    let min = settings.min_pool_size.min(settings.pool_size);
    let routers = shared.all_routers();
    // As PgBouncer (1.24+): a pool with a forced user stays warm from start-up on; others
    // only while they have a client, and keep what they have but do not grow back.
    if routers.is_empty() || (shared.client_count() == 0 && !settings.forced_user) {
        return;
    }
    // A slot another pool of the same database or user is waiting for goes to it: warming
    // this pool back up would take it again, and the two would trade it forever.
    if shared.shared_limit_contended() {
        return;
    }
    let missing = min.saturating_sub(shared.server_count());
    for _ in 0..missing {
        let (_, router) = &routers[*next_worker % routers.len()];
        *next_worker += 1;
        router.grow();
    }
}

impl Actor for Pool {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |pool, _| {
            // A panic in one round must not end the keeper: the next tick tries again.
            let kept = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                keep_warm(&pool.shared, &mut pool.next_worker)
            }));
            if kept.is_err() {
                log::error!(
                    "pool {}: keeping min_pool_size panicked; trying again in {TICK:?}",
                    pool.shared.key
                );
            }
            pool.follow_dns();
        });
    }
}

impl Pool {
    /// Looks the pool's host names up again once their answers expire (`dns_max_ttl`), while
    /// it has servers on them, and reconnects its servers when a name moved to other
    /// addresses: they close as they come back and new ones go to the new addresses.
    fn follow_dns(&mut self) {
        let settings = self.shared.settings();
        let now = Instant::now();
        for addr in settings.servers.iter() {
            let ServerAddr::Tcp { host, .. } = addr else { continue };
            if host.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let cache = crate::net::dns::cache();
            let version = cache.version(host);
            let seen = self.dns_seen.entry(host.clone()).or_insert(version);
            if *seen != version {
                *seen = version;
                log::info!(
                    "pool {}: {host} resolves to other addresses now; servers reconnect as they come back",
                    self.shared.key
                );
                self.shared.reconnect();
            }
            if self.shared.server_count() > 0 && cache.expired(host, now) {
                let host = host.clone();
                actix::spawn(async move {
                    crate::net::dns::refresh(&host).await;
                });
            }
        }
    }
}

impl Handler<PoolFreed> for Pool {
    type Result = ();

    fn handle(&mut self, _: PoolFreed, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_move_to_the_worker_whose_clients_waited_longest() {
        let ms = Duration::from_millis;
        // Worker 1's oldest client has waited 68 ms, worker 0's 58 ms: more than an eighth more.
        assert_eq!(pick_needier_worker([Some(ms(58)), Some(ms(68))], 0, ms(58)), Some(1));
        // 64 against 60 is within the margin, so a move is not undone by the next.
        assert_eq!(pick_needier_worker([Some(ms(60)), Some(ms(64))], 0, ms(60)), None);
        assert_eq!(pick_needier_worker([Some(ms(60)), Some(ms(64))], 1, ms(64)), None);
        // Short waits move nothing; nobody waiting elsewhere: keep it.
        assert_eq!(pick_needier_worker([Some(ms(0)), Some(ms(1))], 0, ms(0)), None);
        assert_eq!(pick_needier_worker([Some(ms(5)), None], 0, ms(5)), None);
        // The longest wait of several.
        assert_eq!(pick_needier_worker([Some(ms(10)), Some(ms(30)), Some(ms(40))], 0, ms(10)), Some(2));
    }

    #[test]
    fn limit_is_exact_and_zero_means_unlimited() {
        let l = Limit::new(2);
        assert!(l.try_acquire(0) && l.try_acquire(0));
        assert!(!l.try_acquire(0));
        assert!(l.try_acquire(1), "reserve allows one more");
        assert!(!l.try_acquire(1));
        l.release();
        assert_eq!(l.count(), 2);
        let unlimited = Limit::new(0);
        assert!((0..1000).all(|_| unlimited.try_acquire(0)));
    }
}
