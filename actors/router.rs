//! The Router: one per pool per worker, owning that worker's idle servers and waiting clients.
//!
//! Takes [`Checkout`] from clients of its worker and answers with a server and its connection
//! ([`ServerOffer`]), at once from the idle list (most recently used first, so that surplus
//! servers age out; checked alive first) or later, strictly in arrival order. Clean servers come
//! back with [`Checkin`], straight from the client at the end of a transaction: one message to
//! release, one to lease.
//!
//! When it has waiters and no idle server it takes a permit from the pool's shared limits and
//! starts a [`ServerConnection`] on this same arbiter, so a client and its server always share a
//! thread. At the limit it marks itself starving: other workers then give up idle servers
//! ([`Donate`]: the socket moves, no reconnection) and wake it when a permit frees
//! ([`PermitFreed`]). Once the oldest waiter has waited `reserve_pool_timeout`, it may grow into
//! `reserve_pool_size`; one that waited `query_wait_timeout` is refused. A periodic janitor
//! closes idle servers past `server_idle_timeout` or `server_lifetime`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::actors::messages::*;
use crate::actors::pool::{Hold, PoolKey, PoolSettings, PoolShared, Refusal};
use crate::actors::server::{AfterLease, ServerConnection, ServerLink};
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;

/// Logins in flight per router: enough to fill a pool quickly, few enough that a burst of
/// clients does not storm PostgreSQL with connection attempts.
const MAX_CONNECTING: usize = 4;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
    static ROUTERS: RefCell<HashMap<PoolKey, Addr<Router>>> = RefCell::new(HashMap::new());
}

/// Called once on each worker arbiter's thread so actors there know their worker slot.
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// This worker's router for `pool`, started on the current arbiter on first use.
pub fn local_router(pool: &Arc<PoolShared>) -> Addr<Router> {
    ROUTERS.with(|routers| {
        let mut routers = routers.borrow_mut();
        if let Some(router) = routers.get(&pool.key).filter(|r| r.connected()) {
            return router.clone();
        }
        let worker = worker_index();
        let router = Router::new(pool.clone(), worker).start();
        pool.set_router(worker, router.clone());
        routers.insert(pool.key.clone(), router.clone());
        router
    })
}

/// `held` if that router is alive, else this worker's live router for `pool` (a new one if the
/// old one panicked: actix restarts no actor by itself).
pub fn live_router<'a>(held: &'a mut Addr<Router>, pool: &Arc<PoolShared>) -> &'a Addr<Router> {
    if !held.connected() {
        log::error!("pool {}: router on worker {} died; using a new one", pool.key, worker_index());
        *held = local_router(pool);
    }
    held
}

struct Waiter {
    since: Instant,
    reply: CheckoutReply,
}

/// An idle server: its actor and its connection, waiting here for the next client.
struct Idle {
    server: Addr<ServerConnection>,
    link: ServerLink,
    since: Instant,
}

/// How often idle servers are checked against `server_idle_timeout` and `server_lifetime`
/// (PgBouncer's janitor runs about as often).
const JANITOR_PERIOD: Duration = Duration::from_secs(1);

/// The shortest gap between two servers leaving one router for another worker. A move costs
/// two thread wake-ups and a socket re-registration, about as much as a transaction, and
/// queue lengths under steady load flicker from one transaction to the next: unthrottled,
/// servers bounced between workers on every other transaction. Throttled, an imbalance of
/// ten servers still evens out within a tenth of a second.
const MOVE_INTERVAL: Duration = Duration::from_millis(10);

pub struct Router {
    pool: Arc<PoolShared>,
    worker: usize,
    /// Most recently used last: lent first, so that surplus servers age out.
    idle: Vec<Idle>,
    waiters: VecDeque<Waiter>,
    connecting: usize,
    /// Idle servers sent to run `server_check_query`; they come back with a [`Checkin`] or go.
    checking: Vec<Addr<ServerConnection>>,
    /// Servers this router started or adopted and has not seen go: idle, lent or logging in.
    owned: usize,
    /// The pool's settings, refreshed by the janitor: the shared copy is behind a lock that
    /// every worker reads, too costly per message.
    settings: Arc<PoolSettings>,
    starving: bool,
    reserve_check_scheduled: bool,
    wait_check_scheduled: bool,
    retry_scheduled: bool,
    give_up_scheduled: bool,
    /// When a server last left for another worker (see [`MOVE_INTERVAL`]).
    last_move: Option<Instant>,
    donation_scheduled: bool,
}

impl Router {
    pub fn new(pool: Arc<PoolShared>, worker: usize) -> Router {
        let settings = pool.settings();
        Router {
            pool,
            worker,
            idle: Vec::new(),
            waiters: VecDeque::new(),
            connecting: 0,
            checking: Vec::new(),
            owned: 0,
            settings,
            starving: false,
            reserve_check_scheduled: false,
            wait_check_scheduled: false,
            retry_scheduled: false,
            give_up_scheduled: false,
            last_move: None,
            donation_scheduled: false,
        }
    }

    fn start_server(&mut self, ctx: &mut Context<Self>) {
        self.connecting += 1;
        self.owned += 1;
        ServerConnection::new(self.pool.clone(), ctx.address()).start();
    }

    /// The most recently used idle server (the oldest with `server_round_robin`) that is
    /// still alive and young enough. One unused for `server_check_delay` is sent to run
    /// `server_check_query` first, and served to a waiter when it passes.
    fn take_idle(&mut self) -> Option<(Addr<ServerConnection>, ServerLink)> {
        let lifetime = self.settings.server_lifetime;
        loop {
            let idle = match self.settings.server_round_robin {
                true if !self.idle.is_empty() => self.idle.remove(0),
                _ => self.idle.pop()?,
            };
            let unfit = if !idle.link.is_healthy() {
                Some("it closed or spoke unasked")
            } else if idle.link.past_lifetime(lifetime) {
                Some("it outlived server_lifetime")
            } else if self.outdated(&idle.link) {
                Some("a reload changed its connection settings")
            } else {
                None
            };
            if let Some(reason) = unfit {
                log::info!("pool {}: idle server {} closed, {reason}", self.pool.key, idle.link.process_id);
                idle.server.do_send(Close);
                continue;
            }
            if self.settings.server_check_query.is_some()
                && idle.since.elapsed() >= self.settings.server_check_delay
            {
                self.checking.push(idle.server.clone());
                idle.server.do_send(Return { link: idle.link, after: AfterLease::Check });
                continue;
            }
            return Some((idle.server, idle.link));
        }
    }

    /// Opened before a reload changed how this pool's servers are reached.
    fn outdated(&self, link: &ServerLink) -> bool {
        link.generation != self.pool.connection_generation()
    }

    /// Opens servers for waiters that no login in flight will serve, within the limits.
    fn grow(&mut self, ctx: &mut Context<Self>) {
        // Only the front: this runs on every checkout and checkin, and a queue of a thousand
        // waiters must not cost a thousand checks each time. The janitor sweeps the rest.
        while self.waiters.front().is_some_and(|w| w.reply.is_closed()) {
            self.waiters.pop_front();
        }
        if self.pool.hold() != Hold::None {
            return;
        }
        if self.waiters.len() > self.connecting && self.backing_off(ctx) {
            return;
        }
        // A server being checked will serve a waiter soon, as a login in flight will.
        while self.connecting + self.checking.len() < self.waiters.len().min(MAX_CONNECTING) {
            let refusal = match self.pool.try_acquire(false) {
                Ok(()) => {
                    self.start_server(ctx);
                    continue;
                }
                Err(refusal) => refusal,
            };
            if refusal == Refusal::PoolFull && self.reserve_due() && self.pool.try_acquire(true).is_ok() {
                log::info!("pool {}: taking connection from reserve_pool", self.pool.key);
                self.start_server(ctx);
                continue;
            }
            if refusal == Refusal::SharedLimit && !self.starving {
                self.pool.shed_elsewhere();
            }
            self.starve(ctx);
            break;
        }
        self.update_starving();
    }

    /// Logins are failing: no new attempt until the backoff step ends. Waiters with no live
    /// server of this router to wait for keep waiting while the attempts go on, so that a
    /// PostgreSQL restart passes unseen by clients that held no server; one that has waited
    /// `server_connect_timeout` (at once if that is 0) gets the login error rather than hang.
    fn backing_off(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some((error, until)) = self.pool.login_blocked() else { return false };
        if self.owned == self.connecting {
            let patience = self.settings.server_connect_timeout;
            while self.waiters.front().is_some_and(|w| w.since.elapsed() >= patience) {
                if let Some(waiter) = self.waiters.pop_front() {
                    let _ = waiter.reply.send(Err(error.clone()));
                }
            }
            if let Some(oldest) = self.waiters.front() {
                if !self.give_up_scheduled {
                    self.give_up_scheduled = true;
                    ctx.run_later(patience.saturating_sub(oldest.since.elapsed()), |router, ctx| {
                        router.give_up_scheduled = false;
                        router.grow(ctx);
                    });
                }
            }
        }
        if !self.retry_scheduled {
            self.retry_scheduled = true;
            ctx.run_later(until.saturating_duration_since(Instant::now()), |router, ctx| {
                router.retry_scheduled = false;
                router.grow(ctx);
            });
        }
        self.update_starving();
        true
    }

    /// Disconnects waiters that waited `query_wait_timeout`, then comes back when the next
    /// oldest one would.
    fn expire_waiters(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.settings.query_wait_timeout;
        if timeout.is_zero() {
            return;
        }
        while self.waiters.front().is_some_and(|w| w.since.elapsed() >= timeout) {
            if let Some(waiter) = self.waiters.pop_front() {
                let error = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "query_wait_timeout");
                let _ = waiter.reply.send(Err(error));
            }
        }
        self.update_starving();
        if let Some(oldest) = self.waiters.front() {
            if !self.wait_check_scheduled {
                self.wait_check_scheduled = true;
                ctx.run_later(timeout.saturating_sub(oldest.since.elapsed()), |router, ctx| {
                    router.wait_check_scheduled = false;
                    router.expire_waiters(ctx);
                });
            }
        }
    }

    fn reserve_due(&self) -> bool {
        let settings = self.settings.clone();
        settings.reserve_pool_size > 0
            && self.waiters.front().is_some_and(|w| w.since.elapsed() >= settings.reserve_pool_timeout)
    }

    /// At the limit with clients waiting: ask other workers for their idle servers, and come
    /// back when the oldest waiter becomes entitled to the reserve.
    fn starve(&mut self, ctx: &mut Context<Self>) {
        // Donations are asked for once per starvation episode, not per waiting client: they
        // cross threads.
        if !self.starving {
            self.starving = true;
            self.pool.set_starving(self.worker, true);
            for (worker, router) in self.pool.all_routers() {
                if worker != self.worker {
                    router.do_send(Donate { to: ctx.address() });
                }
            }
        }
        let settings = self.settings.clone();
        if settings.reserve_pool_size > 0 && !self.reserve_check_scheduled {
            if let Some(oldest) = self.waiters.front() {
                let wait = settings.reserve_pool_timeout.saturating_sub(oldest.since.elapsed());
                self.reserve_check_scheduled = true;
                ctx.run_later(wait, |router, ctx| {
                    router.reserve_check_scheduled = false;
                    router.grow(ctx);
                });
            }
        }
    }

    fn update_starving(&mut self) {
        if self.starving && self.waiters.len() <= self.connecting + self.checking.len() {
            self.starving = false;
            self.pool.set_starving(self.worker, false);
        }
    }

    fn publish_load(&self) {
        self.pool.publish_oldest_waiter(self.worker, self.waiters.front().map(|w| w.since));
    }

    /// Whether a server may leave for another worker now, or must wait out [`MOVE_INTERVAL`].
    fn may_move(&self) -> bool {
        self.pool.workers() > 1 && self.last_move.is_none_or(|at| at.elapsed() >= MOVE_INTERVAL)
    }

    /// A free server: to a worker whose clients queue clearly longer, else to the oldest waiter
    /// still listening, else to a starved worker, else idle here.
    fn place(&mut self, server: Addr<ServerConnection>, link: ServerLink, ctx: &mut Context<Self>) {
        match self.pool.hold() {
            Hold::None => {}
            // SUSPEND keeps servers; PAUSE and KILL close them as they come back.
            Hold::Suspended => return self.keep_idle(server, link),
            Hold::Paused => return server.do_send(Close),
        }
        if !self.waiters.is_empty() && self.may_move() {
            let my_wait = self.waiters.front().map_or(Duration::ZERO, |w| w.since.elapsed());
            if let Some(to) = self.pool.needier_router(self.worker, my_wait) {
                self.migrate(server, link, to);
                return;
            }
        }
        let (mut server, mut link) = (server, link);
        while let Some(waiter) = self.waiters.pop_front() {
            match waiter.reply.send(Ok(ServerOffer::new(server, link, ctx.address()))) {
                Ok(()) => {
                    // A stale starving flag would stop the next starvation from asking other
                    // workers for servers, and make them send theirs here for nobody.
                    self.update_starving();
                    return;
                }
                Err(Ok(offer)) => (server, link) = offer.reclaim(),
                Err(Err(_)) => unreachable!("only offers are sent"),
            }
        }
        let starving = self.pool.starving_router(self.worker);
        if let Some(to) = starving.as_ref().filter(|_| self.may_move()) {
            self.migrate(server, link, to.clone());
        } else if self.pool.shared_limit_contended(&self.settings) {
            server.do_send(Close);
        } else {
            self.keep_idle(server, link);
            if starving.is_some() {
                self.schedule_donation(ctx);
            }
        }
    }

    fn keep_idle(&mut self, server: Addr<ServerConnection>, link: ServerLink) {
        let since = Instant::now();
        link.entry.idle(self.pool.census.clock.stamp(since));
        self.idle.push(Idle { server, link, since });
    }

    /// Another worker starves while a move is throttled: once the interval is over, give it
    /// the oldest idle server if this router still has no use for it, and so on while it
    /// starves, so that no client waits for a server idling on another thread.
    fn schedule_donation(&mut self, ctx: &mut Context<Self>) {
        if self.donation_scheduled {
            return;
        }
        self.donation_scheduled = true;
        let wait = self.last_move.map_or(Duration::ZERO, |at| MOVE_INTERVAL.saturating_sub(at.elapsed()));
        ctx.run_later(wait, |router, ctx| {
            router.donation_scheduled = false;
            if !router.waiters.is_empty() || router.idle.is_empty() {
                return;
            }
            if let Some(to) = router.pool.starving_router(router.worker) {
                let oldest = router.idle.remove(0);
                router.migrate(oldest.server, oldest.link, to);
                if !router.idle.is_empty() {
                    router.schedule_donation(ctx);
                }
            }
        });
    }

    /// Hands a server to another worker's router: the socket moves between threads, the
    /// permit goes with it, the old actor retires and the new router adopts the connection.
    fn migrate(&mut self, server: Addr<ServerConnection>, link: ServerLink, to: Addr<Router>) {
        self.last_move = Some(Instant::now());
        if !to.connected() {
            self.keep_idle(server, link);
            return;
        }
        match link.detach() {
            Ok(detached) => {
                to.do_send(Adopt(detached));
                server.do_send(Retire);
            }
            Err(e) => {
                log::warn!("pool {}: could not hand a server to another worker: {e}", self.pool.key);
                server.do_send(Close);
            }
        }
    }

    /// Forgets waiters that left, and closes idle servers that died (so that `min_pool_size`
    /// replaces them), are past `server_lifetime`, were opened before a reload changed the
    /// connection settings, or idle past `server_idle_timeout` while the pool stays at or above
    /// `min_pool_size`.
    fn janitor(&mut self) {
        self.waiters.retain(|w| !w.reply.is_closed());
        self.update_starving();
        self.settings = self.pool.settings();
        let settings = self.settings.clone();
        let mut may_close = self.pool.server_count().saturating_sub(settings.min_pool_size);
        let timeout = settings.server_idle_timeout;
        let mut keep = Vec::with_capacity(self.idle.len());
        let generation = self.pool.connection_generation();
        for idle in std::mem::take(&mut self.idle) {
            let idle_too_long = !timeout.is_zero() && idle.since.elapsed() >= timeout && may_close > 0;
            if idle_too_long
                || idle.link.past_lifetime(settings.server_lifetime)
                || !idle.link.is_healthy()
                || idle.link.generation != generation
            {
                may_close = may_close.saturating_sub(1);
                log::debug!(
                    "pool {}: closing server {} (idle timeout, lifetime or new connection settings)",
                    self.pool.key,
                    idle.link.process_id
                );
                idle.server.do_send(Close);
            } else {
                keep.push(idle);
            }
        }
        self.idle = keep;
    }
}

/// Also runs when a handler panicked and actix dropped the actor: the idle servers' actors are
/// told to close, so that their permits come back, and other workers stop sending servers here.
impl Drop for Router {
    fn drop(&mut self) {
        self.pool.set_starving(self.worker, false);
        for idle in self.idle.drain(..) {
            idle.server.do_send(Close);
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(JANITOR_PERIOD, |router, _| router.janitor());
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.pool.set_starving(self.worker, false);
        // A stopped router must not stay this worker's router for the pool: a retired pool's
        // would keep the pool alive, and a new pool of the same name must get its own.
        let me = ctx.address();
        ROUTERS.with(|routers| {
            let mut routers = routers.borrow_mut();
            if routers.get(&self.pool.key).is_some_and(|r| *r == me) {
                routers.remove(&self.pool.key);
            }
        });
    }
}

impl Handler<PoolFreed> for Router {
    type Result = ();

    fn handle(&mut self, _: PoolFreed, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Checkout> for Router {
    type Result = ();

    fn handle(&mut self, msg: Checkout, ctx: &mut Context<Self>) {
        if self.waiters.is_empty() && self.pool.hold() == Hold::None {
            if let Some((server, link)) = self.take_idle() {
                if let Err(Ok(offer)) = msg.reply.send(Ok(ServerOffer::new(server, link, ctx.address()))) {
                    let (server, link) = offer.reclaim();
                    self.keep_idle(server, link);
                }
                return;
            }
        }
        self.waiters.push_back(Waiter { since: Instant::now(), reply: msg.reply });
        self.grow(ctx);
        if !self.wait_check_scheduled {
            self.expire_waiters(ctx);
        }
        self.publish_load();
    }
}

impl Handler<Checkin> for Router {
    type Result = ();

    fn handle(&mut self, msg: Checkin, ctx: &mut Context<Self>) {
        if msg.fresh {
            self.connecting = self.connecting.saturating_sub(1);
            self.pool.login_succeeded();
        }
        self.checking.retain(|s| *s != msg.server);
        let mut link = msg.link;
        link.settle();
        if link.past_lifetime(self.settings.server_lifetime) || self.outdated(&link) {
            msg.server.do_send(Close);
        } else {
            self.place(msg.server, link, ctx);
        }
        self.grow(ctx);
        self.publish_load();
    }
}

impl Handler<ServerGone> for Router {
    type Result = ();

    fn handle(&mut self, msg: ServerGone, ctx: &mut Context<Self>) {
        self.idle.retain(|i| i.server != msg.server);
        self.checking.retain(|s| *s != msg.server);
        self.owned = self.owned.saturating_sub(1);
        self.publish_load();
        if let Some(error) = msg.login_error {
            self.connecting = self.connecting.saturating_sub(1);
            self.pool.login_failed(&error);
        }
        self.grow(ctx);
    }
}

impl Handler<Donate> for Router {
    type Result = ();

    fn handle(&mut self, msg: Donate, ctx: &mut Context<Self>) {
        if self.waiters.is_empty() && !self.idle.is_empty() {
            if self.may_move() {
                let oldest = self.idle.remove(0);
                self.migrate(oldest.server, oldest.link, msg.to);
            } else {
                self.schedule_donation(ctx);
            }
        }
    }
}

impl Handler<Adopt> for Router {
    type Result = ();

    fn handle(&mut self, msg: Adopt, ctx: &mut Context<Self>) {
        match msg.0.attach() {
            Ok(link) => {
                let entry = link.entry.clone();
                let server = ServerConnection::adopted(self.pool.clone(), ctx.address(), entry).start();
                self.owned += 1;
                self.place(server, link, ctx);
                self.publish_load();
            }
            Err(e) => {
                // The retired actor kept the permit for this connection: give it back here.
                log::warn!("pool {}: could not take over a server from another worker: {e}", self.pool.key);
                self.pool.release();
            }
        }
    }
}

impl Handler<PermitFreed> for Router {
    type Result = ();

    fn handle(&mut self, _: PermitFreed, ctx: &mut Context<Self>) {
        self.grow(ctx);
    }
}

impl Handler<Grow> for Router {
    type Result = ();

    fn handle(&mut self, _: Grow, ctx: &mut Context<Self>) {
        if self.pool.login_blocked().is_none() && self.pool.try_acquire(false).is_ok() {
            self.start_server(ctx);
        }
    }
}

impl Handler<CloseIdle> for Router {
    type Result = ();

    fn handle(&mut self, msg: CloseIdle, _: &mut Context<Self>) {
        let generation = self.pool.connection_generation();
        let (close, keep) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|idle| !msg.outdated_only || idle.link.generation != generation);
        self.idle = keep;
        for idle in close {
            idle.server.do_send(Close);
        }
    }
}

impl Handler<ShedIdle> for Router {
    type Result = ();

    fn handle(&mut self, _: ShedIdle, _: &mut Context<Self>) {
        if !self.idle.is_empty() {
            let oldest = self.idle.remove(0);
            log::debug!(
                "pool {}: closing an idle server for another pool of its database or user",
                self.pool.key
            );
            oldest.server.do_send(Close);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::registry::tests::{shared_with_one_database, until, Crash};

    impl Handler<Crash> for Router {
        type Result = ();
        fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
            panic!("test: Router crashes");
        }
    }

    #[test]
    fn a_router_that_panicked_is_replaced_for_whoever_holds_it() {
        System::new().block_on(async {
            let shared = shared_with_one_database();
            let member = shared.pool("d", "u").expect("pool");
            let pool = member.pool();
            let mut held = local_router(pool);
            pool.set_starving(0, true);
            assert!(held.send(Crash).await.is_err(), "the handler panicked");
            until(|| !held.connected()).await;
            assert!(pool.starving_router(1).is_none(), "a dead router is no longer offered servers");
            let replacement = live_router(&mut held, pool).clone();
            assert!(replacement.connected());
            assert!(held.connected(), "the holder now holds the new router");
            assert_eq!(pool.router(0), Some(replacement.clone()), "other workers see the new one");
            assert_eq!(local_router(pool), replacement);
        });
    }
}
