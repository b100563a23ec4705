//! The Router: one per pool per worker, owning that worker's idle servers and waiting clients.
//!
//! Takes [`Checkout`] from clients of its worker and answers with a server, at once from the idle
//! list (most recently used first, so that surplus servers age out) or later, strictly in
//! arrival order. When it has waiters and no idle server it takes a permit from the pool's
//! shared limits and starts a [`ServerConnection`] on this same arbiter, so a client and its
//! server always share a thread. At the limit it marks itself starving: other workers then give
//! up idle servers ([`Donate`]: the socket moves, no reconnection) and wake it when a permit
//! frees ([`PermitFreed`]). Once the oldest
//! waiter has waited `reserve_pool_timeout`, it may grow into `reserve_pool_size`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::actors::messages::*;
use crate::actors::pool::{PoolKey, PoolShared};
use crate::actors::server::ServerConnection;
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

struct Waiter {
    since: Instant,
    reply: CheckoutReply,
}

pub struct Router {
    pool: Arc<PoolShared>,
    worker: usize,
    idle: Vec<Addr<ServerConnection>>,
    waiters: VecDeque<Waiter>,
    connecting: usize,
    starving: bool,
    reserve_check_scheduled: bool,
    wait_check_scheduled: bool,
}

impl Router {
    pub fn new(pool: Arc<PoolShared>, worker: usize) -> Router {
        Router {
            pool,
            worker,
            idle: Vec::new(),
            waiters: VecDeque::new(),
            connecting: 0,
            starving: false,
            reserve_check_scheduled: false,
            wait_check_scheduled: false,
        }
    }

    fn start_server(&mut self, ctx: &mut Context<Self>) {
        self.connecting += 1;
        ServerConnection::new(self.pool.clone(), ctx.address()).start();
    }

    /// Opens servers for waiters that no login in flight will serve, within the limits.
    fn grow(&mut self, ctx: &mut Context<Self>) {
        self.waiters.retain(|w| !w.reply.is_closed());
        while self.connecting < self.waiters.len().min(MAX_CONNECTING) {
            if self.pool.try_acquire(false) {
                self.start_server(ctx);
                continue;
            }
            if self.reserve_due() && self.pool.try_acquire(true) {
                log::info!("pool {}: taking connection from reserve_pool", self.pool.key);
                self.start_server(ctx);
                continue;
            }
            self.starve(ctx);
            break;
        }
        self.update_starving();
    }

    /// Disconnects waiters that waited `query_wait_timeout`, then comes back when the next
    /// oldest one would.
    fn expire_waiters(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.pool.settings().query_wait_timeout;
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
        let settings = self.pool.settings();
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
        let settings = self.pool.settings();
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
        if self.starving && self.waiters.len() <= self.connecting {
            self.starving = false;
            self.pool.set_starving(self.worker, false);
        }
    }

    /// Gives `server` to the oldest waiter still listening; false if there is none.
    fn hand_to_waiter(&mut self, server: &Addr<ServerConnection>, me: Addr<Router>) -> bool {
        while let Some(waiter) = self.waiters.pop_front() {
            match waiter.reply.send(Ok(ServerOffer::new(server.clone(), me.clone()))) {
                Ok(()) => return true,
                // Not delivered: take it back quietly rather than let it return itself.
                Err(Ok(offer)) => drop(offer.claim()),
                Err(Err(_)) => {}
            }
        }
        false
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.pool.set_starving(self.worker, false);
    }
}

impl Handler<Checkout> for Router {
    type Result = ();

    fn handle(&mut self, msg: Checkout, ctx: &mut Context<Self>) {
        if self.waiters.is_empty() {
            if let Some(server) = self.idle.pop() {
                if let Err(Ok(offer)) = msg.reply.send(Ok(ServerOffer::new(server, ctx.address()))) {
                    self.idle.push(offer.claim());
                }
                return;
            }
        }
        self.waiters.push_back(Waiter { since: Instant::now(), reply: msg.reply });
        self.grow(ctx);
        if !self.wait_check_scheduled {
            self.expire_waiters(ctx);
        }
    }
}

impl Handler<ServerIdle> for Router {
    type Result = ();

    fn handle(&mut self, msg: ServerIdle, ctx: &mut Context<Self>) {
        if msg.fresh {
            self.connecting = self.connecting.saturating_sub(1);
        }
        if !self.hand_to_waiter(&msg.server, ctx.address()) {
            match self.pool.starving_router(self.worker) {
                Some(to) => msg.server.do_send(Migrate { to }),
                None => self.idle.push(msg.server),
            }
        }
        self.grow(ctx);
    }
}

impl Handler<ServerGone> for Router {
    type Result = ();

    fn handle(&mut self, msg: ServerGone, ctx: &mut Context<Self>) {
        self.idle.retain(|s| *s != msg.server);
        if let Some(error) = msg.login_error {
            self.connecting = self.connecting.saturating_sub(1);
            log::warn!("pool {}: {}", self.pool.key, error.message);
            for waiter in self.waiters.drain(..) {
                let _ = waiter.reply.send(Err(error.clone()));
            }
            self.update_starving();
            return;
        }
        self.grow(ctx);
    }
}

impl Handler<Donate> for Router {
    type Result = ();

    fn handle(&mut self, msg: Donate, _: &mut Context<Self>) {
        if self.waiters.is_empty() && !self.idle.is_empty() {
            let oldest = self.idle.remove(0);
            oldest.do_send(Migrate { to: msg.to });
        }
    }
}

impl Handler<Adopt> for Router {
    type Result = ();

    fn handle(&mut self, msg: Adopt, ctx: &mut Context<Self>) {
        ServerConnection::adopt(self.pool.clone(), ctx.address(), msg.0).start();
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
        if self.pool.try_acquire(false) {
            self.start_server(ctx);
        }
    }
}
