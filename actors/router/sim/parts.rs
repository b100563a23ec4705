//! The simulation's pieces: its random numbers, fake servers, router mail, events, clients,
//! and the [`RouterIo`] that records what a router asks for.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::actors::pool::{Hold, Permit, PoolMember, RouterMailbox};
use crate::actors::router::core::{Lendable, RouterIo, Timer};
use crate::config::Config;
use crate::protocol::PgError;
use std::fmt::Write as _;
use std::path::Path;

/// SplitMix64: tiny, and the same numbers on every platform and crate version.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(super) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub(super) fn millis(&mut self, range: std::ops::RangeInclusive<u64>) -> Duration {
        Duration::from_millis(range.start() + self.below(range.end() - range.start() + 1))
    }

    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A server connection of the simulation. `actor` changes when it moves to another worker
/// (a new actor adopts it there), `conn` never does.
#[derive(Debug)]
pub struct SimServer {
    pub(super) actor: u64,
    pub(super) conn: u64,
    pub(super) born: Instant,
    pub(super) generation: usize,
    pub(super) healthy: bool,
    /// The real thing: dropping the server gives it back, as dropping a link does.
    pub(super) _permit: Permit,
}

impl Lendable for SimServer {
    type Id = u64;

    fn id(&self) -> u64 {
        self.actor
    }

    fn healthy(&self) -> bool {
        self.healthy
    }

    fn born(&self) -> Instant {
        self.born
    }

    fn generation(&self) -> usize {
        self.generation
    }

    fn process_id(&self) -> i32 {
        self.conn as i32
    }
}

pub(super) type ClientId = u64;

/// A message for one router, from the pool's shared state or from another router.
#[derive(Debug)]
pub(super) enum Mail {
    PermitFreed,
    ShedIdle,
    Grow,
    Donate(usize),
    CloseIdle(bool),
}

/// The simulation's side of [`RouterMailbox`]: mail is queued and delivered by the scheduler.
pub(super) struct SimMailbox {
    pub(super) pool: usize,
    pub(super) worker: usize,
    pub(super) outbox: Arc<Mutex<Vec<(usize, usize, Mail)>>>,
}

impl SimMailbox {
    fn post(&self, mail: Mail) {
        self.outbox.lock().push((self.pool, self.worker, mail));
    }
}

impl RouterMailbox for SimMailbox {
    fn connected(&self) -> bool {
        true
    }
    fn permit_freed(&self) {
        self.post(Mail::PermitFreed);
    }
    fn shed_idle(&self) {
        self.post(Mail::ShedIdle);
    }
    fn grow(&self) {
        self.post(Mail::Grow);
    }
    fn donate(&self, to: usize) {
        self.post(Mail::Donate(to));
    }
    fn close_idle(&self, outdated_only: bool) {
        self.post(Mail::CloseIdle(outdated_only));
    }
    fn pool_freed(&self) {}
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Everything that happens, at a time.
#[derive(Debug)]
pub(super) enum Event {
    /// To router (pool, worker).
    Router(usize, usize, RouterEvent),
    /// A server login ends: (pool, worker, conn, whether it ran into server_connect_timeout,
    /// the permit it logs in with).
    LoginDone(usize, usize, u64, bool, Permit),
    /// A client connects: its pool and worker.
    Arrive(ClientId),
    /// A client's transaction ends (it gives its server back) or it thought long enough.
    ClientNext(ClientId),
    /// A random idle server dies.
    IdleServerDies,
    /// PostgreSQL refuses logins until the given time.
    Outage(Duration),
    /// A reload: new sizes for every pool.
    Reload,
    /// PAUSE or SUSPEND of the database, or RESUME (`Hold::None`).
    Hold(Hold),
    /// Every pool's `min_pool_size` keeper.
    KeepWarm,
}

#[derive(Debug)]
pub(super) enum RouterEvent {
    Checkout(ClientId),
    Checkin(SimServer, bool),
    ServerGone(u64, Option<PgError>),
    Adopt(SimServer),
    Mail(Mail),
    Timer(Timer),
    Janitor,
}

pub(super) struct Scheduled {
    pub(super) at: Instant,
    pub(super) seq: u64,
    pub(super) event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientState {
    NotYet,
    Queued,
    InTransaction,
    Thinking,
    Done,
}

pub(super) struct Client {
    pub(super) pool: usize,
    pub(super) worker: usize,
    pub(super) transactions_left: u32,
    pub(super) state: ClientState,
    /// When it asked for a server (its place in its router's queue).
    pub(super) queued_at: Option<(Instant, u64)>,
    pub(super) holding: Option<SimServer>,
    /// The router that lent its server: the server goes back there.
    pub(super) lender: usize,
    pub(super) member: Option<PoolMember>,
    pub(super) served: u32,
    pub(super) refused: u32,
}

/// What a router asked for during one event, applied by the simulation afterwards.
pub(super) enum Effect {
    Offer(ClientId, SimServer),
    Refuse(ClientId, PgError),
    Start(Permit),
    Close(SimServer),
    Check(SimServer),
    Migrate(SimServer, usize),
    AskDonations,
    Wake(Instant, Timer),
}

pub(super) struct SimIo<'a> {
    pub(super) gone: &'a HashSet<ClientId>,
    pub(super) effects: &'a mut Vec<Effect>,
}

impl RouterIo<SimServer> for SimIo<'_> {
    type Waiter = ClientId;

    fn waiter_gone(&self, waiter: &ClientId) -> bool {
        self.gone.contains(waiter)
    }

    fn offer(&mut self, waiter: ClientId, server: SimServer) -> Result<(), SimServer> {
        if self.gone.contains(&waiter) {
            return Err(server);
        }
        self.effects.push(Effect::Offer(waiter, server));
        Ok(())
    }

    fn refuse(&mut self, waiter: ClientId, error: PgError) {
        self.effects.push(Effect::Refuse(waiter, error));
    }

    fn start_server(&mut self, permit: Permit) {
        self.effects.push(Effect::Start(permit));
    }

    fn close(&mut self, server: SimServer) {
        self.effects.push(Effect::Close(server));
    }

    fn check(&mut self, server: SimServer) {
        self.effects.push(Effect::Check(server));
    }

    fn migrate(&mut self, server: SimServer, to: usize) -> Result<(), SimServer> {
        self.effects.push(Effect::Migrate(server, to));
        Ok(())
    }

    fn ask_for_donations(&mut self) {
        self.effects.push(Effect::AskDonations);
    }

    fn wake_at(&mut self, at: Instant, timer: Timer) {
        self.effects.push(Effect::Wake(at, timer));
    }
}

/// A random configuration: one database, one or two users, random sizes and timeouts.
pub(super) fn random_config(rng: &mut Rng) -> (String, usize, usize) {
    let workers = 1 + rng.below(3) as usize;
    let pools = 1 + rng.below(2) as usize;
    let mut general = String::new();
    let mut set = |key: &str, value: String| {
        let _ = writeln!(general, "{key} = {value}");
    };
    set("default_pool_size", (1 + rng.below(4)).to_string());
    set("reserve_pool_size", rng.below(3).to_string());
    set("reserve_pool_timeout", format!("{:.3}", rng.millis(0..=2000).as_secs_f64()));
    set("min_pool_size", rng.below(3).to_string());
    let wait = if rng.chance(30) { 0.0 } else { rng.millis(500..=5000).as_secs_f64() };
    set("query_wait_timeout", format!("{wait:.3}"));
    let lifetime = if rng.chance(50) { 0.0 } else { rng.millis(1000..=8000).as_secs_f64() };
    set("server_lifetime", format!("{lifetime:.3}"));
    let idle = if rng.chance(40) { 0.0 } else { rng.millis(1000..=6000).as_secs_f64() };
    set("server_idle_timeout", format!("{idle:.3}"));
    let db_max = if rng.chance(50) { 0 } else { 1 + rng.below(6) };
    set("max_db_connections", db_max.to_string());
    let user_max = if rng.chance(60) { 0 } else { 1 + rng.below(4) };
    set("max_user_connections", user_max.to_string());
    set("server_connect_timeout", format!("{:.3}", rng.millis(500..=3000).as_secs_f64()));
    set("server_login_retry", format!("{:.3}", rng.millis(200..=2000).as_secs_f64()));
    set("server_round_robin", rng.below(2).to_string());
    if rng.chance(30) {
        set("server_check_query", "select 1".into());
        set("server_check_delay", format!("{:.3}", rng.millis(0..=1000).as_secs_f64()));
    }
    // A reload that moves the database makes every open server outdated.
    let port = 1 + rng.below(2);
    let ini = format!(
        "[databases]\nd = host=127.0.0.1 port={port} dbname=d\n[pgbouncer]\nauth_type = trust\npool_mode = transaction\nserver_tls_sslmode = disable\n{general}"
    );
    (ini, workers, pools)
}

pub(super) fn parse(ini: &str) -> Config {
    Config::parse_str(ini, Path::new("sim.ini")).expect("the simulator writes valid configurations").0
}
