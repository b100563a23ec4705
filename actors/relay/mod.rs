//! The data path of one client: a single loop that moves bytes between the client socket and
//! the socket of the server it leases, with no mailbox hop per message.
//!
//! Both sides are [`Framed`] connections. The loop reads whatever is available on either side
//! into its inbox, frames it (tag + length only), forwards runs of messages as slices of that
//! inbox to the other side's outbox, and writes both directions concurrently so
//! that neither peer can block the other. Messages pgcorral does not read stream through as
//! they arrive; the protocol model ([`TxnTracker`]) decides when a server goes back to the pool.
//!
//! Leasing is a conversation with this worker's Router: [`Checkout`] brings a server and its
//! socket, [`Checkin`] gives them back at the end of the transaction (or session); a server that
//! needs cleaning first goes to its ServerConnection instead ([`Return`]). Control reaches the
//! loop through a channel from the ClientSession actor: a Kill, or news that a cancel it sent has
//! been delivered.
//!
//! This file holds the loop and its state; `client_side` and `server_side` handle each
//! direction's messages, `lease` the checkout and release, `clocks` the timeouts and `cancel`
//! the cancel requests.

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
use crate::actors::router::{live_shared_router, worker_index, Router};
use crate::actors::server::{AfterLease, ServerConnection, ServerLink};
use crate::admin::resultset::command_complete;
use crate::auth::{server_error, BackendLoginError};
use crate::config::PoolMode;
use crate::local_queue::LocalReceiver;
use crate::net::{Framed, ServerAddr, Socket};
use crate::params::TrackedParams;
use crate::protocol::backend::{parameter_status, parse_parameter_status, ready_for_query};
use crate::protocol::error::sqlstate;
use crate::protocol::prepared::{
    deallocate_target, BooksAfter, ClientStatements, Rewriter, Rewritten, ServerVerdict,
};
use crate::protocol::streaming::{client_hold, server_holds_whole, Hold, MAX_HELD};
use crate::protocol::tracker::MAX_BACKLOG;
use crate::protocol::{frame_at, header_at, Frame, PgError};
use crate::session::{Phase, Release, Session, Wire};

mod cancel;
mod client_side;
mod clocks;
mod lease;
mod server_side;

pub use cancel::{send_cancel, CancelState, CancelTarget};
use clocks::Clock;

/// Stop reading a side while this much is queued for the other: backpressure, and a bound on
/// what one client can make pgcorral buffer.
const HIGH_WATER: usize = 256 * 1024;
/// PostgreSQL's own messages are trusted, but a corrupt length must not allocate gigabytes.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// Instructions from the ClientSession actor to its relay loop.
#[derive(Debug)]
pub enum Control {
    /// Boxed, as in [`Ending`]: a rare message should not size every event.
    Kill(Box<PgError>),
    /// A cancel request for this client has been delivered to PostgreSQL.
    CancelDelivered,
    /// An online restart began: move to the new process once idle between transactions.
    HandOver,
}

struct Lease {
    server: Addr<ServerConnection>,
    /// The server's connection, with the bytes read from it (`inbox`) and queued for it
    /// (`outbox`).
    link: ServerLink,
    /// pgcorral's own parameter-sync queries sent ahead of the client's messages whose answers
    /// have not all arrived: they are swallowed, and the server cannot go back before.
    pending_syncs: u8,
    /// Bytes of the server message at the front still to stream to the client unread.
    passthrough: usize,
    /// Which of this lease's responses answer messages pgcorral added.
    rewriter: Rewriter,
}

impl Lease {
    /// Nothing of either direction is buffered or half-forwarded.
    fn wire_clean(&self) -> bool {
        self.link.conn.inbox.is_empty()
            && self.link.conn.outbox.is_empty()
            && self.pending_syncs == 0
            && self.passthrough == 0
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
    /// Idle between transactions while a new process takes over.
    HandOver,
}

/// Why the loop ended; decides what is sent to the client and what happens to a leased server.
enum Ending {
    /// The client sent Terminate.
    Terminated,
    /// The client's connection ended without a Terminate.
    ClientLeft,
    /// Tell the client, then close it. Boxed: the error is rare, and inline it would size
    /// every step of every idle client's future.
    Error(Box<PgError>),
    ServerLost,
    /// Idle while a new process takes over: the client moves there.
    HandedOver,
}

/// A relay that ended because its client moves to a new process (`pgcorral -R`): its socket
/// and everything its session holds.
pub struct HandedOver {
    pub client: Framed,
    pub params: TrackedParams,
    pub initial_params: TrackedParams,
    pub statements: ClientStatements,
}

/// How a relay ended.
pub enum RelayEnd {
    /// The client is gone, for this reason (PgBouncer's words, for the log).
    Closed(String),
    Moved(Box<HandedOver>),
}

pub struct Relay {
    /// The client's connection: what it sent (`inbox`) and what goes to it (`outbox`).
    client: Framed,
    /// Boxed: an idle client holds no server.
    lease: Option<Box<Lease>>,
    /// Every decision about the lease, the clocks and the protocol state (no I/O).
    session: Session,
    pool: Arc<PoolShared>,
    router: Rc<Addr<Router>>,
    params: TrackedParams,
    /// The values this client logged in with: where its `RESET` takes it back to.
    initial_params: TrackedParams,
    /// Every value this client believes in has been accepted by a server once (set there, or
    /// read back from one), so setting them again cannot fail and may go ahead of its messages.
    params_confirmed: bool,
    cancel: Rc<CancelState>,
    control: LocalReceiver<Control>,
    max_packet: usize,
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
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Framed,
        member: PoolMember,
        router: Rc<Addr<Router>>,
        params: TrackedParams,
        cancel: Rc<CancelState>,
        control: LocalReceiver<Control>,
        max_packet: usize,
        entry: Arc<ClientEntry>,
    ) -> Relay {
        let pool = member.pool().clone();
        let settings = (usize::MAX, pool.settings());
        let mode = settings.1.pool_mode;
        Relay {
            client,
            lease: None,
            session: Session::new(mode),
            pool,
            router,
            initial_params: params.clone(),
            params,
            params_confirmed: false,
            cancel,
            control,
            max_packet,
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
        }
    }

    /// Whether statement names are rewritten: transaction and statement mode, unless
    /// `max_prepared_statements = 0`. Session mode keeps one server, and its names.
    fn rewrites_statements(&self) -> bool {
        self.session.mode() != PoolMode::Session && self.settings.1.max_prepared_statements > 0
    }

    fn terminating(&self) -> bool {
        self.session.phase() == Phase::Terminating
    }

    /// What the buffers say about the lease, for the session machine.
    fn wire(&self) -> Wire {
        Wire {
            clean: self.lease.as_deref().is_none_or(Lease::wire_clean) && self.client_passthrough == 0,
            cancel_in_flight: self.cancel.in_flight.get() > 0,
        }
    }

    /// Nothing under way: no server, nothing buffered or half-sent either way, no cancel on
    /// its way. Only then can the client move to another process without a byte lost.
    fn between_transactions(&self) -> bool {
        self.lease.is_none()
            && self.session.phase() == Phase::Idle
            && self.session.tracker().idle()
            && self.client.inbox.is_empty()
            && self.client.outbox.is_empty()
            && self.client_passthrough == 0
            && self.cancel.in_flight.get() == 0
    }

    /// Queues bytes for the client (the login phase's welcome messages).
    pub fn queue_to_client(&mut self, bytes: &[u8]) {
        self.client.outbox.extend_from_slice(bytes);
    }

    /// Runs until the client leaves or is disconnected, or moves to a new process; the leased
    /// server, if any, goes back to its actor in a state that is safe for the next client.
    ///
    /// Not an `async fn`: one would hold `self` twice in its future (the argument, and the
    /// binding it is moved into), and this future is what an idle client costs.
    #[allow(clippy::manual_async_fn)] // deliberately not async fn: see above
    pub fn run(mut self) -> impl Future<Output = RelayEnd> {
        async move {
            let ending = self.serve().await;
            if matches!(ending, Ending::HandedOver) {
                return RelayEnd::Moved(Box::new(HandedOver {
                    client: self.client,
                    params: self.params,
                    initial_params: self.initial_params,
                    statements: self.statements,
                }));
            }
            let after = self.session.on_exit(self.wire(), matches!(ending, Ending::ServerLost));
            if let Some(lease) = self.lease.take() {
                self.cancel.target.replace(None);
                self.give_back(lease, after);
            }
            let goodbye = match ending {
                Ending::Terminated => return RelayEnd::Closed("client close request".into()),
                Ending::ClientLeft => return RelayEnd::Closed("client unexpected eof".into()),
                Ending::Error(e) => *e,
                Ending::ServerLost => PgError::fatal(sqlstate::CONNECTION_FAILURE, "server conn crashed?"),
                Ending::HandedOver => unreachable!("returned above"),
            };
            if self.settings.1.log_pooler_errors {
                log::warn!("{} pooler error: {}", self.entry.describe(), goodbye.message);
            }
            goodbye.encode(&mut self.client.outbox);
            self.client.say_goodbye().await;
            RelayEnd::Closed(goodbye.message)
        }
    }

    async fn serve(&mut self) -> Ending {
        let configuration_changed = || {
            Ending::Error(Box::new(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "database configuration changed",
            )))
        };
        loop {
            if self.session.finished(self.lease.is_some()) {
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
                        return Ending::Error(Box::new(clock.expired()));
                    }
                    None => Ok(()),
                },
                Event::TransactionTimeout => {
                    if self.session.tracker().busy() {
                        self.cancel_running_query();
                    }
                    return Ending::Error(Box::new(PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "transaction timeout",
                    )));
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
                // Woken to look: poll_event says when it is idle.
                Event::Control(Control::HandOver) => Ok(()),
                // A TLS session's keys stay in this process's OpenSSL: such a client cannot
                // move, and is let go between transactions, where its driver reconnects.
                Event::HandOver if matches!(self.client.socket, Socket::ClientTls(_)) => {
                    return Ending::Error(Box::new(PgError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        "pgcorral is restarting; reconnect (TLS sessions cannot move)",
                    )))
                }
                Event::HandOver => return Ending::HandedOver,
            };
            if let Err(ending) = step {
                return ending;
            }
            if self.session.settle_due(self.wire()) {
                // Boxed: rare (after a SET), and inline it would be part of every idle client.
                if let Err(ending) = Box::pin(self.settle_session()).await {
                    return ending;
                }
                self.maybe_release();
            }
        }
    }

    /// Flushes what is queued both ways, then reports the first thing that needs attention.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.client.poll_send(cx).is_ready_err() {
            if !self.terminating() {
                return Poll::Ready(Event::ClientGone);
            }
            // A client that said goodbye may close before reading its last answers, as it may
            // with PostgreSQL itself; its server still finishes what it was sent.
            self.client.outbox = BytesMut::new();
        }
        if let Some(lease) = &mut self.lease {
            if lease.link.conn.poll_send(cx).is_ready_err() {
                return Poll::Ready(Event::ServerGone);
            }
        }
        if let Poll::Ready(control) = self.control.poll_recv(cx) {
            return Poll::Ready(Event::Control(control));
        }
        if crate::actors::takeover::handing_over() && self.between_transactions() {
            return Poll::Ready(Event::HandOver);
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
        if self.client.outbox.len() < HIGH_WATER || self.terminating() {
            if let Some(lease) = &mut self.lease {
                match lease.link.conn.poll_fill(cx) {
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
        let cancel_landing = self.cancel.in_flight.get() > 0 && self.session.tracker().idle();
        // A client far ahead of its server waits: what it sent is buffered (to_server), and so
        // is the tracker's record of what is unanswered.
        // So is one that does not read what it is sent: answers pgcorral writes itself (a local
        // DEALLOCATE) would otherwise pile up without bound.
        let backlogged = self.lease.as_ref().is_some_and(|l| l.link.conn.outbox.len() >= HIGH_WATER)
            || self.session.tracker().backlog() >= MAX_BACKLOG
            || self.client.inbox.len() > MAX_HELD
            || self.client.outbox.len() >= HIGH_WATER;
        if !cancel_landing && !backlogged && !self.terminating() {
            match self.client.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::ClientGone),
                Poll::Ready(Ok(_)) => return Poll::Ready(Event::ClientData),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Sends what is queued for the client and ends the session (a login that failed late).
    /// Not an `async fn`, for the reason given at [`Relay::run`].
    #[allow(clippy::manual_async_fn)]
    pub fn run_closing(mut self) -> impl Future<Output = ()> {
        async move {
            self.client.say_goodbye().await;
        }
    }

    /// A client moved here by an online restart: its parameters now and as it logged in (where
    /// `RESET` takes it), and its prepared statements.
    pub fn restore(&mut self, params: TrackedParams, initial: TrackedParams, statements: ClientStatements) {
        self.params = params;
        self.initial_params = initial;
        self.params_confirmed = false;
        self.statements = statements;
    }

    pub fn set_params(&mut self, params: TrackedParams) {
        self.initial_params = params.clone();
        self.params = params;
        self.params_confirmed = false;
    }
}

/// Appends without copying when the destination is empty (the common case: one batch per read).
/// Moves the server messages before `end` to the client and drops the `len`-byte one at `end`
/// (an answer pgcorral swallows or replaces). Returns how many bytes were forwarded.
fn take_frame(from_server: &mut BytesMut, end: usize, len: usize, to_client: &mut BytesMut) -> usize {
    append(to_client, from_server.split_to(end));
    from_server.advance(len);
    end
}

/// The rest of a message whose head has gone on already: it joins the run being forwarded as
/// its bytes arrive. Moves `end` over what of it is in a buffer of `buffered` bytes, and takes
/// that from `remaining`; true once the whole message has gone.
fn pass_through(remaining: &mut usize, buffered: usize, end: &mut usize) -> bool {
    let here = (*remaining).min(buffered - *end);
    *remaining -= here;
    *end += here;
    *remaining == 0
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
