//! What every worker shares: the live configuration, the registry of pools, the client count for
//! `max_client_conn`, and the cancel-key table.
//!
//! Owned by the Supervisor and handed to every actor as an `Arc`. Nothing here is touched per
//! query: pools are looked up once per login, the cancel table once per login, logout and
//! CancelRequest.

use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::Notify;

use crate::actors::census::{Census, ClientEntry};
use crate::actors::control::Holds;
use crate::actors::messages::CancelQuery;
use crate::actors::peers::{self, ForwardLimits, Peers};
use crate::actors::pool::{Limit, Pool, PoolKey, PoolMember, PoolSettings, PoolShared};
use crate::actors::supervisor::Supervisor;
use crate::auth::auth_query::AuthQuery;
use crate::auth::Secret;
use crate::config::Config;
use crate::net::ServerAddr;
use crate::protocol::cancel_key::{fresh_key, route, CancelRoute, KeyId, SecretKey};
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;
use crate::stats::{PoolStats, StatsWindow};

struct CancelEntry {
    secret_key: SecretKey,
    /// The client's census entry, which holds its session's address: one address per client
    /// is enough, and each copy of an actix address is an allocation of its own.
    client: Arc<ClientEntry>,
}

pub struct Shared {
    config: RwLock<Arc<Config>>,
    pools: Mutex<HashMap<PoolKey, Arc<PoolShared>>>,
    /// (client database, client user) -> pool, so that a login does not resolve the
    /// configuration again; emptied by every reload.
    logins: Mutex<HashMap<(String, String), Arc<PoolShared>>>,
    db_limits: Mutex<HashMap<String, Arc<Limit>>>,
    user_limits: Mutex<HashMap<String, Arc<Limit>>>,
    clients: AtomicUsize,
    /// Logged-in clients per database and per user, for max_db_client_connections and
    /// max_user_client_connections.
    clients_per_db: Mutex<HashMap<String, usize>>,
    clients_per_user: Mutex<HashMap<String, usize>>,
    cancel_keys: Mutex<HashMap<KeyId, CancelEntry>>,
    /// `[peers]`: where the cancel requests for other poolers' keys go.
    pub peers: Peers,
    pub workers: usize,
    /// Every client and server connection alive, for the console and metrics.
    pub census: Arc<Census>,
    /// The Supervisor's arbiter, where Pool actors live (they are off the data path).
    home: ArbiterHandle,
    /// What the console paused, suspended or disabled.
    pub holds: Mutex<Holds>,
    /// A shutdown was asked for (SIGINT, SIGTERM, SHUTDOWN): `/health` answers 503.
    pub shutting_down: AtomicBool,
    /// Console commands, counted as PgBouncer counts its admin database's traffic.
    pub console_stats: PoolStats,
    /// Totals at the last two `stats_period` ticks, for averages.
    pub stats_window: Mutex<StatsWindow>,
    supervisor: OnceLock<Addr<Supervisor>>,
    /// auth_query answers by (database, user), with when they were fetched.
    auth_cache: Mutex<HashMap<(String, String), CachedSecret>>,
    /// Permits for auth_query lookups in flight (see [`AUTH_QUERY_CONCURRENCY`]).
    auth_lookups: tokio::sync::Semaphore,
    /// Connections still logging in, oldest first, each with the signal that evicts it.
    pending_logins: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next_login: AtomicU64,
    worker_arbiters: OnceLock<Vec<ArbiterHandle>>,
}

/// A connection that has not finished logging in, counted in the registry until dropped.
pub struct PendingLogin {
    id: u64,
    evicted: Arc<Notify>,
    shared: Arc<Shared>,
}

impl PendingLogin {
    /// Completes when newer connections pushed this one out (see [`Shared::start_login`]).
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl Drop for PendingLogin {
    fn drop(&mut self) {
        self.shared.pending_logins.lock().retain(|(id, _)| *id != self.id);
    }
}

/// An auth_query answer (None: no secret) and when it was fetched.
type CachedSecret = (Option<String>, Instant);

/// How long an auth_query answer is reused. A password change, or a `rolvaliduntil` the
/// default query turns into NULL, takes effect within this time (and at once on RELOAD).
const AUTH_QUERY_CACHE: Duration = Duration::from_secs(30);
/// How long "no such user" is reused: short, so that a role created a moment ago can log in
/// soon, and so that guessed names do not linger.
const AUTH_QUERY_NEGATIVE_CACHE: Duration = Duration::from_secs(5);
/// The most answers kept: a flood of guessed names cannot grow the cache beyond this.
const AUTH_QUERY_CACHE_ENTRIES: usize = 10_000;
/// The most auth_query connections open at once, whatever the number of logins: a flood of
/// unknown names queues here instead of taking PostgreSQL's `max_connections`.
const AUTH_QUERY_CONCURRENCY: usize = 4;

impl Shared {
    pub fn new(config: Config, workers: usize, home: ArbiterHandle) -> Shared {
        apply_dns_ttls(&config);
        let peers = Peers::new(&config);
        Shared {
            config: RwLock::new(Arc::new(config)),
            pools: Mutex::new(HashMap::new()),
            logins: Mutex::new(HashMap::new()),
            db_limits: Mutex::new(HashMap::new()),
            user_limits: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            clients_per_db: Mutex::new(HashMap::new()),
            clients_per_user: Mutex::new(HashMap::new()),
            cancel_keys: Mutex::new(HashMap::new()),
            peers,
            workers,
            census: Arc::default(),
            home,
            holds: Mutex::default(),
            shutting_down: AtomicBool::new(false),
            console_stats: PoolStats::new(1),
            stats_window: Mutex::new(StatsWindow::new()),
            supervisor: OnceLock::new(),
            auth_cache: Mutex::default(),
            auth_lookups: tokio::sync::Semaphore::new(AUTH_QUERY_CONCURRENCY),
            pending_logins: Mutex::default(),
            next_login: AtomicU64::new(0),
            worker_arbiters: OnceLock::new(),
        }
    }

    pub fn set_supervisor(&self, supervisor: Addr<Supervisor>) {
        let _ = self.supervisor.set(supervisor);
    }

    pub fn supervisor(&self) -> Option<Addr<Supervisor>> {
        self.supervisor.get().cloned()
    }

    /// Every pool created so far, in a stable order (database, then user).
    pub fn all_pools(&self) -> Vec<Arc<PoolShared>> {
        let mut pools: Vec<_> = self.pools.lock().values().cloned().collect();
        pools.sort_by(|a, b| (&a.key.database, &a.key.user).cmp(&(&b.key.database, &b.key.user)));
        pools
    }

    /// The secret of a user missing from `auth_file`, from `auth_query` when the database (or
    /// the global section) names an `auth_user`; None when there is no lookup or no secret.
    pub async fn queried_secret(
        &self,
        config: &Config,
        database: &str,
        user: &str,
    ) -> Result<Option<String>, PgError> {
        let Some(entry) = config.database(database) else { return Ok(None) };
        let general = &config.general;
        let Some(auth_user) = entry.auth_user.as_ref().or(general.auth_user.as_ref()) else {
            return Ok(None);
        };
        let key = (database.to_string(), user.to_string());
        if let Some(secret) = self.cached_secret(&key) {
            return Ok(secret);
        }
        // Lookups queue for a permit; whoever waited for the same name finds its answer here.
        let _permit = self.auth_lookups.acquire().await.expect("the semaphore is never closed");
        if let Some(secret) = self.cached_secret(&key) {
            return Ok(secret);
        }
        let dbname = entry
            .auth_dbname
            .as_ref()
            .or(general.auth_dbname.as_ref())
            .or(entry.dbname.as_ref())
            .map_or(database, String::as_str);
        let auth_secret = config.secret(auth_user).map(Secret::parse);
        let lookup = AuthQuery {
            // The first host: auth_query asks whichever server holds the roles.
            addr: &ServerAddr::from_host(entry.servers[0].0.as_deref(), entry.servers[0].1),
            tls: &config.tls.server,
            tcp: &general.tcp,
            auth_user,
            auth_secret: auth_secret.as_ref(),
            dbname,
            query: entry.auth_query.as_deref().unwrap_or(&general.auth_query),
            timeout: general.server_connect_timeout,
        };
        match lookup.fetch(user).await {
            Ok(secret) => {
                self.cache_secret(key, secret.clone());
                Ok(secret)
            }
            Err(e) => {
                log::warn!("database {database}: {e}");
                Err(PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "could not look up the user with auth_query; see pgcorral's log",
                ))
            }
        }
    }

    /// A cached auth_query answer still fresh: None when there is none (Some(None): known to
    /// have no secret).
    fn cached_secret(&self, key: &(String, String)) -> Option<Option<String>> {
        let cache = self.auth_cache.lock();
        let (secret, at) = cache.get(key)?;
        let lifetime = if secret.is_some() { AUTH_QUERY_CACHE } else { AUTH_QUERY_NEGATIVE_CACHE };
        (at.elapsed() < lifetime).then(|| secret.clone())
    }

    fn cache_secret(&self, key: (String, String), secret: Option<String>) {
        let mut cache = self.auth_cache.lock();
        if cache.len() >= AUTH_QUERY_CACHE_ENTRIES && !cache.contains_key(&key) {
            cache.retain(|_, (secret, at)| match secret {
                Some(_) => at.elapsed() < AUTH_QUERY_CACHE,
                None => at.elapsed() < AUTH_QUERY_NEGATIVE_CACHE,
            });
            if cache.len() >= AUTH_QUERY_CACHE_ENTRIES {
                // Still full of fresh answers: "no such user" goes first, then anything.
                cache.retain(|_, (secret, _)| secret.is_some());
                if cache.len() >= AUTH_QUERY_CACHE_ENTRIES {
                    cache.clear();
                }
            }
        }
        cache.insert(key, (secret, Instant::now()));
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    /// Installs a reloaded configuration: new logins use it at once, and existing pools take
    /// their new sizes and connection settings (servers already open keep running).
    pub fn set_config(&self, config: Config) {
        apply_dns_ttls(&config);
        let config = Arc::new(config);
        *self.config.write() = config.clone();
        self.peers.reconfigure(&config);
        self.logins.lock().clear();
        self.auth_cache.lock().clear();
        let pools: Vec<Arc<PoolShared>> = self.pools.lock().values().cloned().collect();
        for pool in pools {
            if let Ok((_, settings)) = resolve(&config, &pool.key.database, &pool.key.user) {
                pool.update_settings(settings);
            }
        }
        self.warm_forced_pools();
    }

    /// A reload removed `database`: new logins are refused (it no longer resolves), clients
    /// still connected finish, and its servers close as they come back.
    pub fn database_removed(&self, database: &str) {
        for pool in self.all_pools().iter().filter(|p| p.key.database == database) {
            pool.reconnect();
            for (_, router) in pool.all_routers() {
                router.close_idle(true);
            }
        }
    }

    /// Joins an authenticated client of `database` logging in as `user` to its pool, which is
    /// created on first use. Nothing is created for a client that has not authenticated.
    pub fn pool(&self, database: &str, user: &str) -> Result<PoolMember, PgError> {
        let login = (database.to_string(), user.to_string());
        let cached = self.logins.lock().get(&login).cloned();
        if let Some(pool) = cached {
            // Joined under the registry's lock: a pool is only freed, under the same lock,
            // while it has no member.
            let pools = self.pools.lock();
            if pools.get(&pool.key).is_some_and(|live| Arc::ptr_eq(live, &pool)) {
                return Ok(pool.member());
            }
        }
        let member = self.resolve_pool(database, user)?;
        self.logins.lock().insert(login, member.pool().clone());
        Ok(member)
    }

    fn resolve_pool(&self, database: &str, user: &str) -> Result<PoolMember, PgError> {
        let config = self.config();
        let (key, settings) = resolve(&config, database, user)?;
        let mut pools = self.pools.lock();
        let pool = self.pool_in(&mut pools, key, settings);
        Ok(pool.member())
    }

    /// The pool of `key` in the (locked) registry, created if it is not there.
    fn pool_in(
        &self,
        pools: &mut HashMap<PoolKey, Arc<PoolShared>>,
        key: PoolKey,
        settings: PoolSettings,
    ) -> Arc<PoolShared> {
        if let Some(pool) = pools.get(&key) {
            return pool.clone();
        }
        let db_limit = limit_for(&self.db_limits, &key.database, settings.max_db_connections);
        let user_limit = limit_for(&self.user_limits, &key.user, settings.max_user_connections);
        let pool = Arc::new(PoolShared::new(
            key.clone(),
            settings,
            db_limit.clone(),
            user_limit.clone(),
            self.workers,
            self.census.clone(),
        ));
        db_limit.join(&pool);
        user_limit.join(&pool);
        pool.set_hold(self.holds.lock().of(&key.database));
        self.start_lifecycle(&pool);
        pools.insert(key, pool.clone());
        pool
    }

    /// The worker arbiters, given once by the Supervisor when they have started: where the
    /// pools warmed without a client get their router.
    pub fn set_worker_arbiters(&self, arbiters: Vec<ArbiterHandle>) {
        let _ = self.worker_arbiters.set(arbiters);
        self.warm_forced_pools();
    }

    /// As PgBouncer (1.24+): a database that forces its user keeps `min_pool_size` servers
    /// open from start-up and after every reload, with no client connected. Its pool is made
    /// now, with a router on the first worker for its Pool actor to grow through.
    pub fn warm_forced_pools(&self) {
        let Some(first_worker) = self.worker_arbiters.get().and_then(|a| a.first()) else { return };
        let config = self.config();
        for db in config.databases.iter().filter(|db| db.name != "*") {
            let Some(user) = &db.user else { continue };
            if db.min_pool_size.unwrap_or(config.general.min_pool_size) == 0 {
                continue;
            }
            let pool = match resolve(&config, &db.name, user) {
                Ok((key, settings)) => self.pool_in(&mut self.pools.lock(), key, settings),
                Err(e) => {
                    log::warn!("database {}: cannot keep min_pool_size: {}", db.name, e.message);
                    continue;
                }
            };
            first_worker.spawn(async move {
                crate::actors::router::local_router(&pool);
            });
        }
    }

    /// Frees every pool that has had no client and no server for its idle lifetime
    /// (`autodb_idle_timeout`, `pool_idle_timeout`, or at once once a reload removed its
    /// database), as PgBouncer does; returns how many. The Supervisor calls this every second.
    pub fn free_unused_pools(&self) -> usize {
        self.free_unused_pools_at(Instant::now())
    }

    fn free_unused_pools_at(&self, now: Instant) -> usize {
        let config = self.config();
        let mut freed = Vec::new();
        self.pools.lock().retain(|key, pool| {
            let expired = match (pool.unused_for(now), config.pool_idle_lifetime(&key.database)) {
                (Some(unused), Some(lifetime)) => unused >= lifetime,
                _ => false,
            };
            if expired {
                freed.push(pool.clone());
            }
            !expired
        });
        for pool in &freed {
            self.logins.lock().retain(|_, cached| !Arc::ptr_eq(cached, pool));
            for (limits, name) in [(&self.db_limits, &pool.key.database), (&self.user_limits, &pool.key.user)]
            {
                let mut limits = limits.lock();
                if limits.get(name).is_some_and(|limit| limit.leave(pool)) {
                    limits.remove(name);
                }
            }
            pool.retire();
            log::info!("pool {}: unused; freed", pool.key);
        }
        freed.len()
    }

    fn start_lifecycle(&self, pool: &Arc<PoolShared>) {
        let for_actor = pool.clone();
        pool.set_lifecycle(Pool::start_in_arbiter(&self.home, move |_| Pool::new(for_actor)));
    }

    /// Starts a new Pool actor for every pool whose actor died (a panic: actix restarts
    /// nothing by itself); returns how many. The Supervisor calls this every second.
    pub fn revive_pools(&self) -> usize {
        let pools: Vec<Arc<PoolShared>> = self.pools.lock().values().cloned().collect();
        let mut revived = 0;
        for pool in pools.iter().filter(|pool| !pool.lifecycle_alive()) {
            log::error!("pool {}: its Pool actor died; starting a new one", pool.key);
            self.start_lifecycle(pool);
            revived += 1;
        }
        revived
    }

    /// Fault injection for tests, in debug builds only: panics while holding the registry's and
    /// the census's locks, as a bug in a client's task would. Locks that cannot poison leave
    /// every other client working afterwards (tests/robustness.rs).
    #[cfg(debug_assertions)]
    pub fn panic_holding_locks(&self) -> ! {
        let _pools = self.pools.lock();
        let _logins = self.logins.lock();
        let _cancel_keys = self.cancel_keys.lock();
        let _census = self.census.snapshot_lock();
        panic!("test: a client's task panicked while holding shared locks");
    }

    /// Counts a connection that has begun its login, from the moment it is accepted. At most
    /// `max_client_conn` connections may be logging in at once, apart from the
    /// `max_client_conn` logged-in clients: beyond that, the connection that has been logging
    /// in longest is evicted. Silent or stalled half-logins therefore cannot lock anyone out:
    /// a client that completes its login in time gets in, however many do not.
    pub fn start_login(self: &Arc<Self>) -> PendingLogin {
        let id = self.next_login.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let budget = self.config().general.max_client_conn.max(1);
        let mut pending = self.pending_logins.lock();
        while pending.len() >= budget {
            let Some((_, oldest)) = pending.pop_front() else { break };
            // notify_one keeps the signal for a login not waiting on it yet.
            oldest.notify_one();
        }
        pending.push_back((id, evicted.clone()));
        PendingLogin { id, evicted, shared: self.clone() }
    }

    pub fn pending_login_count(&self) -> usize {
        self.pending_logins.lock().len()
    }

    /// Counts a client against `max_client_conn`; false when it is over.
    pub fn admit_client(&self) -> bool {
        let max = self.config().general.max_client_conn;
        self.clients.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Counts a logged-in client against `max_db_client_connections` and
    /// `max_user_client_connections` (per entry, else global; 0 = unlimited).
    pub fn admit_login(&self, database: &str, user: &str) -> Result<(), PgError> {
        let config = self.config();
        let general = &config.general;
        let db_max = config
            .database(database)
            .and_then(|d| d.max_db_client_connections)
            .unwrap_or(general.max_db_client_connections);
        let user_max = config
            .user(user)
            .and_then(|u| u.max_user_client_connections)
            .unwrap_or(general.max_user_client_connections);
        let mut per_db = self.clients_per_db.lock();
        let mut per_user = self.clients_per_user.lock();
        let full = |max: usize, n: Option<&usize>| max > 0 && n.copied().unwrap_or(0) >= max;
        let refuse = |key: &str| {
            PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, format!("no more connections allowed ({key})"))
        };
        if full(db_max, per_db.get(database)) {
            return Err(refuse("max_db_client_connections"));
        }
        if full(user_max, per_user.get(user)) {
            return Err(refuse("max_user_client_connections"));
        }
        *per_db.entry(database.to_string()).or_default() += 1;
        *per_user.entry(user.to_string()).or_default() += 1;
        Ok(())
    }

    /// Counts a client moved here by an online restart: the process it comes from admitted it,
    /// so no limit turns it away now.
    pub fn count_moved_client(&self, database: &str, user: &str) {
        self.clients.fetch_add(1, Ordering::AcqRel);
        *self.clients_per_db.lock().entry(database.to_string()).or_default() += 1;
        *self.clients_per_user.lock().entry(user.to_string()).or_default() += 1;
    }

    pub fn login_left(&self, database: &str, user: &str) {
        for (map, key) in [(&self.clients_per_db, database), (&self.clients_per_user, user)] {
            let mut map = map.lock();
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }

    /// Logged-in clients of a database and of a user now.
    pub fn clients_of_database(&self, database: &str) -> usize {
        self.clients_per_db.lock().get(database).copied().unwrap_or(0)
    }

    pub fn clients_of_user(&self, user: &str) -> usize {
        self.clients_per_user.lock().get(user).copied().unwrap_or(0)
    }

    pub fn client_left(&self) {
        let _ = self.clients.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Gives a client its own BackendKeyData, with a key as long as its protocol allows (32
    /// bytes in 3.2) and this process's `peer_id` stamped in, and remembers who holds it.
    pub fn register_cancel_key(
        &self,
        client: Arc<ClientEntry>,
        protocol_minor: u16,
    ) -> (KeyId, i32, SecretKey) {
        let own_peer = self.config().general.peer_id;
        let mut keys = self.cancel_keys.lock();
        // Random, as the secret is: a sequence would tell every client how many came before.
        loop {
            let (process_id, secret_key) = fresh_key(protocol_minor, own_peer);
            let Some(id) = KeyId::of(process_id, secret_key.as_bytes()) else { continue };
            if process_id != 0 && !keys.contains_key(&id) {
                keys.insert(id, CancelEntry { secret_key: secret_key.clone(), client });
                return (id, process_id, secret_key);
            }
        }
    }

    /// Files the key a client moved from the process this one took over from kept there: its
    /// driver will cancel with it. (A clash with a key given out here is a 1 in 2^45 chance;
    /// the moved client's key wins, as the other client may cancel no more than a stranger.)
    pub fn adopt_cancel_key(
        &self,
        client: Arc<ClientEntry>,
        process_id: i32,
        secret_key: SecretKey,
    ) -> Option<KeyId> {
        let id = KeyId::of(process_id, secret_key.as_bytes())?;
        self.cancel_keys.lock().insert(id, CancelEntry { secret_key, client });
        Some(id)
    }

    /// The whole secret of a key this process filed, for a client that moves on.
    pub fn cancel_secret(&self, id: KeyId) -> Option<SecretKey> {
        self.cancel_keys.lock().get(&id).map(|entry| entry.secret_key.clone())
    }

    pub fn forget_cancel_key(&self, id: KeyId) {
        self.cancel_keys.lock().remove(&id);
    }

    /// Answers a CancelRequest: one of this process's keys cancels its client's query; another
    /// peer's is forwarded to that peer; a wrong key, or one of the wrong length, is ignored, as
    /// PostgreSQL does. Returns once the request has gone as far as it goes.
    pub async fn cancel(&self, process_id: i32, secret_key: &[u8]) {
        let config = self.config();
        match route(process_id, secret_key, config.general.peer_id) {
            CancelRoute::Local(secret) => {
                if !self.cancel_here(process_id, &secret) {
                    // During an online restart, the client may still be in the old process.
                    crate::actors::takeover::forward_cancel_to_predecessor(process_id, &secret);
                }
            }
            CancelRoute::Exhausted { peer_id } => {
                log::info!("cancel request for peer {peer_id} dropped: already forwarded 3 times")
            }
            CancelRoute::Forward { peer_id, secret } => {
                let Some(peer) = self.peers.get(peer_id) else {
                    log::info!("cancel request for peer {peer_id} dropped: no such peer in [peers]");
                    return;
                };
                let Some(secret) = SecretKey::from_bytes(&secret) else { return };
                let limits = ForwardLimits {
                    wait: config.general.cancel_wait_timeout,
                    connect: config.general.server_connect_timeout,
                };
                log::debug!("forwarding a cancel request to peer {peer_id}");
                if let Err(e) = peers::forward(&peer, process_id, &secret, limits, &config.general.tcp).await
                {
                    log::warn!(
                        "could not forward a cancel request to peer {peer_id} ({}:{}): {e}",
                        peer.entry.host,
                        peer.entry.port
                    );
                }
            }
        }
    }

    /// Whether the key is one of this process's (and so its client's query was cancelled).
    pub fn cancel_here(&self, process_id: i32, secret_key: &[u8]) -> bool {
        let Some(id) = KeyId::of(process_id, secret_key) else { return false };
        let keys = self.cancel_keys.lock();
        match keys.get(&id) {
            Some(entry) if entry.secret_key.matches(secret_key) => {
                entry.client.session.do_send(CancelQuery);
                true
            }
            _ => {
                log::debug!("cancel request with an unknown key ignored");
                false
            }
        }
    }
}

/// `dns_max_ttl` and `dns_nxdomain_ttl` for the process's name cache.
fn apply_dns_ttls(config: &Config) {
    crate::net::dns::cache().set_ttls(crate::net::dns::DnsTtls {
        found: config.general.dns_max_ttl,
        not_found: config.general.dns_nxdomain_ttl,
    });
}

fn limit_for(limits: &Mutex<HashMap<String, Arc<Limit>>>, name: &str, max: usize) -> Arc<Limit> {
    limits.lock().entry(name.to_string()).or_insert_with(|| Arc::new(Limit::new(max))).clone()
}

/// Resolves the pool a client (database, user) maps to, following PgBouncer's precedence:
/// `[users]` over `[databases]` over `[pgbouncer]`.
pub fn resolve(config: &Config, database: &str, user: &str) -> Result<(PoolKey, PoolSettings), PgError> {
    let entry = config.database(database).ok_or_else(|| {
        PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("no such database: {database}"))
    })?;
    let general = &config.general;
    let server_user = entry.user.clone().unwrap_or_else(|| user.to_string());
    let user_entry = config.user(user);
    // A database that forces its user has one pool for every client user: a client user's
    // `[users]` pool_size must not size it (as PgBouncer 1.24+), or the first to log in would.
    let sizing_entry = user_entry.filter(|_| entry.user.is_none());
    let password = match &entry.password {
        Some(password) => Some(Secret::Plain(password.clone())),
        None => config.secret(&server_user).map(Secret::parse),
    };
    let mut startup_params = Vec::new();
    for (name, value) in [
        ("client_encoding", &entry.client_encoding),
        ("DateStyle", &entry.datestyle),
        ("TimeZone", &entry.timezone),
        ("application_name", &entry.application_name),
    ] {
        if let Some(value) = value {
            startup_params.push((name.to_string(), value.clone()));
        }
    }
    let settings = PoolSettings {
        servers: entry
            .servers
            .iter()
            .map(|(host, port)| ServerAddr::from_host(host.as_deref(), *port))
            .collect(),
        load_balance_hosts: entry.load_balance_hosts,
        target_session_attrs: entry.target_session_attrs,
        dbname: entry.dbname.clone().unwrap_or_else(|| database.to_string()),
        server_user: server_user.clone(),
        password,
        startup_params,
        connect_query: entry.connect_query.clone(),
        server_tls: config.tls.server.clone(),
        server_tls_settings: general.server_tls.clone(),
        tcp: general.tcp,
        max_prepared_statements: general.max_prepared_statements,
        pool_mode: user_entry.and_then(|u| u.pool_mode).or(entry.pool_mode).unwrap_or(general.pool_mode),
        forced_user: entry.user.is_some(),
        pool_size: sizing_entry
            .and_then(|u| u.pool_size)
            .or(entry.pool_size)
            .unwrap_or(general.default_pool_size),
        reserve_pool_size: sizing_entry
            .and_then(|u| u.reserve_pool_size)
            .or(entry.reserve_pool_size)
            .unwrap_or(general.reserve_pool_size),
        min_pool_size: entry.min_pool_size.unwrap_or(general.min_pool_size),
        max_db_connections: entry.max_db_connections.unwrap_or(general.max_db_connections),
        max_user_connections: user_entry
            .and_then(|u| u.max_user_connections)
            .unwrap_or(general.max_user_connections),
        reserve_pool_timeout: general.reserve_pool_timeout,
        query_wait_timeout: user_entry
            .and_then(|u| u.query_wait_timeout)
            .or(entry.query_wait_timeout)
            .unwrap_or(general.query_wait_timeout),
        server_lifetime: entry.server_lifetime.unwrap_or(general.server_lifetime),
        server_idle_timeout: general.server_idle_timeout,
        server_connect_timeout: general.server_connect_timeout,
        server_login_retry: general.server_login_retry,
        server_round_robin: general.server_round_robin,
        query_wait_notify: general.query_wait_notify,
        client_idle_timeout: user_entry
            .and_then(|u| u.client_idle_timeout)
            .unwrap_or(general.client_idle_timeout),
        idle_transaction_timeout: user_entry
            .and_then(|u| u.idle_transaction_timeout)
            .unwrap_or(general.idle_transaction_timeout),
        query_timeout: user_entry.and_then(|u| u.query_timeout).unwrap_or(general.query_timeout),
        transaction_timeout: user_entry
            .and_then(|u| u.transaction_timeout)
            .unwrap_or(general.transaction_timeout),
        cancel_wait_timeout: general.cancel_wait_timeout,
        server_check_delay: general.server_check_delay,
        server_fast_close: general.server_fast_close,
        server_check_query: match general.server_check_query.trim() {
            "" => None,
            "<empty>" => Some(String::new()),
            query => Some(query.to_string()),
        },
        reset_query: general.server_reset_query.clone(),
        reset_query_always: general.server_reset_query_always,
        log_pooler_errors: general.log_pooler_errors,
    };
    Ok((PoolKey { database: database.to_string(), user: server_user }, settings))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::actors::router::local_router;
    use std::path::Path;
    use std::time::Duration;

    /// A Shared with one database `d` (nothing listens at its address: no server is opened).
    pub(crate) fn shared_with_one_database() -> Shared {
        shared_with("")
    }

    pub(crate) fn shared_with(general: &str) -> Shared {
        let ini = format!(
            "[databases]\nd = host=127.0.0.1 port=1 dbname=d\n[pgbouncer]\nauth_type = trust\n{general}\n"
        );
        let (config, _) = Config::parse_str(&ini, Path::new("test.ini")).expect("test config");
        Shared::new(config, 1, Arbiter::current())
    }

    #[test]
    fn an_unused_pool_is_freed_after_its_idle_lifetime_and_one_in_use_never() {
        System::new().block_on(async {
            let shared = shared_with("pool_idle_timeout = 10");
            let start = Instant::now();
            let member = shared.pool("d", "u").expect("pool");
            let pool = member.pool().clone();
            let old_router = local_router(&pool);
            assert_eq!(shared.free_unused_pools_at(start + Duration::from_secs(100)), 0, "a member keeps it");
            drop(member);
            let after = Instant::now();
            assert_eq!(shared.free_unused_pools_at(after), 0, "unused from now on");
            assert_eq!(shared.free_unused_pools_at(after + Duration::from_secs(9)), 0);
            assert_eq!(shared.free_unused_pools_at(after + Duration::from_secs(10)), 1);
            assert!(shared.all_pools().is_empty());
            assert!(pool.is_retired());
            until(|| !pool.lifecycle_alive() && pool.all_routers().is_empty()).await;
            until(|| Arc::strong_count(&pool) == 1).await;
            assert!(shared.db_limits.lock().is_empty() && shared.user_limits.lock().is_empty());

            // The next login gets a new pool, with a new router on this worker.
            let again = shared.pool("d", "u").expect("pool");
            assert!(!Arc::ptr_eq(again.pool(), &pool));
            assert!(!old_router.connected());
            assert_ne!(local_router(again.pool()), old_router);
        });
    }

    #[test]
    fn the_auth_query_cache_stays_bounded_and_keeps_real_users_longest() {
        System::new().block_on(async {
            let shared = shared_with_one_database();
            let key = |i: usize| ("d".to_string(), format!("user{i}"));
            shared.cache_secret(key(0), Some("md5-of-a-real-user".into()));
            for i in 1..=AUTH_QUERY_CACHE_ENTRIES + 500 {
                shared.cache_secret(key(i), None);
                assert!(shared.auth_cache.lock().len() <= AUTH_QUERY_CACHE_ENTRIES);
            }
            assert_eq!(shared.cached_secret(&key(0)), Some(Some("md5-of-a-real-user".into())));
            assert_eq!(shared.cached_secret(&key(AUTH_QUERY_CACHE_ENTRIES + 500)), Some(None));
        });
    }

    #[test]
    fn a_users_pool_size_does_not_size_a_database_that_forces_its_user() {
        let ini = "[databases]\nforced = host=h user=svc pool_size=7\nopen = host=h pool_size=7\n\
                   [users]\nalice = pool_size=3\n[pgbouncer]\nauth_type = trust\n";
        let (config, _) = Config::parse_str(ini, Path::new("test.ini")).expect("config");
        assert_eq!(resolve(&config, "forced", "alice").unwrap().1.pool_size, 7);
        assert_eq!(resolve(&config, "open", "alice").unwrap().1.pool_size, 3);
    }

    #[test]
    fn without_an_idle_lifetime_a_pool_stays_and_a_removed_database_frees_at_once() {
        System::new().block_on(async {
            let shared = shared_with("");
            drop(shared.pool("d", "u").expect("pool"));
            let later = Instant::now() + Duration::from_secs(1_000_000);
            shared.free_unused_pools_at(Instant::now());
            assert_eq!(shared.free_unused_pools_at(later), 0, "pool_idle_timeout = 0 keeps pools");
            let ini = "[databases]\nother = host=127.0.0.1 port=1\n[pgbouncer]\nauth_type = trust\n";
            shared.set_config(Config::parse_str(ini, Path::new("test.ini")).expect("config").0);
            assert_eq!(shared.free_unused_pools_at(later), 1, "its database is gone");
        });
    }

    /// Test-only: makes the actor panic inside a handler, as a bug would.
    #[derive(Message)]
    #[rtype(result = "()")]
    pub(crate) struct Crash;

    impl Handler<Crash> for Pool {
        type Result = ();
        fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
            panic!("test: Pool actor crashes");
        }
    }

    pub(crate) async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..100 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition never met");
    }

    #[test]
    fn a_pool_actor_that_panicked_is_replaced() {
        System::new().block_on(async {
            let shared = shared_with_one_database();
            let member = shared.pool("d", "u").expect("pool");
            let pool = member.pool();
            assert!(pool.lifecycle_alive());
            assert_eq!(shared.revive_pools(), 0, "nothing to revive while it lives");
            let actor = pool.lifecycle.lock().clone().expect("started");
            assert!(actor.send(Crash).await.is_err(), "the handler panicked");
            until(|| !pool.lifecycle_alive()).await;
            assert_eq!(shared.revive_pools(), 1);
            assert!(pool.lifecycle_alive(), "a new Pool actor runs");
        });
    }
}
