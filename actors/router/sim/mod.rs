//! A deterministic simulation of the pool logic: the real [`RouterCore`]s of several workers and
//! pools, the real [`PoolShared`] limits, the real `min_pool_size` keeper, the real cross-worker
//! donation, all driven by a seeded scheduler and a simulated clock, with fake servers and
//! clients that misbehave on purpose.
//!
//! [`run`] plays one seed: a random configuration (workers, pools sharing database and user
//! limits, sizes, reserve, timeouts), random clients (queueing, vanishing while queued or
//! mid-transaction, holding servers for random times) and random faults (logins that fail, time
//! out or are slow, servers that die idle or in use, reloads that resize pools). After every
//! step it checks the invariants listed on [`Violation`]; the first one broken ends the run with
//! the seed, the step and a log of the events that led there.
//!
//! Nothing here touches a socket, a thread or the real clock: a seed always replays the same
//! run, so `SIM_SEED=n cargo test --test pool_simulation` reproduces any failure exactly.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::core::{RouterCore, JANITOR_PERIOD};
use crate::actors::census::Census;
use crate::actors::pool::{keep_warm, Hold, Limit, PoolShared};
use crate::actors::registry::resolve;
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;

/// Formats a trace line only while tracing (the replay of a failing seed): formatting every
/// event of every seed would cost more than running them.
macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.tracing {
            let line = format!($($arg)*);
            $sim.log(line);
        }
    };
}

mod invariants;
mod parts;

pub use parts::SimServer;
use parts::*;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A server connection was lent to a client while another held it.
    LentTwice(String),
    /// More servers open than `pool_size` (+ `reserve_pool_size` once a client waited
    /// `reserve_pool_timeout`), `max_db_connections` or `max_user_connections` allow.
    OverLimit(String),
    /// A router served a later client of its queue before an earlier one still waiting.
    NotFifo(String),
    /// A client waited while another worker of its pool kept a server idle, past the bound.
    Unfair(String),
    /// A permit counted with no server behind it, or a server with no permit.
    PermitMismatch(String),
    /// Once quiet: a client still waiting, a server still lent or starving flags still set.
    Leak(String),
    /// A client was neither served nor refused.
    Forgotten(String),
    /// Events keep coming with nothing to show for them: some actors trade messages forever.
    Livelock(String),
    /// A server was lent past `server_lifetime` (as its router reads the settings), or after a
    /// reload changed the connection settings it was opened with; or, once quiet, one idles
    /// past its lifetime longer than a janitor period.
    Outlived(String),
}

/// Far more steps than any seed's traffic needs: past this, something loops.
const MAX_STEPS: u64 = 200_000;

/// How long a client may wait while a server of its pool idles on another worker: a janitor
/// period (which finds such clients), the throttle on moves, and the scheduler's delays.
pub const FAIRNESS_BOUND: Duration = Duration::from_millis(1500);

/// The result of one seed.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub steps: u64,
    pub violation: Option<Violation>,
    /// The configuration and the last events, for a failing seed.
    pub trace: String,
}

struct Sim {
    rng: Rng,
    start: Instant,
    now: Instant,
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    workers: usize,
    pools: Vec<Arc<PoolShared>>,
    cores: Vec<Vec<RouterCore<SimServer, ClientId>>>,
    outbox: Arc<Mutex<Vec<(usize, usize, Mail)>>>,
    clients: BTreeMap<ClientId, Client>,
    gone: HashSet<ClientId>,
    /// Connections alive (logging in, idle, lent, checked, moving) per pool: what the permits
    /// count.
    live: Vec<HashSet<u64>>,
    /// conn → client holding it.
    lent: HashMap<u64, ClientId>,
    /// Per router, the clients in its queue with their arrival sequence number.
    queues: Vec<Vec<VecDeque<(ClientId, u64)>>>,
    next_id: u64,
    /// Logins fail until then.
    outage_until: Option<Instant>,
    /// Where each router's last delivery was scheduled: mail to one router keeps its order.
    last_delivery: HashMap<(usize, usize), Instant>,
    keep_warm_next: Vec<usize>,
    trace: VecDeque<String>,
    settings_text: String,
    steps: u64,
    effects: Vec<Effect>,
    /// Per pool, the shortest `reserve_pool_timeout` any of its settings had: routers follow a
    /// reload at their next janitor round.
    reserve_timeouts: Vec<Duration>,
    violation: Option<Violation>,
    tracing: bool,
    /// Per router, since when its clients wait while servers idle on other workers.
    unfair_since: HashMap<(usize, usize), Instant>,
}

const TRACE_LINES: usize = 400;

impl Sim {
    fn new(seed: u64, tracing: bool) -> Sim {
        let mut rng = Rng(seed);
        let (ini, workers, pool_count) = random_config(&mut rng);
        let config = parse(&ini);
        let census = Arc::new(Census::default());
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let mut pools = Vec::new();
        let mut user_limits = Vec::new();
        let mut db_limit = None;
        for p in 0..pool_count {
            let (key, settings) = resolve(&config, "d", &format!("u{p}")).expect("pool settings");
            let db =
                db_limit.get_or_insert_with(|| Arc::new(Limit::new(settings.max_db_connections))).clone();
            let user = Arc::new(Limit::new(settings.max_user_connections));
            let pool =
                Arc::new(PoolShared::new(key, settings, db.clone(), user.clone(), workers, census.clone()));
            db.join(&pool);
            user.join(&pool);
            for w in 0..workers {
                pool.set_router(w, Arc::new(SimMailbox { pool: p, worker: w, outbox: outbox.clone() }));
            }
            user_limits.push(user);
            pools.push(pool);
        }
        // After the pools were made: their clocks count from their creation on.
        let start = Instant::now();
        let reserve_timeouts = pools.iter().map(|p| p.settings().reserve_pool_timeout).collect();
        let cores = pools
            .iter()
            .map(|pool| (0..workers).map(|w| RouterCore::new(pool.clone(), w)).collect())
            .collect();
        let mut sim = Sim {
            rng,
            start,
            now: start,
            heap: BinaryHeap::new(),
            seq: 0,
            workers,
            live: vec![HashSet::new(); pool_count],
            queues: vec![vec![VecDeque::new(); workers]; pool_count],
            keep_warm_next: vec![0; pool_count],
            pools,
            cores,
            outbox,
            clients: BTreeMap::new(),
            gone: HashSet::new(),
            lent: HashMap::new(),
            next_id: 1,
            outage_until: None,
            last_delivery: HashMap::new(),
            trace: VecDeque::new(),
            settings_text: ini,
            steps: 0,
            effects: Vec::new(),
            reserve_timeouts,
            violation: None,
            tracing,
            unfair_since: HashMap::new(),
        };
        sim.populate();
        sim
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn at(&mut self, at: Instant, event: Event) {
        self.seq += 1;
        self.heap.push(Scheduled { at: at.max(self.now), seq: self.seq, event });
    }

    fn after(&mut self, delay: Duration, event: Event) {
        self.at(self.now + delay, event);
    }

    /// Mail to a router arrives after a short random delay, in the order it was sent.
    fn deliver(&mut self, pool: usize, worker: usize, event: RouterEvent) {
        let latency = Duration::from_micros(self.rng.below(300));
        let last = self.last_delivery.get(&(pool, worker)).copied().unwrap_or(self.now);
        let at = (self.now + latency).max(last);
        self.last_delivery.insert((pool, worker), at);
        self.at(at, Event::Router(pool, worker, event));
    }

    fn populate(&mut self) {
        let clients = 3 + self.rng.below(30);
        let pools = self.pools.len();
        for _ in 0..clients {
            let id = self.id();
            let client = Client {
                pool: self.rng.below(pools as u64) as usize,
                worker: self.rng.below(self.workers as u64) as usize,
                transactions_left: 1 + self.rng.below(6) as u32,
                state: ClientState::NotYet,
                queued_at: None,
                holding: None,
                lender: 0,
                member: None,
                served: 0,
                refused: 0,
            };
            self.clients.insert(id, client);
            let arrival = self.rng.millis(0..=4000);
            self.after(arrival, Event::Arrive(id));
        }
        for _ in 0..self.rng.below(4) {
            let at = self.rng.millis(0..=6000);
            self.after(at, Event::IdleServerDies);
        }
        if self.rng.chance(40) {
            let at = self.rng.millis(0..=4000);
            let length = self.rng.millis(100..=3000);
            self.after(at, Event::Outage(length));
        }
        if self.rng.chance(40) {
            let at = self.rng.millis(0..=5000);
            self.after(at, Event::Reload);
        }
        if self.rng.chance(25) {
            let at = self.rng.millis(0..=5000);
            let length = self.rng.millis(100..=2000);
            let hold = if self.rng.chance(50) { Hold::Paused } else { Hold::Suspended };
            self.after(at, Event::Hold(hold));
            self.after(at + length, Event::Hold(Hold::None));
        }
        for p in 0..pools {
            for w in 0..self.workers {
                let first = self.rng.millis(0..=999);
                self.after(first, Event::Router(p, w, RouterEvent::Janitor));
            }
        }
        self.after(Duration::from_secs(1), Event::KeepWarm);
    }

    fn log(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES {
            self.trace.pop_front();
        }
        let t = self.now.duration_since(self.start).as_secs_f64();
        self.trace.push_back(format!("{t:>9.4}s {line}"));
    }

    /// Runs one event through router (pool, worker), then applies what it asked for.
    fn route(&mut self, pool: usize, worker: usize, event: RouterEvent) {
        let now = self.now;
        let jitter = self.rng.unit();
        let mut effects = std::mem::take(&mut self.effects);
        let core = &mut self.cores[pool][worker];
        let mut io = SimIo { gone: &self.gone, effects: &mut effects };
        match event {
            RouterEvent::Checkout(client) => core.checkout(client, now, &mut io),
            RouterEvent::Checkin(server, fresh) => core.checkin(server, fresh, now, &mut io),
            RouterEvent::ServerGone(actor, error) => core.server_gone(actor, error, now, jitter, &mut io),
            RouterEvent::Adopt(server) => core.adopt(server, now, &mut io),
            RouterEvent::Mail(Mail::PermitFreed) => core.permit_freed(now, &mut io),
            RouterEvent::Mail(Mail::Grow) => core.grow_one(now, &mut io),
            RouterEvent::Mail(Mail::ShedIdle) => core.shed_idle(&mut io),
            RouterEvent::Mail(Mail::Donate(to)) => core.donate(to, now, &mut io),
            RouterEvent::Mail(Mail::CloseIdle(outdated)) => core.close_idle(outdated, &mut io),
            RouterEvent::Timer(timer) => core.timer(timer, now, &mut io),
            RouterEvent::Janitor => {
                core.janitor(now, &mut io);
                self.after(JANITOR_PERIOD, Event::Router(pool, worker, RouterEvent::Janitor));
            }
        }
        for effect in effects.drain(..) {
            self.apply(pool, worker, effect);
        }
        self.effects = effects;
    }

    fn apply(&mut self, pool: usize, worker: usize, effect: Effect) {
        match effect {
            Effect::Offer(client, server) => self.offered(pool, worker, client, server),
            Effect::Refuse(client, error) => {
                trace!(self, "router {pool}/{worker}: refuses client {client}: {}", error.message);
                self.unqueue(pool, worker, client);
                let c = self.clients.get_mut(&client).expect("client");
                c.refused += 1;
                c.state = ClientState::Done;
                c.member = None;
            }
            Effect::Start(permit) => {
                let conn = self.id();
                self.live[pool].insert(conn);
                trace!(self, "router {pool}/{worker}: starts server {conn}");
                self.check_limits(pool, worker);
                let slow = self.rng.chance(5);
                let delay = if slow { self.rng.millis(500..=4000) } else { self.rng.millis(1..=20) };
                let patience = self.pools[pool].settings().server_connect_timeout;
                // A login slower than server_connect_timeout fails at that timeout.
                self.after(
                    delay.min(patience),
                    Event::LoginDone(pool, worker, conn, delay >= patience, permit),
                );
            }
            Effect::Close(server) => self.close(pool, worker, server),
            Effect::Check(server) => {
                let delay = self.rng.millis(0..=5);
                if self.rng.chance(10) {
                    trace!(self, "server {}: check fails", server.conn);
                    self.close(pool, worker, server);
                } else {
                    self.at(
                        self.now + delay,
                        Event::Router(pool, worker, RouterEvent::Checkin(server, false)),
                    );
                }
            }
            Effect::Migrate(server, to) => {
                trace!(self, "router {pool}/{worker}: moves server {} to worker {to}", server.conn);
                let old_actor = server.actor;
                let moved = SimServer { actor: self.id(), ..server };
                self.deliver(pool, worker, RouterEvent::ServerGone(old_actor, None));
                self.deliver(pool, to, RouterEvent::Adopt(moved));
            }
            Effect::AskDonations => {
                for w in (0..self.workers).filter(|&w| w != worker) {
                    self.deliver(pool, w, RouterEvent::Mail(Mail::Donate(worker)));
                }
            }
            Effect::Wake(at, timer) => self.at(at, Event::Router(pool, worker, RouterEvent::Timer(timer))),
        }
    }

    /// A server actor stops: its permit goes back with it (waking starved routers), then its
    /// router hears it is gone.
    fn close(&mut self, pool: usize, worker: usize, server: SimServer) {
        trace!(self, "server {} closes", server.conn);
        self.live[pool].remove(&server.conn);
        let actor = server.actor;
        drop(server);
        self.deliver(pool, worker, RouterEvent::ServerGone(actor, None));
    }

    fn unqueue(&mut self, pool: usize, worker: usize, client: ClientId) {
        self.queues[pool][worker].retain(|(c, _)| *c != client);
    }

    fn offered(&mut self, pool: usize, worker: usize, client: ClientId, server: SimServer) {
        trace!(self, "router {pool}/{worker}: lends server {} to client {client}", server.conn);
        if let Some(holder) = self.lent.get(&server.conn) {
            return self.fail(Violation::LentTwice(format!(
                "server {} lent to client {client} while client {holder} holds it",
                server.conn
            )));
        }
        if !self.live[pool].contains(&server.conn) {
            return self.fail(Violation::PermitMismatch(format!("server {} lent but not open", server.conn)));
        }
        // FIFO: nobody still waiting in this router's queue asked before this client.
        let position = self.queues[pool][worker].iter().position(|(c, _)| *c == client);
        if let Some(position) = position {
            let earlier = self.queues[pool][worker]
                .iter()
                .take(position)
                .find(|(c, _)| !self.gone.contains(c))
                .map(|(c, _)| *c);
            if let Some(earlier) = earlier {
                return self.fail(Violation::NotFifo(format!(
                    "router {pool}/{worker} served client {client} before client {earlier}, which asked first"
                )));
            }
            self.queues[pool][worker].remove(position);
        }
        self.check_fit(pool, worker, client, &server);
        self.lent.insert(server.conn, client);
        let length = self.rng.millis(0..=80);
        let c = self.clients.get_mut(&client).expect("client");
        c.state = ClientState::InTransaction;
        c.served += 1;
        c.holding = Some(server);
        c.lender = worker;
        c.queued_at = None;
        self.after(length, Event::ClientNext(client));
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Router(pool, worker, event) => {
                trace!(self, "router {pool}/{worker} takes {event:?}");
                self.route(pool, worker, event);
            }
            Event::LoginDone(pool, worker, conn, timed_out, permit) => {
                let failed = timed_out
                    || self.outage_until.is_some_and(|until| self.now < until)
                    || self.rng.chance(3);
                if failed {
                    trace!(self, "server {conn}: login fails");
                    self.live[pool].remove(&conn);
                    drop(permit);
                    let error = PgError::fatal(sqlstate::CONNECTION_FAILURE, "server login failed");
                    let actor = conn;
                    self.deliver(pool, worker, RouterEvent::ServerGone(actor, Some(error)));
                } else {
                    let server = SimServer {
                        actor: conn,
                        conn,
                        born: self.now,
                        generation: self.pools[pool].connection_generation(),
                        healthy: true,
                        _permit: permit,
                    };
                    trace!(self, "server {conn}: logged in");
                    self.deliver(pool, worker, RouterEvent::Checkin(server, true));
                }
            }
            Event::Arrive(client) => {
                let c = self.clients.get_mut(&client).expect("client");
                c.member = Some(self.pools[c.pool].member());
                self.checkout(client);
            }
            Event::ClientNext(client) => self.client_next(client),
            Event::IdleServerDies => {
                let p = self.rng.below(self.pools.len() as u64) as usize;
                let w = self.rng.below(self.workers as u64) as usize;
                let count = self.cores[p][w].idle_count();
                if count > 0 {
                    let victim = self.rng.below(count as u64) as usize;
                    if let Some(server) = self.cores[p][w].idle_servers_mut().nth(victim) {
                        server.healthy = false;
                    }
                    trace!(self, "an idle server of router {p}/{w} dies");
                }
            }
            Event::Outage(length) => {
                trace!(self, "PostgreSQL refuses logins for {length:?}");
                self.outage_until = Some(self.now + length);
            }
            Event::Reload => self.reload(),
            Event::Hold(hold) => {
                trace!(self, "the console holds the database: {hold:?}");
                for pool in &self.pools {
                    pool.hold_traffic(hold);
                }
            }
            Event::KeepWarm => {
                for p in 0..self.pools.len() {
                    let pool = self.pools[p].clone();
                    keep_warm(&pool, &mut self.keep_warm_next[p]);
                }
                self.after(Duration::from_secs(1), Event::KeepWarm);
            }
        }
        // Mail the pool's shared state or other routers sent meanwhile.
        let mail: Vec<_> = std::mem::take(&mut *self.outbox.lock());
        for (pool, worker, mail) in mail {
            self.deliver(pool, worker, RouterEvent::Mail(mail));
        }
    }

    fn checkout(&mut self, client: ClientId) {
        self.seq += 1;
        let (seq, now) = (self.seq, self.now);
        let c = self.clients.get_mut(&client).expect("client");
        c.state = ClientState::Queued;
        c.queued_at = Some((now, seq));
        let (pool, worker) = (c.pool, c.worker);
        self.queues[pool][worker].push_back((client, seq));
        trace!(self, "client {client} asks router {pool}/{worker} for a server");
        self.deliver(pool, worker, RouterEvent::Checkout(client));
        // Some clients give up while queued: they disconnect.
        if self.rng.chance(8) {
            let patience = self.rng.millis(0..=3000);
            self.after(patience, Event::ClientNext(client));
        }
    }

    fn client_next(&mut self, client: ClientId) {
        let state = self.clients[&client].state;
        match state {
            ClientState::Queued => {
                // Its patience ran out: it disconnects while queued.
                trace!(self, "client {client} leaves while queued");
                self.gone.insert(client);
                let c = self.clients.get_mut(&client).expect("client");
                c.state = ClientState::Done;
                c.member = None;
            }
            ClientState::InTransaction => {
                let c = self.clients.get_mut(&client).expect("client");
                let server = c.holding.take().expect("a client in a transaction holds a server");
                let (pool, lender) = (c.pool, c.lender);
                self.lent.remove(&server.conn);
                let roll = self.rng.below(100);
                if roll < 3 {
                    // The server died under it: its actor stops.
                    trace!(self, "server {} dies under client {client}", server.conn);
                    self.close(pool, lender, server);
                } else {
                    trace!(self, "client {client} gives server {} back", server.conn);
                    self.deliver(pool, lender, RouterEvent::Checkin(server, false));
                }
                let c = self.clients.get_mut(&client).expect("client");
                c.transactions_left = c.transactions_left.saturating_sub(1);
                if c.transactions_left == 0 || roll < 6 {
                    c.state = ClientState::Done;
                    c.member = None;
                    if (3..6).contains(&roll) {
                        self.gone.insert(client);
                    }
                } else {
                    c.state = ClientState::Thinking;
                    let think = self.rng.millis(0..=50);
                    self.after(think, Event::ClientNext(client));
                }
            }
            ClientState::Thinking => self.checkout(client),
            ClientState::NotYet | ClientState::Done => {}
        }
    }

    fn reload(&mut self) {
        let (ini, _, _) = random_config(&mut self.rng);
        let config = parse(&ini);
        trace!(self, "reload");
        self.settings_text.push_str("\n; after a reload:\n");
        self.settings_text.push_str(&ini);
        for (p, pool) in self.pools.iter().enumerate() {
            let (_, settings) = resolve(&config, "d", &format!("u{p}")).expect("pool settings");
            self.reserve_timeouts[p] = self.reserve_timeouts[p].min(settings.reserve_pool_timeout);
            pool.update_settings(settings);
        }
    }
}

/// Plays seed `seed` to the end and reports the first broken invariant, if any, with the trace
/// of a second, identical run.
pub fn run(seed: u64) -> Outcome {
    let outcome = play(seed, false);
    match outcome.violation {
        Some(_) => play(seed, true),
        None => outcome,
    }
}

fn play(seed: u64, tracing: bool) -> Outcome {
    let mut sim = Sim::new(seed, tracing);
    let end_of_traffic = sim.start + Duration::from_secs(30);
    while let Some(next) = sim.heap.pop() {
        if next.at > end_of_traffic {
            break;
        }
        sim.now = next.at;
        sim.steps += 1;
        if sim.steps > MAX_STEPS {
            let t = sim.now.duration_since(sim.start);
            sim.fail(Violation::Livelock(format!("{MAX_STEPS} steps by {t:?}")));
            break;
        }
        sim.step(next.event);
        if sim.violation.is_none() {
            sim.check();
        }
        if sim.violation.is_some() {
            break;
        }
    }
    if sim.violation.is_none() {
        sim.check_quiet();
    }
    let mut trace =
        format!("seed {seed}, {} workers, {} pools\n{}\n", sim.workers, sim.pools.len(), sim.settings_text);
    for line in &sim.trace {
        trace.push_str(line);
        trace.push('\n');
    }
    Outcome { seed, steps: sim.steps, violation: sim.violation.take(), trace }
}
