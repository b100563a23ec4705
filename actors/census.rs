//! The census: every client and server connection alive now, as the console (`SHOW CLIENTS`,
//! `SHOW SERVERS`, `SHOW POOLS`) and `/metrics` see them.
//!
//! A connection is entered when it opens and leaves when it closes; the map is locked only
//! then and when the console takes a snapshot, never per query. While a connection lives, the
//! one thread that owns it updates its entry with relaxed atomic stores (state, the peer it is
//! linked to, when it last asked for something), which readers on other threads may see a
//! moment late: good enough for monitoring, and free for the data path.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use actix::Addr;

use crate::actors::client::ClientSession;
use crate::actors::pool::PoolShared;
use crate::net::Endpoint;

/// A client's state, as PgBouncer names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Connected, not yet logged in.
    Login = 0,
    /// Logged in, holding a server or idle between transactions (PgBouncer's "active").
    Active = 1,
    /// Waiting for a server.
    Waiting = 2,
}

/// A server connection's state, as PgBouncer names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    /// Connecting and logging in.
    Login = 0,
    /// Idle in its Router, ready to be lent.
    Idle = 1,
    /// Lent to a client.
    Active = 2,
    /// Running a reset, rollback or `server_check_query` before it may be lent again.
    Tested = 3,
}

/// Monotonic time as microseconds since the census began, plus one, so that zero can mean
/// "never" in an atomic.
#[derive(Debug)]
pub struct Clock {
    epoch: Instant,
    wall_epoch: SystemTime,
}

impl Clock {
    fn new() -> Clock {
        Clock { epoch: Instant::now(), wall_epoch: SystemTime::now() }
    }

    pub fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }

    pub fn now(&self) -> u64 {
        self.stamp(Instant::now())
    }

    /// How long ago a stamp was; zero for "never".
    pub fn since(&self, stamp: u64) -> Duration {
        match stamp {
            0 => Duration::ZERO,
            s => Duration::from_micros(self.now().saturating_sub(s)),
        }
    }

    /// The wall-clock time of a stamp, for display.
    pub fn wall(&self, stamp: u64) -> Option<SystemTime> {
        (stamp != 0).then(|| self.wall_epoch + Duration::from_micros(stamp - 1))
    }
}

/// What a client logged in as; set once, after authentication.
pub struct ClientLogin {
    pub database: String,
    pub user: String,
    /// None on the admin console.
    pub pool: Option<Arc<PoolShared>>,
    /// A replication connection's mode (SHOW CLIENTS' `replication` column).
    pub replication: crate::actors::replication::Replication,
}

pub struct ClientEntry {
    pub id: u64,
    pub remote: Endpoint,
    pub local: Endpoint,
    pub connected: u64,
    /// The client's own peer process id over a Unix socket (PgBouncer's `remote_pid`).
    pub remote_pid: i32,
    pub session: Addr<ClientSession>,
    login: OnceLock<ClientLogin>,
    state: AtomicU8,
    /// When the client last sent something that needed a server.
    request: AtomicU64,
    /// Since when it waits for a server; zero while it does not.
    waiting_since: AtomicU64,
    /// The server it holds (its census id), zero for none.
    server: AtomicU64,
    application_name: Mutex<String>,
    /// Cancel requests sent for this client's query and not yet delivered.
    cancels: AtomicU32,
    /// The TLS protocol and cipher, when the client negotiated TLS.
    tls: OnceLock<String>,
    /// Named prepared statements it holds (SHOW CLIENTS).
    prepared: AtomicU32,
}

impl ClientEntry {
    /// PgBouncer's log prefix for a client: `C-0x1f: db/user@addr:port`.
    pub fn describe(&self) -> String {
        let (db, user) =
            self.login().map_or(("(nodb)", "(nouser)"), |l| (l.database.as_str(), l.user.as_str()));
        format!("C-{:#x}: {db}/{user}@{}:{}", self.id, self.remote.addr, self.remote.port)
    }

    pub fn login(&self) -> Option<&ClientLogin> {
        self.login.get()
    }

    pub fn set_prepared(&self, count: usize) {
        self.prepared.store(count as u32, Ordering::Relaxed);
    }

    pub fn prepared(&self) -> u32 {
        self.prepared.load(Ordering::Relaxed)
    }

    pub fn set_tls(&self, description: String) {
        let _ = self.tls.set(description);
    }

    /// The TLS protocol and cipher, empty for plaintext.
    pub fn tls(&self) -> &str {
        self.tls.get().map_or("", String::as_str)
    }

    pub fn logged_in(&self, login: ClientLogin, application_name: &str) {
        *self.application_name.lock() = application_name.to_string();
        let _ = self.login.set(login);
        self.state.store(ClientState::Active as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            0 => ClientState::Login,
            2 => ClientState::Waiting,
            _ => ClientState::Active,
        }
    }

    /// The client asked for a server at `stamp` and waits for it.
    pub fn waits(&self, stamp: u64) {
        self.request.store(stamp, Ordering::Relaxed);
        self.waiting_since.store(stamp, Ordering::Relaxed);
        self.state.store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// The client holds server `server` (census id), or none (0).
    pub fn holds(&self, server: u64) {
        self.server.store(server, Ordering::Relaxed);
        self.waiting_since.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Active as u8, Ordering::Relaxed);
    }

    pub fn requested(&self, stamp: u64) {
        self.request.store(stamp, Ordering::Relaxed);
    }

    pub fn request(&self) -> u64 {
        self.request.load(Ordering::Relaxed)
    }

    pub fn waiting_since(&self) -> u64 {
        self.waiting_since.load(Ordering::Relaxed)
    }

    pub fn server(&self) -> u64 {
        self.server.load(Ordering::Relaxed)
    }

    pub fn application_name(&self) -> String {
        self.application_name.lock().clone()
    }

    pub fn set_application_name(&self, name: &str) {
        *self.application_name.lock() = name.to_string();
    }

    pub fn cancel_sent(&self) {
        self.cancels.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cancel_delivered(&self) {
        let _ = self.cancels.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn cancels(&self) -> u32 {
        self.cancels.load(Ordering::Relaxed)
    }
}

pub struct ServerEntry {
    pub id: u64,
    pub pool: Arc<PoolShared>,
    pub connected: u64,
    /// The pool's connection generation it was opened under (see `PoolShared`).
    pub generation: usize,
    endpoints: OnceLock<(Endpoint, Endpoint)>,
    state: AtomicU8,
    /// When it last changed hands: lent, returned, checked.
    changed: AtomicU64,
    /// The client it is lent to (its census id), zero for none.
    client: AtomicU64,
    remote_pid: AtomicI32,
    application_name: Mutex<String>,
    tls: OnceLock<String>,
    prepared: AtomicU32,
}

impl std::fmt::Debug for ServerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server #{} of {} ({:?})", self.id, self.pool.key, self.state())
    }
}

impl ServerEntry {
    pub fn logged_in(
        &self,
        (remote, local): (Endpoint, Endpoint),
        process_id: i32,
        application_name: &str,
        tls: String,
    ) {
        let _ = self.tls.set(tls);
        let _ = self.endpoints.set((remote, local));
        self.remote_pid.store(process_id, Ordering::Relaxed);
        *self.application_name.lock() = application_name.to_string();
    }

    fn set(&self, state: ServerState, client: u64, stamp: u64) {
        self.client.store(client, Ordering::Relaxed);
        self.changed.store(stamp, Ordering::Relaxed);
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn idle(&self, stamp: u64) {
        self.set(ServerState::Idle, 0, stamp);
    }

    pub fn lent(&self, client: u64, stamp: u64) {
        self.set(ServerState::Active, client, stamp);
    }

    pub fn tested(&self, stamp: u64) {
        self.set(ServerState::Tested, 0, stamp);
    }

    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            1 => ServerState::Idle,
            2 => ServerState::Active,
            3 => ServerState::Tested,
            _ => ServerState::Login,
        }
    }

    pub fn changed(&self) -> u64 {
        self.changed.load(Ordering::Relaxed)
    }

    pub fn client(&self) -> u64 {
        self.client.load(Ordering::Relaxed)
    }

    pub fn remote_pid(&self) -> i32 {
        self.remote_pid.load(Ordering::Relaxed)
    }

    pub fn endpoints(&self) -> Option<&(Endpoint, Endpoint)> {
        self.endpoints.get()
    }

    pub fn application_name(&self) -> String {
        self.application_name.lock().clone()
    }

    /// The TLS protocol and cipher, empty for plaintext.
    pub fn tls(&self) -> &str {
        self.tls.get().map_or("", String::as_str)
    }

    pub fn set_prepared(&self, count: usize) {
        self.prepared.store(count as u32, Ordering::Relaxed);
    }

    pub fn prepared(&self) -> u32 {
        self.prepared.load(Ordering::Relaxed)
    }

    pub fn set_application_name(&self, name: &str) {
        *self.application_name.lock() = name.to_string();
    }
}

impl Census {
    /// Holds the census's client table: for fault-injection tests only.
    #[cfg(debug_assertions)]
    pub(crate) fn snapshot_lock(&self) -> parking_lot::MutexGuard<'_, HashMap<u64, Arc<ClientEntry>>> {
        self.clients.lock()
    }
}

pub struct Census {
    pub clock: Clock,
    next_id: AtomicU64,
    clients: Mutex<HashMap<u64, Arc<ClientEntry>>>,
    servers: Mutex<HashMap<u64, Arc<ServerEntry>>>,
}

impl Default for Census {
    fn default() -> Self {
        Census {
            clock: Clock::new(),
            next_id: AtomicU64::new(1),
            clients: Mutex::default(),
            servers: Mutex::default(),
        }
    }
}

impl Census {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn enter_client(
        &self,
        session: Addr<ClientSession>,
        remote: Endpoint,
        local: Endpoint,
        remote_pid: i32,
    ) -> Arc<ClientEntry> {
        let entry = Arc::new(ClientEntry {
            id: self.next_id(),
            remote,
            local,
            connected: self.clock.now(),
            remote_pid,
            session,
            login: OnceLock::new(),
            state: AtomicU8::new(ClientState::Login as u8),
            request: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            server: AtomicU64::new(0),
            application_name: Mutex::default(),
            cancels: AtomicU32::new(0),
            tls: OnceLock::new(),
            prepared: AtomicU32::new(0),
        });
        self.clients.lock().insert(entry.id, entry.clone());
        entry
    }

    pub fn leave_client(&self, id: u64) {
        self.clients.lock().remove(&id);
    }

    pub fn enter_server(&self, pool: Arc<PoolShared>, generation: usize) -> Arc<ServerEntry> {
        let entry = Arc::new(ServerEntry {
            id: self.next_id(),
            pool,
            connected: self.clock.now(),
            generation,
            endpoints: OnceLock::new(),
            state: AtomicU8::new(ServerState::Login as u8),
            changed: AtomicU64::new(0),
            client: AtomicU64::new(0),
            remote_pid: AtomicI32::new(0),
            application_name: Mutex::default(),
            tls: OnceLock::new(),
            prepared: AtomicU32::new(0),
        });
        self.servers.lock().insert(entry.id, entry.clone());
        entry
    }

    pub fn leave_server(&self, id: u64) {
        self.servers.lock().remove(&id);
    }

    /// Every client now, in connection order.
    pub fn clients(&self) -> Vec<Arc<ClientEntry>> {
        let mut clients: Vec<_> = self.clients.lock().values().cloned().collect();
        clients.sort_by_key(|c| c.id);
        clients
    }

    /// Every server connection now, in connection order.
    pub fn servers(&self) -> Vec<Arc<ServerEntry>> {
        let mut servers: Vec<_> = self.servers.lock().values().cloned().collect();
        servers.sort_by_key(|s| s.id);
        servers
    }

    pub fn client(&self, id: u64) -> Option<Arc<ClientEntry>> {
        self.clients.lock().get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn stamps_are_nonzero_and_measure_time() {
        let clock = Clock::new();
        let start = clock.now();
        assert!(start >= 1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock.since(start) >= Duration::from_millis(5));
        assert_eq!(clock.since(0), Duration::ZERO);
        assert!(clock.wall(0).is_none());
        let wall = clock.wall(start).expect("a time");
        assert!(wall.duration_since(UNIX_EPOCH).unwrap().as_secs() > 1_700_000_000);
    }
}
