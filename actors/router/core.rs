//! The Router's decisions, with no I/O and no clock of its own: which waiter gets which server,
//! when to open one, when to ask other workers for theirs, when a waiter has waited too long.
//!
//! [`RouterCore`] takes one call per event (a checkout, a server back, a server gone, a timer,
//! a donation request, ...) with the time of the event, and acts through [`RouterIo`]: offer,
//! refuse, start, close, check or move a server, ask other workers for servers, and wake it at
//! a given time. The actor in `mod.rs` is that I/O; the simulator in `sim.rs` is another, which
//! runs many routers and their shared limits under a seeded scheduler and a simulated clock.
//!
//! The pool's shared state ([`PoolShared`]: permits, hold, login backoff, the other workers'
//! loads) is read and written directly: it is plain memory shared by every worker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::pool::{Hold, Permit, PoolSettings, PoolShared, Refusal};
use crate::config::hosts::TargetSessionAttrs;
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;

/// Logins in flight per router: enough to fill a pool quickly, few enough that a burst of
/// clients does not storm PostgreSQL with connection attempts.
pub const MAX_CONNECTING: usize = 4;

/// How often idle servers are checked against `server_idle_timeout` and `server_lifetime`
/// (PgBouncer's janitor runs about as often).
pub const JANITOR_PERIOD: Duration = Duration::from_secs(1);

/// The shortest gap between two servers leaving one router for another worker. A move costs
/// two thread wake-ups and a socket re-registration, about as much as a transaction, and
/// queue lengths under steady load flicker from one transaction to the next: unthrottled,
/// servers bounced between workers on every other transaction. Throttled, an imbalance of
/// ten servers still evens out within a tenth of a second.
pub const MOVE_INTERVAL: Duration = Duration::from_millis(10);

/// A logged-in server connection as the router sees it.
pub trait Lendable {
    type Id: PartialEq;
    fn id(&self) -> Self::Id;
    /// Still open, and silent while idle, as far as this worker's reactor has seen.
    fn healthy(&self) -> bool;
    /// [`Self::healthy`], asked of the socket itself: for a server that just moved here.
    fn healthy_now(&self) -> bool {
        self.healthy()
    }
    fn born(&self) -> Instant;
    /// The pool's connection generation when it logged in.
    fn generation(&self) -> usize;
    fn process_id(&self) -> i32;
    /// It starts to wait idle in this router (SHOW SERVERS says so).
    fn mark_idle(&self, _pool: &PoolShared, _now: Instant) {}
    /// Still what `target_session_attrs` asks for, as far as the server last reported (a
    /// standby promoted since it logged in reports `in_hot_standby = off`).
    fn serves(&self, _attrs: TargetSessionAttrs) -> bool {
        true
    }
}

/// Whether `server` has outlived `lifetime` (zero: never) at `now`.
pub fn past_lifetime(born: Instant, lifetime: Duration, now: Instant) -> bool {
    !lifetime.is_zero() && now.saturating_duration_since(born) >= lifetime
}

/// The router's deferred work: [`RouterIo::wake_at`] asks for [`RouterCore::timer`] then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The oldest waiter becomes entitled to `reserve_pool_size`.
    Reserve,
    /// The oldest waiter reaches `query_wait_timeout`.
    WaitLimit,
    /// The login backoff step ends.
    Retry,
    /// The oldest waiter has waited `server_connect_timeout` while logins fail.
    GiveUp,
    /// A move to a starving worker is no longer throttled.
    Donation,
}

/// What the router does to the world.
pub trait RouterIo<S> {
    type Waiter;
    /// The waiting client left (disconnected, or its Kill took it out of the queue).
    fn waiter_gone(&self, waiter: &Self::Waiter) -> bool;
    /// Hands `server` to `waiter`; gives it back if the waiter is gone.
    fn offer(&mut self, waiter: Self::Waiter, server: S) -> Result<(), S>;
    fn refuse(&mut self, waiter: Self::Waiter, error: PgError);
    /// Opens a server for this router, holding `permit` for as long as it lives.
    fn start_server(&mut self, permit: Permit);
    fn close(&mut self, server: S);
    /// Runs `server_check_query` on it; it comes back through [`RouterCore::checkin`] or goes.
    fn check(&mut self, server: S);
    /// Moves it, with its permit, to worker `to`'s router; gives it back if that router is gone.
    fn migrate(&mut self, server: S, to: usize) -> Result<(), S>;
    /// Asks every other worker's router to send this one an idle server ([`RouterCore::donate`]).
    fn ask_for_donations(&mut self);
    fn wake_at(&mut self, at: Instant, timer: Timer);
}

struct Waiter<W> {
    since: Instant,
    waiter: W,
}

struct Idle<S> {
    server: S,
    since: Instant,
}

/// One pool's idle servers and waiting clients on one worker.
pub struct RouterCore<S: Lendable, W> {
    pool: Arc<PoolShared>,
    worker: usize,
    /// Most recently used last: lent first, so that surplus servers age out.
    idle: Vec<Idle<S>>,
    waiters: VecDeque<Waiter<W>>,
    connecting: usize,
    /// Idle servers sent to run `server_check_query`; they come back or go.
    checking: Vec<S::Id>,
    /// Servers this router started or adopted and has not seen go: idle, lent or logging in.
    owned: usize,
    /// The pool's settings, refreshed by the janitor: the shared copy is behind a lock that
    /// every worker reads, too costly per event.
    settings: Arc<PoolSettings>,
    starving: bool,
    /// Other pools under the shared limits were asked to close an idle server since this router
    /// last got a permit: once is enough, they close more as their servers come back.
    shed_asked: bool,
    scheduled: [bool; 5],
    /// When a server last left for another worker (see [`MOVE_INTERVAL`]).
    last_move: Option<Instant>,
}

impl<S: Lendable, W> RouterCore<S, W> {
    pub fn new(pool: Arc<PoolShared>, worker: usize) -> Self {
        let settings = pool.settings();
        RouterCore {
            pool,
            worker,
            idle: Vec::new(),
            waiters: VecDeque::new(),
            connecting: 0,
            checking: Vec::new(),
            owned: 0,
            settings,
            starving: false,
            shed_asked: false,
            scheduled: [false; 5],
            last_move: None,
        }
    }

    pub fn pool(&self) -> &Arc<PoolShared> {
        &self.pool
    }

    pub fn worker(&self) -> usize {
        self.worker
    }

    /// The settings this router decides by: the pool's, as of its last janitor round.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    pub fn idle_servers(&self) -> impl Iterator<Item = &S> {
        self.idle.iter().map(|i| &i.server)
    }

    /// For the simulator: something happens to a server while it idles here.
    pub fn idle_servers_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.idle.iter_mut().map(|i| &mut i.server)
    }

    /// Servers started or adopted here and not yet seen go.
    pub fn owned(&self) -> usize {
        self.owned
    }

    pub fn connecting(&self) -> usize {
        self.connecting
    }

    pub fn is_starving(&self) -> bool {
        self.starving
    }

    fn schedule(&mut self, io: &mut impl RouterIo<S, Waiter = W>, timer: Timer, at: Instant) {
        let flag = &mut self.scheduled[timer as usize];
        if !*flag {
            *flag = true;
            io.wake_at(at, timer);
        }
    }

    fn start_server(&mut self, permit: Permit, io: &mut impl RouterIo<S, Waiter = W>) {
        self.connecting += 1;
        self.owned += 1;
        io.start_server(permit);
    }

    /// A client needs a server: the most recently used idle one at once if nobody queues
    /// before it, else it waits in arrival order.
    pub fn checkout(&mut self, waiter: W, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        self.queue(waiter, now, now, io);
    }

    /// A client that has waited since `since` (queued in a router that was restarted).
    pub fn queue(&mut self, waiter: W, since: Instant, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        if self.waiters.is_empty() && self.pool.hold() == Hold::None {
            if let Some(server) = self.take_idle(now, io) {
                if let Err(server) = io.offer(waiter, server) {
                    self.keep_idle(server, now);
                }
                return;
            }
        }
        self.waiters.push_back(Waiter { since, waiter });
        self.grow(now, io);
        if !self.scheduled[Timer::WaitLimit as usize] {
            self.expire_waiters(now, io);
        }
        self.publish_load();
    }

    /// A clean server is free: just logged in (`fresh`), back from a lease, from its check, or
    /// cleaned up.
    pub fn checkin(&mut self, server: S, fresh: bool, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        if fresh {
            self.connecting = self.connecting.saturating_sub(1);
            self.pool.login_succeeded();
        }
        let id = server.id();
        self.checking.retain(|s| *s != id);
        // Back from a lease or a check the server is known clean: no health probe here.
        if self.worn(&server, now).is_some() {
            io.close(server);
        } else {
            self.place(server, now, io);
        }
        self.grow(now, io);
        self.publish_load();
    }

    /// A server of this router stopped (closed, died, or failed to log in: `login_error`); its
    /// permit was dropped with it.
    pub fn server_gone(
        &mut self,
        id: S::Id,
        login_error: Option<PgError>,
        now: Instant,
        jitter: f64,
        io: &mut impl RouterIo<S, Waiter = W>,
    ) {
        self.idle.retain(|i| i.server.id() != id);
        self.checking.retain(|s| *s != id);
        self.owned = self.owned.saturating_sub(1);
        self.publish_load();
        if let Some(error) = login_error {
            self.connecting = self.connecting.saturating_sub(1);
            self.pool.login_failed(&error, now, jitter);
        }
        self.grow(now, io);
    }

    /// Another worker starves at the limit: send it the oldest idle server if nobody waits here.
    pub fn donate(&mut self, to: usize, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        if self.waiters.is_empty() && !self.idle.is_empty() {
            if self.may_move(now) {
                let oldest = self.idle.remove(0);
                self.migrate(oldest.server, to, now, io);
            } else {
                self.schedule_donation(now, io);
            }
        }
    }

    /// A server moved here from another worker, with its permit.
    pub fn adopt(&mut self, server: S, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        self.owned += 1;
        // It may have closed, aged past server_lifetime, or been outdated by a reload on the
        // way; this reactor has not polled its socket yet, so the socket itself is asked.
        let unfit =
            if server.healthy_now() { self.worn(&server, now) } else { Some("it closed or spoke unasked") };
        match unfit {
            Some(reason) => {
                log::info!("pool {}: moved server {} closed, {reason}", self.pool.key, server.process_id());
                io.close(server);
            }
            None => self.place(server, now, io),
        }
        self.publish_load();
    }

    /// A permit was released somewhere, or the pool was resumed: serve waiters from idle
    /// servers (SUSPEND kept them idle while clients queued), then open servers for the rest.
    pub fn permit_freed(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        self.serve_from_idle(now, io);
        self.grow(now, io);
    }

    fn serve_from_idle(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        if self.pool.hold() != Hold::None {
            return;
        }
        // Each round serves a waiter, moves the server to another worker, or finds that every
        // waiter left.
        while !self.waiters.is_empty() {
            let Some(server) = self.take_idle(now, io) else { break };
            self.place(server, now, io);
        }
    }

    /// `min_pool_size` asks for one more server.
    pub fn grow_one(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        if self.pool.login_blocked(now).is_none() {
            if let Ok(permit) = self.pool.try_acquire(false) {
                self.start_server(permit, io);
            }
        }
    }

    /// PAUSE or KILL (all), or RECONNECT (`outdated_only`): close idle servers now.
    pub fn close_idle(&mut self, outdated_only: bool, io: &mut impl RouterIo<S, Waiter = W>) {
        let generation = self.pool.connection_generation();
        let (close, keep) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|idle| !outdated_only || idle.server.generation() != generation);
        self.idle = keep;
        for idle in close {
            io.close(idle.server);
        }
    }

    /// Another pool under a shared limit needs the slot: close the oldest idle server.
    pub fn shed_idle(&mut self, io: &mut impl RouterIo<S, Waiter = W>) {
        if !self.idle.is_empty() {
            let oldest = self.idle.remove(0);
            log::debug!(
                "pool {}: closing an idle server for another pool of its database or user",
                self.pool.key
            );
            io.close(oldest.server);
        }
    }

    pub fn timer(&mut self, timer: Timer, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        self.scheduled[timer as usize] = false;
        match timer {
            Timer::Reserve | Timer::Retry | Timer::GiveUp => self.grow(now, io),
            Timer::WaitLimit => self.expire_waiters(now, io),
            Timer::Donation => self.send_idle_elsewhere(now, io),
        }
    }

    /// The router stops (its pool was freed, or a handler panicked): idle servers close, so
    /// that their permits come back, and other workers stop sending servers here.
    pub fn stop(&mut self, io: &mut impl RouterIo<S, Waiter = W>) {
        self.pool.set_starving(self.worker, false);
        for idle in self.idle.drain(..) {
            io.close(idle.server);
        }
    }

    /// Releases what the router holds without acting: for a `Drop` with no I/O at hand.
    pub fn take_idle_servers(&mut self) -> Vec<S> {
        self.pool.set_starving(self.worker, false);
        self.idle.drain(..).map(|i| i.server).collect()
    }

    /// What a restart salvages: the waiters in order, with when each began to wait, and the
    /// idle servers.
    pub fn into_parts(mut self) -> (Vec<(W, Instant)>, Vec<S>) {
        let idle = self.take_idle_servers();
        (self.waiters.drain(..).map(|w| (w.waiter, w.since)).collect(), idle)
    }

    /// The most recently used idle server (the oldest with `server_round_robin`) that is
    /// still alive and young enough. One unused for `server_check_delay` is sent to run
    /// `server_check_query` first, and served to a waiter when it passes.
    fn take_idle(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) -> Option<S> {
        loop {
            let idle = match self.settings.server_round_robin {
                true if !self.idle.is_empty() => self.idle.remove(0),
                _ => self.idle.pop()?,
            };
            if let Some(reason) = self.unfit(&idle.server, now) {
                log::info!(
                    "pool {}: idle server {} closed, {reason}",
                    self.pool.key,
                    idle.server.process_id()
                );
                io.close(idle.server);
                continue;
            }
            if self.settings.server_check_query.is_some()
                && now.saturating_duration_since(idle.since) >= self.settings.server_check_delay
            {
                self.checking.push(idle.server.id());
                io.check(idle.server);
                continue;
            }
            return Some(idle.server);
        }
    }

    /// Opened before a reload changed how this pool's servers are reached.
    /// Why `server` must not be lent any more, if it must not.
    fn unfit(&self, server: &S, now: Instant) -> Option<&'static str> {
        if !server.healthy() {
            Some("it closed or spoke unasked")
        } else {
            self.worn(server, now)
        }
    }

    /// Whether `server` outlived `server_lifetime` or a reload outdated it: [`Self::unfit`]
    /// without the health probe, which costs a system call.
    fn worn(&self, server: &S, now: Instant) -> Option<&'static str> {
        if past_lifetime(server.born(), self.settings.server_lifetime, now) {
            Some("it outlived server_lifetime")
        } else if self.outdated(server) {
            Some("a reload changed its connection settings")
        } else if self.settings.target_session_attrs.checks_role()
            && !server.serves(self.settings.target_session_attrs)
        {
            Some("it is no longer what target_session_attrs asks for")
        } else {
            None
        }
    }

    fn outdated(&self, server: &S) -> bool {
        server.generation() != self.pool.connection_generation()
    }

    fn forget_gone_front(&mut self, io: &impl RouterIo<S, Waiter = W>) {
        while self.waiters.front().is_some_and(|w| io.waiter_gone(&w.waiter)) {
            self.waiters.pop_front();
        }
    }

    /// Opens servers for waiters that no login in flight will serve, within the limits.
    fn grow(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        // Only the front: this runs on every checkout and checkin, and a queue of a thousand
        // waiters must not cost a thousand checks each time. The janitor sweeps the rest.
        self.forget_gone_front(io);
        if self.pool.hold() != Hold::None {
            return;
        }
        if self.waiters.len() > self.connecting && self.backing_off(now, io) {
            return;
        }
        // A server being checked will serve a waiter soon, as a login in flight will.
        while self.connecting + self.checking.len() < self.waiters.len().min(MAX_CONNECTING) {
            let refusal = match self.pool.try_acquire(false) {
                Ok(permit) => {
                    self.shed_asked = false;
                    self.start_server(permit, io);
                    continue;
                }
                Err(refusal) => refusal,
            };
            if refusal == Refusal::PoolFull && self.reserve_due(now) {
                if let Ok(permit) = self.pool.try_acquire(true) {
                    log::info!("pool {}: taking connection from reserve_pool", self.pool.key);
                    self.start_server(permit, io);
                    continue;
                }
            }
            // Not only when starvation begins: it may have begun with this pool full, and then
            // a server of its own closed while another pool's took the shared slot.
            if refusal == Refusal::SharedLimit && !self.shed_asked {
                self.shed_asked = true;
                self.pool.shed_elsewhere();
            }
            self.starve(now, io);
            break;
        }
        self.update_starving();
    }

    /// Logins are failing: no new attempt until the backoff step ends. Waiters with no live
    /// server of this router to wait for keep waiting while the attempts go on, so that a
    /// PostgreSQL restart passes unseen by clients that held no server; one that has waited
    /// `server_connect_timeout` (at once if that is 0) gets the login error rather than hang.
    fn backing_off(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) -> bool {
        let Some((error, until)) = self.pool.login_blocked(now) else { return false };
        if self.owned == self.connecting {
            let patience = self.settings.server_connect_timeout;
            while self.waiters.front().is_some_and(|w| now.saturating_duration_since(w.since) >= patience) {
                if let Some(waiter) = self.waiters.pop_front() {
                    io.refuse(waiter.waiter, error.clone());
                }
            }
            if let Some(oldest) = self.waiters.front() {
                let at = oldest.since + patience;
                self.schedule(io, Timer::GiveUp, at);
            }
        }
        self.schedule(io, Timer::Retry, until);
        self.update_starving();
        true
    }

    /// Refuses waiters that waited `query_wait_timeout`, then comes back when the next oldest
    /// one would.
    fn expire_waiters(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        let timeout = self.settings.query_wait_timeout;
        if timeout.is_zero() {
            return;
        }
        while self.waiters.front().is_some_and(|w| now.saturating_duration_since(w.since) >= timeout) {
            if let Some(waiter) = self.waiters.pop_front() {
                io.refuse(waiter.waiter, PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "query_wait_timeout"));
            }
        }
        self.update_starving();
        if let Some(oldest) = self.waiters.front() {
            let at = oldest.since + timeout;
            self.schedule(io, Timer::WaitLimit, at);
        }
        self.publish_load();
    }

    fn reserve_due(&self, now: Instant) -> bool {
        self.settings.reserve_pool_size > 0
            && self
                .waiters
                .front()
                .is_some_and(|w| now.saturating_duration_since(w.since) >= self.settings.reserve_pool_timeout)
    }

    /// At the limit with clients waiting: ask other workers for their idle servers, and come
    /// back when the oldest waiter becomes entitled to the reserve.
    fn starve(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        // Donations are asked for once per starvation episode, not per waiting client: they
        // cross threads.
        if !self.starving {
            self.starving = true;
            self.pool.set_starving(self.worker, true);
            io.ask_for_donations();
        }
        // Only while the oldest waiter is not yet entitled: one that is and was still refused
        // (the reserve is in use) waits for a permit to free, and a check due at once would
        // run again at once, forever.
        if self.settings.reserve_pool_size > 0 {
            if let Some(oldest) = self.waiters.front() {
                let at = oldest.since + self.settings.reserve_pool_timeout;
                if at > now {
                    self.schedule(io, Timer::Reserve, at);
                }
            }
        }
    }

    fn update_starving(&mut self) {
        if self.starving && self.waiters.len() <= self.connecting + self.checking.len() {
            self.starving = false;
            self.shed_asked = false;
            self.pool.set_starving(self.worker, false);
        }
    }

    fn publish_load(&self) {
        self.pool.publish_oldest_waiter(self.worker, self.waiters.front().map(|w| w.since));
    }

    /// Whether a server may leave for another worker now, or must wait out [`MOVE_INTERVAL`].
    fn may_move(&self, now: Instant) -> bool {
        self.pool.workers() > 1
            && self.last_move.is_none_or(|at| now.saturating_duration_since(at) >= MOVE_INTERVAL)
    }

    /// A free server: to a worker whose clients queue clearly longer, else to the oldest waiter
    /// still listening, else to a starved worker, else idle here.
    fn place(&mut self, server: S, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        match self.pool.hold() {
            Hold::None => {}
            // SUSPEND keeps servers; PAUSE and KILL close them as they come back.
            Hold::Suspended => return self.keep_idle(server, now),
            Hold::Paused => return io.close(server),
        }
        if !self.waiters.is_empty() && self.may_move(now) {
            let my_wait =
                self.waiters.front().map_or(Duration::ZERO, |w| now.saturating_duration_since(w.since));
            if let Some(to) = self.pool.needier_worker(self.worker, my_wait, now) {
                return self.migrate(server, to, now, io);
            }
        }
        let mut server = server;
        while let Some(waiter) = self.waiters.pop_front() {
            match io.offer(waiter.waiter, server) {
                Ok(()) => {
                    // A stale starving flag would stop the next starvation from asking other
                    // workers for servers, and make them send theirs here for nobody.
                    self.update_starving();
                    return;
                }
                Err(back) => server = back,
            }
        }
        // Only to a worker starved at the limit here, on every checkin: one whose clients merely
        // wait (a few milliseconds under load) is the janitor's business, or servers would
        // bounce between busy workers (client TLS lost 10 % that way).
        let wanted = self.pool.starving_worker(self.worker);
        if let Some(to) = wanted.filter(|_| self.may_move(now)) {
            self.migrate(server, to, now, io);
        } else if self.pool.shared_limit_contended() {
            io.close(server);
        } else {
            self.keep_idle(server, now);
            if wanted.is_some() {
                self.schedule_donation(now, io);
            }
        }
    }

    /// Another worker with clients waiting for a server this one would keep idle: one starved
    /// at the limit, else one whose clients wait at all (for a login that may be slow).
    fn wanted_elsewhere(&self, now: Instant) -> Option<usize> {
        if self.pool.workers() == 1 {
            return None;
        }
        self.pool
            .starving_worker(self.worker)
            .or_else(|| self.pool.needier_worker(self.worker, Duration::ZERO, now))
    }

    fn keep_idle(&mut self, server: S, now: Instant) {
        server.mark_idle(&self.pool, now);
        self.idle.push(Idle { server, since: now });
    }

    /// Another worker's clients wait while a move is throttled: once the interval is over,
    /// give it the oldest idle server if this router still has no use for it, and so on while
    /// they wait, so that no client waits for a server idling on another thread.
    fn schedule_donation(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        let at = self.last_move.map_or(now, |at| (at + MOVE_INTERVAL).max(now));
        self.schedule(io, Timer::Donation, at);
    }

    fn migrate(&mut self, server: S, to: usize, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        self.last_move = Some(now);
        if let Err(server) = io.migrate(server, to) {
            self.keep_idle(server, now);
        }
    }

    /// Forgets waiters that left, and closes idle servers that died (so that `min_pool_size`
    /// replaces them), are past `server_lifetime`, were opened before a reload changed the
    /// connection settings, or idle past `server_idle_timeout` while the pool stays at or above
    /// `min_pool_size`. Then closes one idle server if another pool under a shared limit waits
    /// for the slot (the servers it asked for may have been lent out then, and come back idle
    /// under settings this router had not read yet), sends one to another worker whose clients
    /// wait (for a slow login, say: nothing else would tell this router they do), and watches
    /// `query_wait_timeout` as the settings now say.
    pub fn janitor(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        self.waiters.retain(|w| !io.waiter_gone(&w.waiter));
        self.update_starving();
        self.publish_load();
        self.settings = self.pool.settings();
        let settings = self.settings.clone();
        let mut may_close = self.pool.server_count().saturating_sub(settings.min_pool_size);
        let timeout = settings.server_idle_timeout;
        let generation = self.pool.connection_generation();
        for idle in std::mem::take(&mut self.idle) {
            let idle_too_long =
                !timeout.is_zero() && now.saturating_duration_since(idle.since) >= timeout && may_close > 0;
            if idle_too_long
                || past_lifetime(idle.server.born(), settings.server_lifetime, now)
                || !idle.server.healthy()
                || idle.server.generation() != generation
            {
                may_close = may_close.saturating_sub(1);
                log::debug!(
                    "pool {}: closing server {} (idle timeout, lifetime or new connection settings)",
                    self.pool.key,
                    idle.server.process_id()
                );
                io.close(idle.server);
            } else {
                self.idle.push(idle);
            }
        }
        self.serve_from_idle(now, io);
        if !self.idle.is_empty() && self.pool.shared_limit_contended() {
            self.shed_idle(io);
        }
        self.send_idle_elsewhere(now, io);
        if !self.scheduled[Timer::WaitLimit as usize] {
            self.expire_waiters(now, io);
        }
    }

    /// With no use for its idle servers, gives the oldest to a worker whose clients wait, and
    /// comes back for the next once moves are no longer throttled.
    fn send_idle_elsewhere(&mut self, now: Instant, io: &mut impl RouterIo<S, Waiter = W>) {
        if !self.waiters.is_empty() || self.idle.is_empty() {
            return;
        }
        let Some(to) = self.wanted_elsewhere(now) else { return };
        if !self.may_move(now) {
            return self.schedule_donation(now, io);
        }
        let oldest = self.idle.remove(0);
        self.migrate(oldest.server, to, now, io);
        if !self.idle.is_empty() {
            self.schedule_donation(now, io);
        }
    }
}
