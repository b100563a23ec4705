//! The session machine: every decision the relay makes about one client and the server it
//! leases, as a pure type with no I/O.
//!
//! The relay (`actors/relay/`) keeps the sockets and buffers; it tells the machine what crossed
//! the wire (each message's tag, a CommandComplete's tag, a lease granted or given back, a
//! Terminate) and the few facts about its buffers that matter ([`Wire`]), and asks it what to do:
//! when a server goes back and in what state ([`Session::release`], [`Session::on_exit`]), which
//! timeout runs ([`Session::clock`]), whether the session's parameters must be read back before
//! the server goes ([`Session::settle_due`]). The protocol itself (what is still unanswered, the
//! transaction status, COPY) is the [`TxnTracker`] inside it.
//!
//! Phases ([`Phase`]): `Idle` (no server), `Leased`, `Terminating` (the client said goodbye and
//! what it sent before is being seen through). A client waiting in the queue is `Idle` here: it
//! holds nothing, and what it sent is not forwarded until the lease is granted.

use std::time::Duration;

use crate::config::PoolMode;
use crate::protocol::TxnTracker;

/// What must happen to a server when its lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLease {
    /// Clean: straight back to idle.
    Reuse,
    /// Session over: run `server_reset_query` first.
    Reset,
    /// The client left inside a transaction block with nothing in flight: roll back, then reset.
    Rollback,
    /// The protocol state is unknown (client left mid-query, I/O error): never lend it again.
    Close,
    /// Idle past `server_check_delay`: run `server_check_query` before lending it again.
    Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Leased,
    Terminating,
}

/// What the relay's buffers say about the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// Nothing buffered or half-forwarded in either direction, and no parameter sync of
    /// pgcorral's own unanswered.
    pub clean: bool,
    /// A cancel for this client's query is on its way to PostgreSQL: it could hit whatever the
    /// server runs next.
    pub cancel_in_flight: bool,
}

/// What to do with the leased server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// It is still in use (or the mode keeps it for the whole session).
    Keep,
    /// Free, but a cancel is still on its way: give it back once delivered.
    AfterCancel,
    /// Free, but a `SET`, `RESET` or `DISCARD` ran: learn what the session holds first.
    SettleFirst,
    /// Give it back now, in this state.
    Now(AfterLease),
}

/// The clock a client is on, by what it is doing; each has a timeout key (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// No server held: `client_idle_timeout`, restarted by any activity.
    ClientIdle,
    /// A query running: `query_timeout`, from its start.
    Query,
    /// Inside a transaction block, nothing running: `idle_transaction_timeout`, restarted by
    /// any activity.
    IdleInTransaction,
}

/// The timeout keys that apply to a client (zero: off).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub client_idle: Duration,
    pub query: Duration,
    pub idle_transaction: Duration,
    pub transaction: Duration,
}

#[derive(Debug, Clone)]
pub struct Session {
    mode: PoolMode,
    phase: Phase,
    tracker: TxnTracker,
    /// The lease ran `SET`, `RESET` or `DISCARD`: what the session holds must be learned before
    /// the server goes back.
    session_changed: bool,
    /// The last simple query ended in `RESET ALL` or `DISCARD ALL`, and the last answer was
    /// that reset's CommandComplete: the session is at its defaults, nothing to read back.
    query_resets_all: bool,
    answer_was_reset: bool,
    /// The lease ran SQL-level PREPARE or a DEALLOCATE pgcorral did not write: the server may
    /// hold forged statements under pgcorral's names and must not serve anyone else.
    books_untrusted: bool,
}

impl Session {
    pub fn new(mode: PoolMode) -> Session {
        Session {
            mode,
            phase: Phase::Idle,
            tracker: TxnTracker::default(),
            session_changed: false,
            query_resets_all: false,
            answer_was_reset: false,
            books_untrusted: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    pub fn tracker(&self) -> &TxnTracker {
        &self.tracker
    }

    /// Syncs a COPY reader took, for the prepared-statement rewriter's batch count.
    pub fn take_ignored_syncs(&mut self) -> u32 {
        self.tracker.take_ignored_syncs()
    }

    /// A server was leased.
    pub fn leased(&mut self) {
        if self.phase == Phase::Idle {
            self.phase = Phase::Leased;
        }
    }

    /// The client sent Terminate: what it sent before still runs, then the session ends.
    pub fn terminate(&mut self) {
        self.phase = Phase::Terminating;
    }

    /// Whether the session is over: Terminate sent and nothing left for its server to answer.
    pub fn finished(&self, leased: bool) -> bool {
        self.phase == Phase::Terminating && !(leased && self.tracker.busy())
    }

    /// A client message goes to the server; `query` is a whole simple query's text.
    pub fn client_message(&mut self, tag: u8, query: Option<&[u8]>) {
        self.tracker.client_sent(tag);
        // Any later message (an extended `RESET work_mem` has the same tag as `RESET ALL`)
        // makes the outcome unknown again.
        self.query_resets_all =
            tag == b'Q' && self.mode != PoolMode::Session && query.is_some_and(resets_all);
    }

    /// A server message goes to the client (tag, and the first body byte for ReadyForQuery).
    pub fn server_message(&mut self, tag: u8, first_body_byte: Option<u8>) {
        if tag == b'E' {
            self.answer_was_reset = false;
        }
        self.tracker.server_sent(tag, first_body_byte);
    }

    /// A CommandComplete's tag (without its NUL).
    pub fn command_complete(&mut self, tag: &[u8]) {
        self.answer_was_reset = crate::params::is_full_reset_tag(tag);
        if changes_session(tag) {
            self.session_changed = true;
        }
    }

    /// The prepared-statement books of the leased server can no longer be trusted.
    pub fn distrust_books(&mut self) {
        self.books_untrusted = true;
    }

    /// Statement mode refused a transaction block: the server is rolled back and the client's
    /// protocol state starts afresh.
    pub fn refused_block(&mut self) {
        self.tracker = TxnTracker::default();
    }

    /// Whether the lease's session parameters must be learned now: the transaction that
    /// changed them is over and the server about to go back.
    pub fn settle_due(&self, wire: Wire) -> bool {
        self.phase == Phase::Leased
            && self.session_changed
            && self.mode != PoolMode::Session
            && wire.clean
            && !wire.cancel_in_flight
            && self.tracker.idle()
    }

    /// The session was learned (or is known to be at its defaults).
    pub fn settled(&mut self) {
        self.session_changed = false;
    }

    /// The transaction ended with a full reset, as its last answer: nothing to read back.
    pub fn ends_in_full_reset(&self) -> bool {
        self.query_resets_all && self.answer_was_reset
    }

    /// In transaction and statement modes, the server goes back as soon as the transaction is
    /// over, nothing is in flight, and no cancel is on its way.
    pub fn release(&self, wire: Wire) -> Release {
        if self.phase != Phase::Leased
            || self.mode == PoolMode::Session
            || !self.tracker.idle()
            || !wire.clean
        {
            return Release::Keep;
        }
        if wire.cancel_in_flight {
            Release::AfterCancel
        } else if self.session_changed {
            Release::SettleFirst
        } else {
            Release::Now(self.vetted(AfterLease::Reuse))
        }
    }

    /// In what state the server goes back when the session ends.
    pub fn on_exit(&self, wire: Wire, server_lost: bool) -> AfterLease {
        let after = if server_lost || !wire.clean || !self.tracker.quiet() || wire.cancel_in_flight {
            AfterLease::Close
        } else if self.tracker.status() != b'I' {
            AfterLease::Rollback
        } else if self.mode == PoolMode::Session {
            AfterLease::Reset
        } else {
            AfterLease::Reuse
        };
        self.vetted(after)
    }

    /// A server whose statement books cannot be trusted is closed, whatever else is true.
    pub fn vetted(&self, after: AfterLease) -> AfterLease {
        if self.books_untrusted {
            AfterLease::Close
        } else {
            after
        }
    }

    /// The lease ended.
    pub fn released(&mut self) {
        if self.phase == Phase::Leased {
            self.phase = Phase::Idle;
        }
        self.session_changed = false;
        self.books_untrusted = false;
    }

    /// Which clock applies now, and its timeout, if that key is set.
    pub fn clock(&self, leased: bool, timeouts: &Timeouts) -> Option<(Clock, Duration)> {
        let (clock, timeout) = if !leased {
            (Clock::ClientIdle, timeouts.client_idle)
        } else if self.tracker.busy() {
            (Clock::Query, timeouts.query)
        } else if self.tracker.quiet() && self.tracker.status() != b'I' {
            (Clock::IdleInTransaction, timeouts.idle_transaction)
        } else {
            return None;
        };
        (!timeout.is_zero()).then_some((clock, timeout))
    }

    /// Whether `transaction_timeout` runs: a transaction is open or a query running.
    pub fn in_transaction(&self, leased: bool) -> bool {
        leased && (self.tracker.busy() || self.tracker.status() != b'I')
    }

    /// Statement mode: the last ReadyForQuery left a transaction block open.
    pub fn opened_block(&self) -> bool {
        self.mode == PoolMode::Statement && self.tracker.quiet() && self.tracker.status() != b'I'
    }

    /// Statement and transaction time accounting: whether the transaction just ended.
    pub fn transaction_over(&self) -> bool {
        self.tracker.quiet() && self.tracker.status() == b'I'
    }
}

/// Whether a query's text ends in `RESET ALL` or `DISCARD ALL`. Runs on every simple query:
/// the text is only decoded when its last bytes say ALL.
fn resets_all(query: &[u8]) -> bool {
    let end = query.iter().rposition(|&b| b != b';' && !b.is_ascii_whitespace()).map_or(0, |at| at + 1);
    end >= 3
        && query[end - 3..end].eq_ignore_ascii_case(b"ALL")
        && std::str::from_utf8(query).is_ok_and(crate::params::ends_with_full_reset)
}

/// A CommandComplete tag (without its NUL) whose command may have changed session parameters.
pub fn changes_session(tag: &[u8]) -> bool {
    tag == b"SET" || tag == b"RESET" || tag.starts_with(b"DISCARD")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: Wire = Wire { clean: true, cancel_in_flight: false };

    fn leased(mode: PoolMode) -> Session {
        let mut s = Session::new(mode);
        s.leased();
        s
    }

    fn ready(s: &mut Session, status: u8) {
        s.server_message(b'Z', Some(status));
    }

    #[test]
    fn a_transaction_gives_its_server_back_at_ready_for_query_idle() {
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', Some(b"BEGIN"));
        assert_eq!(s.release(CLEAN), Release::Keep);
        ready(&mut s, b'T');
        s.client_message(b'Q', Some(b"COMMIT"));
        s.server_message(b'C', None);
        assert_eq!(s.release(CLEAN), Release::Keep, "COMMIT not answered yet");
        ready(&mut s, b'I');
        assert_eq!(s.release(CLEAN), Release::Now(AfterLease::Reuse));
        assert_eq!(s.release(Wire { clean: false, ..CLEAN }), Release::Keep, "bytes still buffered");
        s.released();
        assert_eq!(s.phase(), Phase::Idle);
    }

    #[test]
    fn a_cancel_on_its_way_holds_the_server() {
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', None);
        ready(&mut s, b'I');
        assert_eq!(s.release(Wire { cancel_in_flight: true, ..CLEAN }), Release::AfterCancel);
        assert_eq!(s.on_exit(Wire { cancel_in_flight: true, ..CLEAN }, false), AfterLease::Close);
    }

    #[test]
    fn a_set_is_settled_before_release_unless_the_query_ended_in_a_full_reset() {
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', Some(b"SET search_path = x"));
        s.command_complete(b"SET");
        ready(&mut s, b'I');
        assert!(s.settle_due(CLEAN) && !s.ends_in_full_reset());
        assert_eq!(s.release(CLEAN), Release::SettleFirst);
        s.settled();
        assert_eq!(s.release(CLEAN), Release::Now(AfterLease::Reuse));

        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', Some(b"SELECT 1; RESET ALL"));
        s.command_complete(b"SELECT 1");
        s.command_complete(b"RESET");
        ready(&mut s, b'I');
        assert!(s.settle_due(CLEAN) && s.ends_in_full_reset());
        let mut s = leased(PoolMode::Session);
        s.client_message(b'Q', Some(b"SET x = 1"));
        s.command_complete(b"SET");
        ready(&mut s, b'I');
        assert!(!s.settle_due(CLEAN), "session mode keeps its server and its settings");

        // A full reset followed by anything else is no longer known to be one.
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', Some(b"RESET ALL"));
        s.command_complete(b"RESET");
        ready(&mut s, b'I');
        for tag in *b"PBES" {
            s.client_message(tag, None);
        }
        s.command_complete(b"RESET");
        assert!(!s.ends_in_full_reset(), "an extended RESET may be of one parameter");
    }

    #[test]
    fn a_full_reset_is_read_from_the_end_of_the_text() {
        assert!(resets_all(b"SELECT pg_advisory_unlock_all(); RESET ALL; \n"));
        assert!(resets_all(b"discard all"));
        assert!(!resets_all(b"SELECT 1 -- RESET ALL"));
        assert!(!resets_all(b"RESET work_mem"));
        assert!(!resets_all(b"ALL") && !resets_all(b";;") && !resets_all(b""));
        assert!(!resets_all(b"SELECT '\xff'; RESET ALL"), "not UTF-8: not read");
    }

    #[test]
    fn leaving_mid_transaction_rolls_back_and_mid_query_closes() {
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', None);
        ready(&mut s, b'T');
        assert_eq!(s.on_exit(CLEAN, false), AfterLease::Rollback);
        s.client_message(b'Q', None);
        assert_eq!(s.on_exit(CLEAN, false), AfterLease::Close);
        assert_eq!(leased(PoolMode::Session).on_exit(CLEAN, false), AfterLease::Reset);
        assert_eq!(leased(PoolMode::Transaction).on_exit(CLEAN, true), AfterLease::Close);
    }

    #[test]
    fn untrusted_books_close_the_server_whatever_else() {
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', Some(b"PREPARE p AS SELECT 1"));
        s.distrust_books();
        ready(&mut s, b'I');
        assert_eq!(s.release(CLEAN), Release::Now(AfterLease::Close));
        s.released();
        s.leased();
        assert_eq!(s.release(CLEAN), Release::Now(AfterLease::Reuse), "the next lease starts trusted");
    }

    #[test]
    fn terminate_sees_what_was_sent_before_through() {
        let mut s = leased(PoolMode::Transaction);
        s.client_message(b'Q', Some(b"INSERT INTO t VALUES (1)"));
        s.terminate();
        assert!(!s.finished(true));
        ready(&mut s, b'I');
        assert!(s.finished(true));
        let mut idle = Session::new(PoolMode::Transaction);
        assert!(!idle.finished(false));
        idle.terminate();
        assert!(idle.finished(false), "with no server, Terminate ends the session at once");
    }

    #[test]
    fn the_clock_follows_what_the_client_does() {
        let t = Timeouts {
            client_idle: Duration::from_secs(1),
            query: Duration::from_secs(2),
            idle_transaction: Duration::from_secs(3),
            transaction: Duration::ZERO,
        };
        let mut s = Session::new(PoolMode::Transaction);
        assert_eq!(s.clock(false, &t).map(|c| c.0), Some(Clock::ClientIdle));
        s.leased();
        s.client_message(b'Q', None);
        assert_eq!(s.clock(true, &t).map(|c| c.0), Some(Clock::Query));
        ready(&mut s, b'T');
        assert_eq!(s.clock(true, &t).map(|c| c.0), Some(Clock::IdleInTransaction));
        assert!(s.in_transaction(true));
        s.client_message(b'Q', None);
        ready(&mut s, b'I');
        assert_eq!(s.clock(true, &t), None, "idle with a server: about to go back");
        assert_eq!(s.clock(false, &Timeouts::default()), None, "keys off: no timer at all");
    }

    #[test]
    fn statement_mode_notices_a_block_being_opened() {
        let mut s = leased(PoolMode::Statement);
        s.client_message(b'Q', Some(b"BEGIN"));
        ready(&mut s, b'T');
        assert!(s.opened_block());
        s.refused_block();
        assert!(!s.opened_block() && s.tracker().idle());
    }
}
