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
//!
//! Every decision is [`core::RouterCore`]'s, which does no I/O and reads no clock; this file is
//! its I/O ([`RouterIo`]: oneshot replies, messages to server actors and other routers, actix
//! timers), and [`sim`] is another, a deterministic simulation of many routers.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::actors::messages::*;
use crate::actors::pool::{Permit, PoolKey, PoolShared, RouterMailbox};
use crate::actors::server::{AfterLease, ServerConnection, ServerLink};
use crate::config::hosts::TargetSessionAttrs;
use crate::protocol::PgError;

pub mod core;
pub mod sim;

use self::core::{Lendable, RouterCore, RouterIo, Timer, JANITOR_PERIOD};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
    /// Shared by this worker's clients: every copy of an actix address is an allocation of its
    /// own, and each client would otherwise hold one.
    static ROUTERS: RefCell<HashMap<PoolKey, Rc<Addr<Router>>>> = RefCell::new(HashMap::new());
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
    (*shared_local_router(pool)).clone()
}

/// [`local_router`], as the worker's one shared copy of its address.
pub fn shared_local_router(pool: &Arc<PoolShared>) -> Rc<Addr<Router>> {
    ROUTERS.with(|routers| {
        let mut routers = routers.borrow_mut();
        if let Some(router) = routers.get(&pool.key).filter(|r| r.connected()) {
            return router.clone();
        }
        let worker = worker_index();
        let router = Router::new(pool.clone(), worker).start();
        pool.set_router(worker, Arc::new(router.clone()));
        let router = Rc::new(router);
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

/// [`live_router`] for a shared copy of the address.
pub fn live_shared_router<'a>(held: &'a mut Rc<Addr<Router>>, pool: &Arc<PoolShared>) -> &'a Addr<Router> {
    if !held.connected() {
        log::error!("pool {}: router on worker {} died; using a new one", pool.key, worker_index());
        *held = shared_local_router(pool);
    }
    held
}

/// A server waiting in (or passing through) the router: its actor and its connection.
pub struct Held {
    server: Addr<ServerConnection>,
    link: ServerLink,
}

impl Lendable for Held {
    type Id = Addr<ServerConnection>;

    fn id(&self) -> Addr<ServerConnection> {
        self.server.clone()
    }

    fn healthy(&self) -> bool {
        self.link.is_healthy()
    }

    fn healthy_now(&self) -> bool {
        self.link.is_healthy_now()
    }

    fn born(&self) -> Instant {
        self.link.born()
    }

    fn generation(&self) -> usize {
        self.link.generation
    }

    fn process_id(&self) -> i32 {
        self.link.process_id
    }

    fn mark_idle(&self, pool: &PoolShared, now: Instant) {
        self.link.entry.idle(pool.census.clock.stamp(now));
    }

    fn serves(&self, attrs: TargetSessionAttrs) -> bool {
        crate::actors::server_open::role_reported(&self.link.params).is_none_or(|role| attrs.accepts(role))
    }
}

pub struct Router {
    core: RouterCore<Held, CheckoutReply>,
    /// The core's pool too, kept here so that the I/O can borrow it while the core is busy.
    pool: Arc<PoolShared>,
    /// Waiters are being queued again after a panic (see [`Router::restart`]).
    restarting: bool,
}

impl Router {
    pub fn new(pool: Arc<PoolShared>, worker: usize) -> Router {
        Router { core: RouterCore::new(pool.clone(), worker), pool, restarting: false }
    }

    /// Runs one event through the core with this actor as its I/O. A panic restarts the
    /// core in place ([`Router::restart`]): the address, which every client and server of
    /// this worker holds, stays valid.
    fn run(
        &mut self,
        ctx: &mut Context<Self>,
        event: impl FnOnce(&mut RouterCore<Held, CheckoutReply>, Instant, &mut ActorIo<'_>),
    ) {
        let Router { core, pool, .. } = self;
        let worker = core.worker();
        let ran = catch_unwind(AssertUnwindSafe(|| {
            event(core, Instant::now(), &mut ActorIo { ctx, pool, worker })
        }));
        if ran.is_err() {
            self.restart(ctx);
        }
    }

    /// A handler panicked, so the core's books cannot be trusted: a fresh core takes over.
    /// Waiting clients keep their place and their waiting time; idle servers close (their
    /// permits come back); servers out on lease or logging in come back here as always. A
    /// panic while the waiters are queued again gives up on them (they get an error) rather
    /// than loop.
    fn restart(&mut self, ctx: &mut Context<Self>) {
        let worker = self.core.worker();
        log::error!("pool {}: the router of worker {worker} panicked; restarted in place", self.pool.key);
        let fresh = RouterCore::new(self.pool.clone(), worker);
        let (waiters, idle) = std::mem::replace(&mut self.core, fresh).into_parts();
        for held in idle {
            held.server.do_send(Close);
        }
        if std::mem::replace(&mut self.restarting, true) {
            return;
        }
        for (waiter, since) in waiters {
            self.run(ctx, |core, now, io| core.queue(waiter, since, now, io));
        }
        self.restarting = false;
    }
}

/// The router's I/O: oneshot replies to clients, messages to server actors and other routers,
/// and actix timers.
struct ActorIo<'a> {
    ctx: &'a mut Context<Router>,
    pool: &'a Arc<PoolShared>,
    worker: usize,
}

impl RouterIo<Held> for ActorIo<'_> {
    type Waiter = CheckoutReply;

    fn waiter_gone(&self, waiter: &CheckoutReply) -> bool {
        waiter.is_closed()
    }

    fn offer(&mut self, waiter: CheckoutReply, held: Held) -> Result<(), Held> {
        match waiter.send(Ok(ServerOffer::new(held.server, held.link, self.ctx.address()))) {
            Ok(()) => Ok(()),
            Err(Ok(offer)) => {
                let (server, link) = offer.reclaim();
                Err(Held { server, link })
            }
            Err(Err(_)) => unreachable!("only offers are sent"),
        }
    }

    fn refuse(&mut self, waiter: CheckoutReply, error: PgError) {
        let _ = waiter.send(Err(error));
    }

    fn start_server(&mut self, permit: Permit) {
        ServerConnection::new(self.pool.clone(), self.ctx.address(), permit).start();
    }

    fn close(&mut self, held: Held) {
        held.server.do_send(Close);
    }

    fn check(&mut self, held: Held) {
        held.server.do_send(Return { link: held.link, after: AfterLease::Check });
    }

    /// The socket moves between threads, the permit goes with it, the old actor retires and
    /// the new router adopts the connection.
    fn migrate(&mut self, held: Held, to: usize) -> Result<(), Held> {
        let Some(router) = self.pool.router_addr(to) else { return Err(held) };
        match held.link.detach() {
            Ok(detached) => {
                router.do_send(Adopt(detached));
                held.server.do_send(Retire);
            }
            Err(e) => {
                log::warn!("pool {}: could not hand a server to another worker: {e}", self.pool.key);
                held.server.do_send(Close);
            }
        }
        Ok(())
    }

    fn ask_for_donations(&mut self) {
        for (worker, router) in self.pool.all_routers() {
            if worker != self.worker {
                router.donate(self.worker);
            }
        }
    }

    fn wake_at(&mut self, at: Instant, timer: Timer) {
        let wait = at.saturating_duration_since(Instant::now());
        self.ctx
            .run_later(wait, move |router, ctx| router.run(ctx, |core, now, io| core.timer(timer, now, io)));
    }
}

impl RouterMailbox for Addr<Router> {
    fn connected(&self) -> bool {
        Addr::connected(self)
    }

    fn permit_freed(&self) {
        self.do_send(PermitFreed);
    }

    fn shed_idle(&self) {
        self.do_send(ShedIdle);
    }

    fn grow(&self) {
        self.do_send(Grow);
    }

    fn donate(&self, to: usize) {
        self.do_send(Donate { to });
    }

    fn close_idle(&self, outdated_only: bool) {
        self.do_send(CloseIdle { outdated_only });
    }

    fn pool_freed(&self) {
        self.do_send(PoolFreed);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Also runs when a handler panicked and actix dropped the actor: the idle servers' actors are
/// told to close, so that their permits come back, and other workers stop sending servers here.
impl Drop for Router {
    fn drop(&mut self) {
        for held in self.core.take_idle_servers() {
            held.server.do_send(Close);
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(JANITOR_PERIOD, |router, ctx| {
            router.run(ctx, |core, now, io| core.janitor(now, io))
        });
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.pool.set_starving(self.core.worker(), false);
        // A stopped router must not stay this worker's router for the pool: a retired pool's
        // would keep the pool alive, and a new pool of the same name must get its own.
        let me = ctx.address();
        ROUTERS.with(|routers| {
            let mut routers = routers.borrow_mut();
            if routers.get(&self.pool.key).is_some_and(|r| **r == me) {
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
        self.run(ctx, |core, now, io| core.checkout(msg.reply, now, io));
    }
}

impl Handler<Checkin> for Router {
    type Result = ();

    fn handle(&mut self, msg: Checkin, ctx: &mut Context<Self>) {
        let mut link = msg.link;
        link.settle();
        let held = Held { server: msg.server, link };
        self.run(ctx, |core, now, io| core.checkin(held, msg.fresh, now, io));
    }
}

impl Handler<ServerGone> for Router {
    type Result = ();

    fn handle(&mut self, msg: ServerGone, ctx: &mut Context<Self>) {
        let jitter = rand::random::<f64>();
        self.run(ctx, |core, now, io| core.server_gone(msg.server, msg.login_error, now, jitter, io));
    }
}

impl Handler<Donate> for Router {
    type Result = ();

    fn handle(&mut self, msg: Donate, ctx: &mut Context<Self>) {
        self.run(ctx, |core, now, io| core.donate(msg.to, now, io));
    }
}

impl Handler<Adopt> for Router {
    type Result = ();

    fn handle(&mut self, msg: Adopt, ctx: &mut Context<Self>) {
        match msg.0.attach() {
            Ok(link) => {
                let entry = link.entry.clone();
                let server = ServerConnection::adopted(self.pool.clone(), ctx.address(), entry).start();
                self.run(ctx, |core, now, io| core.adopt(Held { server, link }, now, io));
            }
            // The permit came along in the detached link and went with it.
            Err(e) => {
                log::warn!("pool {}: could not take over a server from another worker: {e}", self.pool.key)
            }
        }
    }
}

impl Handler<PermitFreed> for Router {
    type Result = ();

    fn handle(&mut self, _: PermitFreed, ctx: &mut Context<Self>) {
        self.run(ctx, |core, now, io| core.permit_freed(now, io));
    }
}

impl Handler<Grow> for Router {
    type Result = ();

    fn handle(&mut self, _: Grow, ctx: &mut Context<Self>) {
        self.run(ctx, |core, now, io| core.grow_one(now, io));
    }
}

impl Handler<CloseIdle> for Router {
    type Result = ();

    fn handle(&mut self, msg: CloseIdle, ctx: &mut Context<Self>) {
        self.run(ctx, |core, _, io| core.close_idle(msg.outdated_only, io));
    }
}

impl Handler<ShedIdle> for Router {
    type Result = ();

    fn handle(&mut self, _: ShedIdle, ctx: &mut Context<Self>) {
        self.run(ctx, |core, _, io| core.shed_idle(io));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::registry::tests::{shared_with, shared_with_one_database, until, Crash};

    impl Handler<Crash> for Router {
        type Result = ();
        fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
            self.run(ctx, |_, _, _| panic!("test: Router crashes"));
        }
    }

    /// A handler that panics outside the core: actix drops the actor.
    struct CrashOutside;

    impl Message for CrashOutside {
        type Result = ();
    }

    impl Handler<CrashOutside> for Router {
        type Result = ();
        fn handle(&mut self, _: CrashOutside, _: &mut Context<Self>) {
            panic!("test: Router crashes outside its core");
        }
    }

    #[test]
    fn a_router_whose_core_panics_restarts_in_place_and_its_waiters_keep_their_place() {
        System::new().block_on(async {
            // Nothing listens at the pool's address: the waiter's answer is the login error,
            // once it has waited server_connect_timeout.
            let shared = shared_with("server_connect_timeout = 0.3");
            let member = shared.pool("d", "u").expect("pool");
            let pool = member.pool();
            let router = local_router(pool);
            let (reply, answer) = tokio::sync::oneshot::channel();
            router.do_send(Checkout { reply });
            router.send(Crash).await.expect("the router survives a panic in its core");
            assert!(router.connected(), "same address, still alive");
            assert_eq!(local_router(pool), router, "nobody needs a new one");
            match answer.await {
                Ok(Err(error)) => {
                    assert!(error.message.contains("server connection failed"), "{}", error.message)
                }
                Ok(Ok(_)) => panic!("nothing listens there"),
                Err(_) => panic!("the waiter queued before the panic was dropped instead of kept"),
            }
        });
    }

    #[test]
    fn a_router_that_panicked_is_replaced_for_whoever_holds_it() {
        System::new().block_on(async {
            let shared = shared_with_one_database();
            let member = shared.pool("d", "u").expect("pool");
            let pool = member.pool();
            let mut held = local_router(pool);
            pool.set_starving(0, true);
            assert!(held.send(CrashOutside).await.is_err(), "the handler panicked");
            until(|| !held.connected()).await;
            assert!(pool.starving_worker(1).is_none(), "a dead router is no longer offered servers");
            let replacement = live_router(&mut held, pool).clone();
            assert!(replacement.connected());
            assert!(held.connected(), "the holder now holds the new router");
            assert_eq!(pool.router_addr(0), Some(replacement.clone()), "other workers see the new one");
            assert_eq!(local_router(pool), replacement);
        });
    }
}
