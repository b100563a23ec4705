//! The data path of one client: a single loop that moves bytes between the client socket and
//! the socket of the server it leases, with no mailbox hop per message.
//!
//! The loop reads whatever is available on either side, frames it (tag + length only), forwards
//! whole runs of messages as one slice of the read buffer, and writes both directions
//! concurrently so that neither peer can block the other. It parses only what the pooler acts
//! on: ReadyForQuery (transaction ends), ParameterStatus (tracked parameters). The
//! [`TxnTracker`] decides when a server goes back to the pool.
//!
//! Leasing is a conversation with this worker's Router: [`Checkout`] brings a server and its
//! socket, [`Checkin`] gives them back at the end of the transaction (or session); a server that
//! needs cleaning first goes to its ServerConnection instead ([`Return`]). Control reaches the loop through a channel from the ClientSession
//! actor: a Kill, or news that a cancel it sent has been delivered.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Buf, BytesMut};
use tokio::sync::oneshot;

use crate::actors::census::ClientEntry;
use crate::actors::messages::{Checkin, Checkout, Return, ServerOffer};
use crate::actors::pool::{PoolMember, PoolSettings, PoolShared, Welcome};
use crate::actors::router::{live_router, worker_index, Router};
use crate::actors::server::{AfterLease, ServerConnection, ServerLink};
use crate::admin::resultset::command_complete;
use crate::auth::{server_error, BackendLoginError};
use crate::config::PoolMode;
use crate::local_queue::LocalReceiver;
use crate::net::{poll_flush_buf, poll_read_some, ServerAddr, Socket, GOODBYE_DEADLINE};
use crate::params::{ends_with_full_reset, is_full_reset_tag, TrackedParams};
use crate::protocol::backend::{parameter_status, parse_parameter_status, ready_for_query};
use crate::protocol::error::sqlstate;
use crate::protocol::prepared::{
    deallocate_target, BooksAfter, ClientStatements, Rewriter, Rewritten, ServerVerdict,
};
use crate::protocol::streaming::{client_hold, server_holds_whole, Hold, MAX_HELD};
use crate::protocol::tracker::MAX_BACKLOG;
use crate::protocol::{frame_at, header_at, Frame, PgError, TxnTracker};

/// Stop reading a side while this much is queued for the other: backpressure, and a bound on
/// what one client can make pgcorral buffer.
const HIGH_WATER: usize = 256 * 1024;
/// PostgreSQL's own messages are trusted, but a corrupt length must not allocate gigabytes.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// The Router's answer to a Checkout, or news that it went away.
type RouterAnswer = Result<Result<ServerOffer, PgError>, oneshot::error::RecvError>;

/// Instructions from the ClientSession actor to its relay loop.
#[derive(Debug)]
pub enum Control {
    Kill(PgError),
    /// A cancel request for this client has been delivered to PostgreSQL.
    CancelDelivered,
}

/// Where to send a cancel for the query this client is running now, if any.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: ServerAddr,
    pub process_id: i32,
    pub secret_key: i32,
}

/// Shared between the ClientSession actor (which handles CancelQuery) and its relay loop, on
/// the same thread.
#[derive(Debug, Default)]
pub struct CancelState {
    pub target: RefCell<Option<CancelTarget>>,
    /// Cancels sent and not yet delivered: the server is not released meanwhile, so that a late
    /// cancel can never hit the next client's query.
    pub in_flight: Cell<u32>,
}

struct Lease {
    server: Addr<ServerConnection>,
    link: ServerLink,
    from_server: BytesMut,
    to_server: BytesMut,
    /// pgcorral's own parameter-sync queries sent ahead of the client's messages whose answers
    /// have not all arrived: they are swallowed, and the server cannot go back before.
    pending_syncs: u8,
    /// Bytes of the server message at the front still to stream to the client unread.
    passthrough: usize,
}

impl Lease {
    /// Nothing of either direction is buffered or half-forwarded.
    fn wire_clean(&self) -> bool {
        self.from_server.is_empty()
            && self.to_server.is_empty()
            && self.pending_syncs == 0
            && self.passthrough == 0
    }
}

/// The clock a client is on, by what it is doing; each has a timeout key (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// No server held: `client_idle_timeout`, restarted by any activity.
    ClientIdle,
    /// A query running: `query_timeout`, from its start.
    Query,
    /// Inside a transaction block, nothing running: `idle_transaction_timeout`, restarted by
    /// any activity.
    IdleInTransaction,
}

impl Clock {
    /// PgBouncer's words for each, as the client sees them.
    fn expired(self) -> PgError {
        let what = match self {
            Clock::ClientIdle => "client_idle_timeout",
            Clock::Query => "query_timeout",
            Clock::IdleInTransaction => "idle transaction timeout",
        };
        PgError::fatal(sqlstate::PROTOCOL_VIOLATION, what)
    }
}

enum Event {
    Timeout,
    TransactionTimeout,
    ClientData,
    ServerData,
    ClientGone,
    ServerGone,
    Control(Control),
}

/// Why the loop ended; decides what is sent to the client and what happens to a leased server.
enum Ending {
    /// The client sent Terminate.
    Terminated,
    /// The client's connection ended without a Terminate.
    ClientLeft,
    /// Tell the client, then close it.
    Error(PgError),
    ServerLost,
}

pub struct Relay {
    client: Socket,
    from_client: BytesMut,
    to_client: BytesMut,
    lease: Option<Lease>,
    tracker: TxnTracker,
    pool: Arc<PoolShared>,
    router: Addr<Router>,
    mode: PoolMode,
    params: TrackedParams,
    /// The values this client logged in with: where its `RESET` takes it back to.
    initial_params: TrackedParams,
    /// The current lease ran `SET`, `RESET` or `DISCARD`: before the server goes back, pgcorral
    /// reads what the session now holds ([`Relay::settle_session`]).
    session_changed: bool,
    /// The last message forwarded was a simple query ending in `RESET ALL` or `DISCARD ALL`
    /// ([`ends_with_full_reset`]), and the last thing the server answered was that reset: the
    /// session is back at its defaults, and pgcorral need not read it back (asyncpg's pool
    /// release, once per transaction).
    query_resets_all: bool,
    answer_was_reset: bool,
    /// Every value this client believes in has been accepted by a server once (set there, or
    /// read back from one), so setting them again cannot fail and may go ahead of its messages.
    params_confirmed: bool,
    cancel: Rc<CancelState>,
    control: LocalReceiver<Control>,
    max_packet: usize,
    release_deferred: bool,
    /// The client sent Terminate after messages the server has not answered yet: PostgreSQL
    /// would run them before closing, so the relay sees them through, then ends.
    terminating: bool,
    /// Bytes of the client message at the front still to stream to the server unread.
    client_passthrough: usize,
    /// The pool's settings (with their version) as of this client's last lease: the shared
    /// copy sits behind a lock every worker reads, so it is only re-read when it changed.
    settings: (usize, Arc<PoolSettings>),
    /// Armed only when a timeout key applies to the current state: no timer work otherwise.
    timer: Option<(Clock, Pin<Box<tokio::time::Sleep>>)>,
    /// Counts this client in its pool for as long as the relay lives (`min_pool_size` is kept
    /// only while a pool has clients).
    _member: PoolMember,
    /// `transaction_timeout`, which runs alongside the other clocks from a transaction's
    /// start to its end; armed only while one is open and the key is set.
    transaction_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// This client in the census, kept current for SHOW CLIENTS.
    entry: Arc<ClientEntry>,
    /// This worker's slot in the pool's statistics.
    worker: usize,
    /// When the query (up to its ReadyForQuery) and the transaction being served began.
    query_started: Option<Instant>,
    xact_started: Option<Instant>,
    /// This client's named prepared statements, kept across servers in transaction mode.
    statements: ClientStatements,
    /// Which of the current lease's responses answer messages pgcorral added.
    rewriter: Rewriter,
    /// The current lease ran SQL-level PREPARE or DEALLOCATE in transaction or statement mode:
    /// its server may hold forged statements under pgcorral's names, and is closed when it
    /// comes back instead of serving another client.
    books_untrusted: bool,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Socket,
        from_client: BytesMut,
        pool: Arc<PoolShared>,
        router: Addr<Router>,
        params: TrackedParams,
        cancel: Rc<CancelState>,
        control: LocalReceiver<Control>,
        max_packet: usize,
        entry: Arc<ClientEntry>,
    ) -> Relay {
        let settings = (usize::MAX, pool.settings());
        let mode = settings.1.pool_mode;
        let member = pool.member();
        Relay {
            client,
            from_client,
            to_client: BytesMut::new(),
            lease: None,
            tracker: TxnTracker::default(),
            pool,
            router,
            mode,
            initial_params: params.clone(),
            params,
            session_changed: false,
            query_resets_all: false,
            answer_was_reset: false,
            params_confirmed: false,
            cancel,
            control,
            max_packet,
            release_deferred: false,
            terminating: false,
            client_passthrough: 0,
            settings,
            timer: None,
            transaction_timer: None,
            _member: member,
            entry,
            worker: worker_index(),
            query_started: None,
            xact_started: None,
            statements: ClientStatements::default(),
            rewriter: Rewriter::default(),
            books_untrusted: false,
        }
    }

    /// Whether statement names are rewritten: transaction and statement mode, unless
    /// `max_prepared_statements = 0`. Session mode keeps one server, and its names.
    fn rewrites_statements(&self) -> bool {
        self.mode != PoolMode::Session && self.settings.1.max_prepared_statements > 0
    }

    /// Queues bytes for the client (the login phase's welcome messages).
    pub fn queue_to_client(&mut self, bytes: &[u8]) {
        self.to_client.extend_from_slice(bytes);
    }

    /// Runs until the client leaves or is disconnected; the leased server, if any, goes back
    /// to its actor in a state that is safe for the next client.
    /// Returns why the session ended, in PgBouncer's words for its log.
    pub async fn run(mut self) -> String {
        let ending = self.serve().await;
        let after = match &ending {
            Ending::ServerLost => AfterLease::Close,
            _ => self.after_lease_on_exit(),
        };
        if let Some(lease) = self.lease.take() {
            self.cancel.target.replace(None);
            self.give_back(lease, after);
        }
        let goodbye = match ending {
            Ending::Terminated => return "client close request".into(),
            Ending::ClientLeft => return "client unexpected eof".into(),
            Ending::Error(e) => e,
            Ending::ServerLost => PgError::fatal(sqlstate::CONNECTION_FAILURE, "server conn crashed?"),
        };
        if self.settings.1.log_pooler_errors {
            log::warn!("{} pooler error: {}", self.entry.describe(), goodbye.message);
        }
        goodbye.encode(&mut self.to_client);
        let goodbye_sent = poll_fn(|cx| poll_flush_buf(&mut self.client, &mut self.to_client, cx));
        let _ = tokio::time::timeout(GOODBYE_DEADLINE, goodbye_sent).await;
        goodbye.message
    }

    fn after_lease_on_exit(&self) -> AfterLease {
        let Some(lease) = &self.lease else { return AfterLease::Close };
        let clean_wire = lease.wire_clean() && self.client_passthrough == 0;
        // A cancel still on its way would hit whatever the next client runs there.
        if !clean_wire || !self.tracker.quiet() || self.cancel.in_flight.get() > 0 {
            AfterLease::Close
        } else if self.tracker.status() != b'I' {
            AfterLease::Rollback
        } else if self.mode == PoolMode::Session {
            AfterLease::Reset
        } else {
            AfterLease::Reuse
        }
    }

    /// Which clock applies now and its timeout, if that timeout is set.
    fn clock(&self) -> Option<(Clock, Duration)> {
        let settings = &self.settings.1;
        let (clock, timeout) = match &self.lease {
            None => (Clock::ClientIdle, settings.client_idle_timeout),
            Some(_) if self.tracker.busy() => (Clock::Query, settings.query_timeout),
            Some(_) if self.tracker.quiet() && self.tracker.status() != b'I' => {
                (Clock::IdleInTransaction, settings.idle_transaction_timeout)
            }
            Some(_) => return None,
        };
        (!timeout.is_zero()).then_some((clock, timeout))
    }

    /// Called after every event: idle clocks restart on activity, the query clock runs from the
    /// query's start.
    fn arm_timer(&mut self) {
        match (self.clock(), &mut self.timer) {
            (None, timer) => *timer = None,
            (Some((Clock::Query, _)), Some((Clock::Query, _))) => {}
            (Some((clock, timeout)), Some((armed, sleep))) => {
                *armed = clock;
                sleep.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
            (Some((clock, timeout)), timer @ None) => {
                *timer = Some((clock, Box::pin(tokio::time::sleep(timeout))));
            }
        }
        let limit = self.settings.1.transaction_timeout;
        // The key is usually off: then nothing else is looked at.
        let armed = !limit.is_zero()
            && self.lease.is_some()
            && (self.tracker.busy() || self.tracker.status() != b'I');
        match (armed, &self.transaction_timer) {
            (true, None) => self.transaction_timer = Some(Box::pin(tokio::time::sleep(limit))),
            (false, Some(_)) => self.transaction_timer = None,
            _ => {}
        }
    }

    /// Stops the query this client is running, if any: closing the sockets alone would leave
    /// it running on the server.
    fn cancel_running_query(&self) {
        if let Some(target) = self.cancel.target.borrow().clone() {
            actix::spawn(async move {
                let _ = send_cancel(&target).await;
            });
        }
    }

    /// Session mode with `server_fast_close`: the server held for the whole session was opened
    /// before a reload changed the connection settings, and no transaction is open on it.
    fn fast_close_due(&mut self) -> bool {
        if self.mode != PoolMode::Session {
            return false;
        }
        let Some(lease) = &self.lease else { return false };
        if lease.link.generation == self.pool.connection_generation() {
            return false;
        }
        self.pool.refresh_settings(&mut self.settings);
        self.settings.1.server_fast_close
            && self.tracker.idle()
            && lease.from_server.is_empty()
            && lease.to_server.is_empty()
    }

    async fn serve(&mut self) -> Ending {
        let configuration_changed =
            || Ending::Error(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "database configuration changed"));
        loop {
            if self.terminating && self.lease.as_ref().is_none_or(|_| !self.tracker.busy()) {
                return Ending::Terminated;
            }
            self.arm_timer();
            if self.fast_close_due() {
                return configuration_changed();
            }
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            if matches!(event, Event::ClientData) && self.fast_close_due() {
                return configuration_changed();
            }
            let step = match event {
                Event::Timeout => match &self.timer {
                    Some((clock, _)) => {
                        if *clock == Clock::Query {
                            self.cancel_running_query();
                        }
                        return Ending::Error(clock.expired());
                    }
                    None => Ok(()),
                },
                Event::TransactionTimeout => {
                    if self.tracker.busy() {
                        self.cancel_running_query();
                    }
                    return Ending::Error(PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "transaction timeout",
                    ));
                }
                Event::ClientData => self.client_input().await,
                Event::ServerData => self.server_input(),
                Event::ClientGone => return Ending::ClientLeft,
                Event::ServerGone => return Ending::ServerLost,
                Event::Control(Control::Kill(error)) => return Ending::Error(error),
                Event::Control(Control::CancelDelivered) => {
                    self.maybe_release();
                    Ok(())
                }
            };
            if let Err(ending) = step {
                return ending;
            }
            if self.settle_due() {
                if let Err(ending) = self.settle_session().await {
                    return ending;
                }
                self.maybe_release();
            }
        }
    }

    /// The transaction that changed session parameters is over and the server about to go
    /// back: the moment to learn what the client's session now holds.
    fn settle_due(&self) -> bool {
        self.session_changed
            && self.mode != PoolMode::Session
            && self.cancel.in_flight.get() == 0
            && self.lease.as_ref().is_some_and(|l| l.wire_clean() && self.client_passthrough == 0)
            && self.tracker.idle()
    }

    /// Learns the session parameters now set on the leased server (read back, unless the
    /// transaction ended with a full reset) and makes them the client's, as a direct connection
    /// would have them: a `RESET` goes back to the client's startup values. The server goes
    /// back with its session known; the next lease sets what its client needs.
    async fn settle_session(&mut self) -> Result<(), Ending> {
        self.session_changed = false;
        let Some(lease) = &mut self.lease else { return Ok(()) };
        let set_now = if self.query_resets_all && self.answer_was_reset {
            lease.link.session_was_reset();
            Vec::new()
        } else {
            match lease.link.learn_session().await {
                Ok(set_now) => set_now,
                Err(error) => return Err(restore_failed(error)),
            }
        };
        for (name, value) in self.params.after_reset(&self.initial_params, &set_now) {
            parameter_status(&mut self.to_client, &name, &value);
            if name.eq_ignore_ascii_case("application_name") {
                self.entry.set_application_name(&value);
            }
        }
        Ok(())
    }

    /// Flushes what is queued both ways, then reports the first thing that needs attention.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if poll_flush_buf(&mut self.client, &mut self.to_client, cx).is_ready_err() {
            if !self.terminating {
                return Poll::Ready(Event::ClientGone);
            }
            // A client that said goodbye may close before reading its last answers, as it may
            // with PostgreSQL itself; its server still finishes what it was sent.
            self.to_client = BytesMut::new();
        }
        if let Some(lease) = &mut self.lease {
            if poll_flush_buf(&mut lease.link.socket, &mut lease.to_server, cx).is_ready_err() {
                return Poll::Ready(Event::ServerGone);
            }
        }
        if let Poll::Ready(control) = self.control.poll_recv(cx) {
            return Poll::Ready(Event::Control(control));
        }
        if let Some((_, sleep)) = &mut self.timer {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timeout);
            }
        }
        if let Some(sleep) = &mut self.transaction_timer {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::TransactionTimeout);
            }
        }
        if self.to_client.len() < HIGH_WATER || self.terminating {
            if let Some(lease) = &mut self.lease {
                match poll_read_some(&mut lease.link.socket, &mut lease.from_server, cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::ServerGone),
                    Poll::Ready(Ok(_)) => return Poll::Ready(Event::ServerData),
                    Poll::Pending => {}
                }
            }
        }
        // A cancel on its way can land after the query it was for has ended: PostgreSQL signals
        // the backend twice (its pid, then its process group), and a busy machine can put a
        // millisecond between the two, enough for the client's next query to start and be hit.
        // That next query waits until the cancel has been delivered (the postmaster hung up).
        let cancel_landing = self.cancel.in_flight.get() > 0 && self.tracker.idle();
        // A client far ahead of its server waits: what it sent is buffered (to_server), and so
        // is the tracker's record of what is unanswered.
        // So is one that does not read what it is sent: answers pgcorral writes itself (a local
        // DEALLOCATE) would otherwise pile up without bound.
        let backlogged = self.lease.as_ref().is_some_and(|l| l.to_server.len() >= HIGH_WATER)
            || self.tracker.backlog() >= MAX_BACKLOG
            || self.from_client.len() > MAX_HELD
            || self.to_client.len() >= HIGH_WATER;
        if !cancel_landing && !backlogged && !self.terminating {
            match poll_read_some(&mut self.client, &mut self.from_client, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::ClientGone),
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ClientData),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Forwards every complete client message, leasing a server first if none is held.
    async fn client_input(&mut self) -> Result<(), Ending> {
        let mut end = 0;
        loop {
            if self.client_passthrough > 0 {
                // The rest of a message whose head has gone on: forwarded as it arrives.
                let here = self.client_passthrough.min(self.from_client.len() - end);
                self.client_passthrough -= here;
                end += here;
                if self.client_passthrough > 0 {
                    break;
                }
                continue;
            }
            let frame = match header_at(&self.from_client[end..], self.max_packet) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(Ending::Error(e.to_pg())),
            };
            let available = self.from_client.len() - end;
            let head = match client_hold(frame, &self.from_client[end..], self.rewrites_statements()) {
                Hold::Head(head) if available >= head => head,
                Hold::Head(_) | Hold::More => break,
                Hold::TooLarge => return Err(Ending::Error(too_large_to_read(frame))),
            };
            let whole = available >= frame.len;
            if frame.tag == b'X' {
                // PostgreSQL reads nothing after Terminate.
                self.from_client.truncate(end);
                self.terminating = true;
                break;
            }

            if self.lease.is_none() {
                if frame.tag == b'Q'
                    && whole
                    && self.rewrites_statements()
                    && self.deallocate_locally(frame.len)
                {
                    continue;
                }
                // Only at a message boundary with nothing pending: `end` is 0 here. Boxed: the
                // checkout's state would otherwise sit in every idle client's future.
                Box::pin(self.acquire()).await?;
            }
            self.tracker.client_sent(frame.tag);
            let ignored_syncs = self.tracker.take_ignored_syncs();
            self.query_resets_all = frame.tag == b'Q' && whole && self.mode != PoolMode::Session && {
                let body = &self.from_client[end + 5..end + frame.len];
                ends_with_full_reset(std::str::from_utf8(&body[..body.len().saturating_sub(1)]).unwrap_or(""))
            };
            let rewritten = self.rewrites_statements()
                && matches!(frame.tag, b'P' | b'B' | b'D' | b'C' | b'Q' | b'S' | b'F')
                && self.rewrite_client_message(end, head.max(available.min(frame.len)))?;
            self.rewriter.syncs_ignored(ignored_syncs);
            if rewritten {
                end = 0;
                self.client_passthrough = frame.len - head.max(available.min(frame.len));
                continue;
            }
            let here = available.min(frame.len);
            end += here;
            self.client_passthrough = frame.len - here;
        }
        self.forward_to_server(end);
        Ok(())
    }

    /// Runs the message at `end` through the prepared-statement books. When it must change
    /// (renamed, preceded by a Parse the server lacks, ...), sends what precedes it, then its
    /// replacement, and returns true; otherwise it stays in the run being forwarded.
    fn rewrite_client_message(&mut self, end: usize, len: usize) -> Result<bool, Ending> {
        let Some(lease) = &mut self.lease else { return Ok(false) };
        let capacity = self.settings.1.max_prepared_statements;
        let frame = &self.from_client[end..end + len];
        let rewritten = self
            .rewriter
            .client_message(frame, &mut self.statements, &mut lease.link.statements, capacity)
            .map_err(|e| Ending::Error(e.to_pg()))?;
        let tag = frame[0];
        if tag == b'P' || tag == b'C' || tag == b'Q' {
            self.entry.set_prepared(self.statements.len());
        }
        let stats = &self.pool.stats;
        match tag {
            b'P' => stats.client_parse(self.worker),
            b'B' => stats.bind(self.worker),
            _ => {}
        }
        let server_parses = match &rewritten {
            Rewritten::Unchanged => u64::from(tag == b'P'),
            Rewritten::Replaced(bytes) => count_parses(bytes),
        };
        if server_parses > 0 {
            stats.server_parse(self.worker, server_parses);
        }
        let Rewritten::Replaced(bytes) = rewritten else { return Ok(false) };
        self.forward_to_server(end);
        self.from_client.advance(len);
        self.pool.stats.received(self.worker, len);
        if let Some(lease) = &mut self.lease {
            append(&mut lease.to_server, bytes);
            lease.link.entry.set_prepared(lease.link.statements.len());
        }
        Ok(true)
    }

    /// `DEALLOCATE name` or `DEALLOCATE ALL` outside a transaction, for statements pgcorral
    /// keeps the books of: answered here (the statements stay on servers for other clients),
    /// with no server leased. Returns whether the message at the front was consumed.
    fn deallocate_locally(&mut self, len: usize) -> bool {
        let body = &self.from_client[5..len];
        let query = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).unwrap_or("");
        let Some(target) = deallocate_target(query) else { return false };
        let tag = match target {
            None => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Some(name) if self.statements.remove(&name) => "DEALLOCATE",
            Some(_) => return false,
        };
        self.from_client.advance(len);
        command_complete(&mut self.to_client, tag);
        ready_for_query(&mut self.to_client, b'I');
        self.entry.set_prepared(self.statements.len());
        true
    }

    fn forward_to_server(&mut self, len: usize) {
        if len == 0 {
            return;
        }
        self.pool.stats.received(self.worker, len);
        // PgBouncer's query and transaction times run while a server works for the client,
        // not while the client waits for one.
        if self.query_started.is_none() {
            let now = Instant::now();
            self.query_started = Some(now);
            self.xact_started.get_or_insert(now);
        }
        let chunk = self.from_client.split_to(len);
        if let Some(lease) = &mut self.lease {
            append(&mut lease.to_server, chunk);
        }
    }

    /// Forwards every complete server message, watching transaction boundaries and parameters.
    fn server_input(&mut self) -> Result<(), Ending> {
        let rewriting = self.rewrites_statements();
        let Some(lease) = &mut self.lease else { return Ok(()) };
        let mut end = 0;
        let mut refused_block = false;
        loop {
            if lease.passthrough > 0 {
                let here = lease.passthrough.min(lease.from_server.len() - end);
                lease.passthrough -= here;
                end += here;
                if lease.passthrough > 0 {
                    break;
                }
                continue;
            }
            let frame = match header_at(&lease.from_server[end..], MAX_SERVER_MESSAGE) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    log::error!("pool {}: server sent a malformed message: {e}", self.pool.key);
                    return Err(Ending::ServerLost);
                }
            };
            let available = lease.from_server.len() - end;
            if available < frame.len {
                if lease.pending_syncs > 0 || server_holds_whole(frame) {
                    break;
                }
                // Streams to the client as it arrives: its tag is all the model needs.
                if frame.tag == b'E' {
                    self.answer_was_reset = false;
                    if rewriting {
                        let header = &lease.from_server[end..end + 5];
                        self.rewriter.server_message(
                            header,
                            &mut self.statements,
                            &mut lease.link.statements,
                        );
                    }
                }
                self.tracker.server_sent(frame.tag, None);
                if matches!(frame.tag, b'G' | b'W') {
                    self.rewriter.syncs_ignored(self.tracker.take_ignored_syncs());
                }
                lease.passthrough = frame.len - available;
                end += available;
                break;
            }
            if lease.pending_syncs > 0 {
                // The answers to a parameter sync come before the client's own.
                let body = frame.body(&lease.from_server[end..]);
                match frame.tag {
                    b'Z' => lease.pending_syncs -= 1,
                    b'S' => {
                        if let Some((name, value)) = parse_parameter_status(body) {
                            lease.link.set_param(&name, &value);
                            self.params.observe(&name, &value);
                        }
                    }
                    b'E' => return Err(restore_failed(server_error(body))),
                    _ => {}
                }
                let forwarded = take_frame(&mut lease.from_server, end, frame.len, &mut self.to_client);
                self.pool.stats.sent(self.worker, forwarded);
                end = 0;
                continue;
            }
            if frame.tag == b'E' {
                self.answer_was_reset = false;
            }
            if rewriting && matches!(frame.tag, b'1' | b'3' | b'E' | b'Z') {
                let message = &lease.from_server[end..end + frame.len];
                let verdict =
                    self.rewriter.server_message(message, &mut self.statements, &mut lease.link.statements);
                if verdict != ServerVerdict::Forward {
                    let forwarded = take_frame(&mut lease.from_server, end, frame.len, &mut self.to_client);
                    self.pool.stats.sent(self.worker, forwarded);
                    if let ServerVerdict::Replace(renamed) = verdict {
                        self.tracker.server_sent(b'E', None);
                        self.to_client.extend_from_slice(&renamed);
                    }
                    end = 0;
                    continue;
                }
            }
            let body = frame.body(&lease.from_server[end..]);
            self.tracker.server_sent(frame.tag, body.first().copied());
            match frame.tag {
                b'G' | b'W' => self.rewriter.syncs_ignored(self.tracker.take_ignored_syncs()),
                b'Z' => {
                    let now = Instant::now();
                    let stats = &self.pool.stats;
                    if let Some(start) = self.query_started.take() {
                        stats.query(self.worker, now - start);
                    }
                    // Pipelined queries: the next one's time runs from this one's end.
                    if self.tracker.busy() {
                        self.query_started = Some(now);
                    }
                    if self.tracker.quiet() && self.tracker.status() == b'I' {
                        if let Some(start) = self.xact_started.take() {
                            stats.transaction(self.worker, now - start);
                        }
                    }
                    if self.mode == PoolMode::Statement
                        && self.tracker.quiet()
                        && self.tracker.status() != b'I'
                    {
                        refused_block = true;
                        break;
                    }
                }
                b'C' => {
                    let tag = body.strip_suffix(b"\0").unwrap_or(body);
                    self.answer_was_reset = is_full_reset_tag(tag);
                    if rewriting
                        && self.rewriter.command_complete(
                            tag,
                            &mut self.statements,
                            &mut lease.link.statements,
                        ) == BooksAfter::Untrusted
                    {
                        self.books_untrusted = true;
                    }
                    if changes_session(tag) {
                        lease.link.session_unknown = true;
                        lease.link.matches_client = None;
                        self.session_changed = true;
                    }
                }
                b'S' => {
                    if let Some((name, value)) = parse_parameter_status(body) {
                        lease.link.set_param(&name, &value);
                        self.params.observe(&name, &value);
                        if name.eq_ignore_ascii_case("application_name") {
                            self.entry.set_application_name(&value);
                        }
                    }
                }
                _ => {}
            }
            end += frame.len;
        }
        let chunk = lease.from_server.split_to(end);
        self.pool.stats.sent(self.worker, chunk.len());
        append(&mut self.to_client, chunk);
        if refused_block {
            return self.refuse_transaction_block();
        }
        self.maybe_release();
        Ok(())
    }

    /// Statement mode: a statement opened a transaction block. Its ReadyForQuery (`T`) is
    /// replaced by an error and an idle ReadyForQuery, and the server is rolled back.
    fn refuse_transaction_block(&mut self) -> Result<(), Ending> {
        let Some(lease) = &mut self.lease else { return Ok(()) };
        let ready_len = frame_at(&lease.from_server, MAX_SERVER_MESSAGE).ok().flatten().map_or(0, |f| f.len);
        lease.from_server.advance(ready_len);
        PgError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "transaction blocks not allowed in statement pooling mode",
        )
        .encode(&mut self.to_client);
        ready_for_query(&mut self.to_client, b'I');
        self.tracker = TxnTracker::default();
        self.release(AfterLease::Rollback);
        Ok(())
    }

    /// Transaction and statement modes: the server goes back as soon as the transaction is
    /// over and nothing is in flight, unless a cancel for it is still on its way.
    fn maybe_release(&mut self) {
        let Some(lease) = &self.lease else { return };
        if self.mode == PoolMode::Session
            || !self.tracker.idle()
            || !lease.wire_clean()
            || self.client_passthrough > 0
        {
            return;
        }
        if self.cancel.in_flight.get() > 0 {
            self.release_deferred = true;
            return;
        }
        if self.session_changed {
            return;
        }
        self.release(AfterLease::Reuse);
    }

    fn release(&mut self, after: AfterLease) {
        self.release_deferred = false;
        self.session_changed = false;
        if let Some(lease) = self.lease.take() {
            self.cancel.target.replace(None);
            self.give_back(lease, after);
        }
        self.entry.holds(0);
        // An idle client should hold no buffer memory.
        if self.from_client.is_empty() {
            self.from_client = BytesMut::new();
        }
    }

    /// A clean server goes straight back to the Router; one that needs work first goes to its
    /// actor.
    fn give_back(&mut self, lease: Lease, after: AfterLease) {
        // Statements pgcorral added whose fate is unknown: the server's books cannot be
        // trusted, so neither can the server.
        let after = if self.rewriter.settled() && !std::mem::take(&mut self.books_untrusted) {
            after
        } else {
            AfterLease::Close
        };
        if after == AfterLease::Reuse && !self.settings.1.reset_query_always {
            let router = live_router(&mut self.router, &self.pool);
            router.do_send(Checkin { server: lease.server, link: lease.link, fresh: false });
        } else {
            lease.server.do_send(Return { link: lease.link, after });
        }
    }

    /// Leases a server from this worker's Router, waiting in its FIFO queue if needed, and
    /// brings the server's session parameters in line with this client's.
    async fn acquire(&mut self) -> Result<(), Ending> {
        self.pool.refresh_settings(&mut self.settings);
        let (reply, mut answer) = oneshot::channel();
        let asked = Instant::now();
        let census = &self.pool.census;
        self.entry.waits(census.clock.stamp(asked));
        live_router(&mut self.router, &self.pool).do_send(Checkout { reply });
        let notify = self.settings.1.query_wait_notify;
        let mut notice = (!notify.is_zero()).then(|| Box::pin(tokio::time::sleep(notify)));
        let mut said_goodbye = false;
        let answer = poll_fn(|cx| self.poll_wait(&mut answer, &mut notice, &mut said_goodbye, cx)).await?;
        let (server, link) = match answer {
            Ok(Ok(offer)) => offer.claim(),
            Ok(Err(error)) => return Err(Ending::Error(error)),
            Err(_) => {
                return Err(Ending::Error(PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("pool {} is shutting down", self.pool.key),
                )))
            }
        };
        let now = Instant::now();
        self.pool.stats.assigned(self.worker, now - asked);
        self.entry.holds(link.entry.id);
        link.entry.lent(self.entry.id, self.pool.census.clock.stamp(now));
        self.cancel.target.replace(Some(CancelTarget {
            addr: link.addr.clone(),
            process_id: link.process_id,
            secret_key: link.secret_key,
        }));
        self.lease = Some(Lease {
            server,
            link,
            from_server: BytesMut::new(),
            to_server: BytesMut::new(),
            pending_syncs: 0,
            passthrough: 0,
        });
        self.rewriter = Rewriter::default();
        self.sync_params().await
    }

    /// Waits for the Router's answer while watching the client: a client that vanishes or is
    /// killed while queued leaves the queue (dropping `answer` tells the Router), and nothing it
    /// sent reaches PostgreSQL. What it sends meanwhile is kept for when a server comes. A
    /// client that closes after a Terminate said goodbye on purpose: what it sent before the
    /// Terminate runs, as PostgreSQL runs it.
    fn poll_wait(
        &mut self,
        answer: &mut oneshot::Receiver<Result<ServerOffer, PgError>>,
        notice: &mut Option<Pin<Box<tokio::time::Sleep>>>,
        said_goodbye: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<RouterAnswer, Ending>> {
        if let Poll::Ready(reply) = Pin::new(answer).poll(cx) {
            return Poll::Ready(Ok(reply));
        }
        while let Poll::Ready(control) = self.control.poll_recv(cx) {
            if let Control::Kill(error) = control {
                return Poll::Ready(Err(Ending::Error(error)));
            }
        }
        if notice.as_mut().is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready()) {
            *notice = None;
            // query_wait_notify: tell the client why nothing happens, then keep waiting.
            PgError {
                severity: "NOTICE".into(),
                code: "00000".into(),
                message: format!(
                    "No server connection available in pool {}, client being queued",
                    self.pool.key
                ),
            }
            .encode_notice(&mut self.to_client);
        }
        if *said_goodbye {
            return Poll::Pending;
        }
        if poll_flush_buf(&mut self.client, &mut self.to_client, cx).is_ready_err() {
            return Poll::Ready(Err(Ending::ClientLeft));
        }
        while self.from_client.len() < HIGH_WATER {
            match poll_read_some(&mut self.client, &mut self.from_client, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    if !holds_terminate(&self.from_client, self.max_packet) {
                        return Poll::Ready(Err(Ending::ClientLeft));
                    }
                    *said_goodbye = true;
                    break;
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => break,
            }
        }
        Poll::Pending
    }

    /// Sends what makes the leased server's session parameters match what this client believes.
    async fn sync_params(&mut self) -> Result<(), Ending> {
        let Some(lease) = &mut self.lease else { return Ok(()) };
        if lease.link.session_unknown {
            if let Err(error) = lease.link.learn_session().await {
                return Err(restore_failed(error));
            }
        }
        let Some(lease) = &mut self.lease else { return Ok(()) };
        if lease.link.matches_client.as_ref().is_some_and(|known| known.same_set(&self.params)) {
            return Ok(());
        }
        let link = &lease.link;
        let Some(sql) = self.params.sync_query(&link.params, &link.session, &link.baseline) else {
            lease.link.matches_client = Some(self.params.clone());
            self.params_confirmed = true;
            return Ok(());
        };
        if self.params_confirmed
            && self.mode != PoolMode::Session
            && lease.link.session == self.params.session()
        {
            // Only reported parameters differ, with values a server took before, which stay
            // valid (a time zone, an application_name): sent ahead of the client's messages in
            // the same write, with no round trip of their own (asyncpg's RESET ALL on every
            // release makes this once per transaction); their answers are swallowed in
            // server_input. Unreported ones can stop being valid (a dropped text search
            // configuration) and are set first, so that no client query runs without them.
            postgres_protocol::message::frontend::query(&sql, &mut lease.to_server)
                .map_err(|e| Ending::Error(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())))?;
            lease.pending_syncs += 1;
            lease.link.matches_client = Some(self.params.clone());
            return Ok(());
        }
        if let Err(error) = lease.link.run(&sql).await {
            return Err(restore_failed(error));
        }
        let Some(lease) = &mut self.lease else { return Ok(()) };
        // The server's normalised spelling becomes what the client is compared with.
        for name in self.params.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>() {
            if let Some(value) = lease.link.param(&name) {
                self.params.observe(&name, value);
            }
        }
        lease.link.session = self.params.session().to_vec();
        lease.link.session_unknown = false;
        lease.link.matches_client = Some(self.params.clone());
        self.params_confirmed = true;
        Ok(())
    }

    /// The ParameterStatus values of a server of this pool: cached, or learned by leasing one
    /// (the very first client of a pool). Also surfaces a server login error to the client.
    pub async fn welcome(&mut self) -> Result<Welcome, PgError> {
        if let Some(welcome) = self.pool.welcome() {
            return Ok(welcome);
        }
        match self.acquire().await {
            Ok(()) => {}
            Err(Ending::Error(e)) => return Err(e),
            Err(_) => return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, "server conn crashed?")),
        }
        let welcome = self.lease.as_ref().map(|l| l.link.params.clone()).unwrap_or_default();
        self.release(AfterLease::Reuse);
        Ok(self.pool.welcome().unwrap_or_else(|| Arc::new(welcome)))
    }

    /// Sends what is queued for the client and ends the session (a login that failed late).
    pub async fn run_closing(mut self) {
        let sent = poll_fn(|cx| poll_flush_buf(&mut self.client, &mut self.to_client, cx));
        let _ = tokio::time::timeout(GOODBYE_DEADLINE, sent).await;
    }

    pub fn set_params(&mut self, params: TrackedParams) {
        self.initial_params = params.clone();
        self.params = params;
        self.params_confirmed = false;
    }
}

/// A message pgcorral must read whole to act on, above what it holds for one client.
fn too_large_to_read(frame: Frame) -> PgError {
    let what = match frame.tag {
        b'P' => "a named Parse (prepared statement) in transaction pooling",
        _ => "a protocol message pgcorral reads",
    };
    PgError::fatal(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("{what} of {} bytes is above pgcorral's limit of {MAX_HELD} bytes", frame.len),
    )
}

/// The client's session parameters could not be put on its server: the client cannot go on
/// with values it did not choose.
fn restore_failed(error: BackendLoginError) -> Ending {
    match error {
        BackendLoginError::Server { code, message, .. } => {
            Ending::Error(PgError::fatal(&code, format!("could not restore session parameters: {message}")))
        }
        _ => Ending::ServerLost,
    }
}

/// A CommandComplete tag (without its NUL) whose command may have changed session parameters.
fn changes_session(tag: &[u8]) -> bool {
    tag == b"SET" || tag == b"RESET" || tag.starts_with(b"DISCARD")
}

/// Sends PostgreSQL a CancelRequest with the server's real key, over a new connection, and
/// waits until the postmaster closes it (by then the backend has been signalled).
pub async fn send_cancel(target: &CancelTarget) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = target.addr.connect().await?;
    let mut request = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(target.process_id, target.secret_key, &mut request);
    socket.write_all(&request).await?;
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut sink)).await;
    Ok(())
}

/// Appends without copying when the destination is empty (the common case: one batch per read).
/// Moves the server messages before `end` to the client and drops the `len`-byte one at `end`
/// (an answer pgcorral swallows or replaces). Returns how many bytes were forwarded.
fn take_frame(from_server: &mut BytesMut, end: usize, len: usize, to_client: &mut BytesMut) -> usize {
    append(to_client, from_server.split_to(end));
    from_server.advance(len);
    end
}

fn append(dst: &mut BytesMut, chunk: BytesMut) {
    if dst.is_empty() {
        *dst = chunk;
    } else {
        dst.extend_from_slice(&chunk);
    }
}

trait ReadyErr {
    fn is_ready_err(&self) -> bool;
}

impl ReadyErr for Poll<io::Result<()>> {
    fn is_ready_err(&self) -> bool {
        matches!(self, Poll::Ready(Err(_)))
    }
}

/// Whether the whole messages at the front of `buf` include a Terminate.
fn holds_terminate(buf: &[u8], max_packet: usize) -> bool {
    let mut at = 0;
    while let Ok(Some(frame)) = frame_at(&buf[at..], max_packet) {
        if frame.tag == b'X' {
            return true;
        }
        at += frame.len;
    }
    false
}

/// Parse messages in a run of whole messages pgcorral wrote.
fn count_parses(bytes: &[u8]) -> u64 {
    let mut at = 0;
    let mut parses = 0;
    while let Ok(Some(frame)) = frame_at(&bytes[at..], usize::MAX) {
        parses += u64::from(frame.tag == b'P');
        at += frame.len;
    }
    parses
}
