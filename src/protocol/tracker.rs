//! When is a server free to go back to the pool?
//!
//! A pure model of how PostgreSQL consumes what a client sends, fed with the tags of the
//! messages crossing the pooler in both directions. PostgreSQL reads its input strictly in
//! order, and every message has a known terminal answer (Parse `1`, Bind `2`, Close `3`,
//! Describe `T`/`n`, Execute `C`/`I`/`s`, Query, FunctionCall and Sync `Z`), so the model keeps
//! the messages not yet answered in a queue and pops them as their answers arrive. Three of
//! PostgreSQL's rules make plain counting wrong, and are modelled here:
//! - an error in an extended-protocol message makes the server skip everything up to the next
//!   Sync (a Query or FunctionCall in between is skipped too);
//! - while COPY FROM STDIN reads its data, the server's copy reader takes CopyData, CopyDone,
//!   CopyFail, Flush and **Sync** (ignored: libpq and tokio-postgres pipeline a Sync right after
//!   the Execute of a COPY); any other message ends the copy with an error;
//! - CopyData, CopyDone and CopyFail outside a copy are dropped without an answer.
//!
//! Where the rules leave the answer open (a COPY that fails on a data row while the client had
//! sent a Sync between data rows: whether that Sync is answered depends on which row failed),
//! the model never guesses low: the lease is *pinned* to its client and the server is closed
//! when the client leaves. Releasing a server that still owes an answer would hand that answer
//! to the next client; holding one too long costs only the client that misbehaved.
//!
//! A server may be released in transaction mode only when nothing is unanswered, the client has
//! no extended-protocol batch open (messages sent without their Sync yet), and the last
//! ReadyForQuery said `I`. The queue is run-length encoded and its length is exposed
//! ([`TxnTracker::backlog`]) so that the relay can stop reading a client that pipelines far
//! ahead of its server: memory stays bounded.

use std::collections::VecDeque;

/// A client message the server has not answered yet, by what the server will do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Query,
    FunctionCall,
    Sync,
    Parse,
    Bind,
    Describe,
    Close,
    Execute,
    CopyData,
    /// CopyDone, CopyFail, or any message a copy reader would stop at: only their position
    /// matters once a COPY starts.
    CopyEnd,
    /// Any other message (an unknown tag makes PostgreSQL close the connection).
    Other,
}

impl Pending {
    fn from_tag(tag: u8) -> Option<Pending> {
        Some(match tag {
            b'Q' => Pending::Query,
            b'F' => Pending::FunctionCall,
            b'S' => Pending::Sync,
            b'P' => Pending::Parse,
            b'B' => Pending::Bind,
            b'D' => Pending::Describe,
            b'C' => Pending::Close,
            b'E' => Pending::Execute,
            b'd' => Pending::CopyData,
            b'c' | b'f' => Pending::CopyEnd,
            // Flush has no answer and a copy reader ignores it: it changes nothing.
            b'H' => return None,
            _ => Pending::Other,
        })
    }

    /// Answered by ReadyForQuery.
    fn ends_with_ready(self) -> bool {
        matches!(self, Pending::Query | Pending::FunctionCall | Pending::Sync)
    }

    /// Dropped without an answer when the server reads it outside a copy.
    fn silent(self) -> bool {
        matches!(self, Pending::CopyData | Pending::CopyEnd)
    }

    fn extended(self) -> bool {
        matches!(self, Pending::Parse | Pending::Bind | Pending::Describe | Pending::Close | Pending::Execute)
    }
}

/// A COPY FROM STDIN (or COPY BOTH) whose reader takes the client's next messages.
#[derive(Debug, Clone, Default)]
struct CopyReader {
    /// The reader has met its end: CopyDone, CopyFail or a message that is not copy data.
    ended: bool,
    data_seen: bool,
    /// A Sync came after data: if the copy fails, whether it was consumed is unknowable.
    sync_after_data: bool,
    /// The reader stops at a message that is not copy data, after data: if a row fails first,
    /// that message is read as an ordinary one instead. It stays in the queue (counted as
    /// answered later, which is never too early) and a failing copy pins the server.
    stopped_after_data: bool,
}

impl CopyReader {
    /// Feeds one client message to the reader; false once the reader takes no more.
    fn take(&mut self, kind: Pending) -> bool {
        self.take_run(kind, 1) > 0
    }

    /// Feeds a run of `n` equal messages; returns how many the reader took.
    fn take_run(&mut self, kind: Pending, n: u32) -> u32 {
        if self.ended || n == 0 {
            return 0;
        }
        match kind {
            Pending::CopyData => self.data_seen = true,
            Pending::Sync => self.sync_after_data |= self.data_seen,
            // CopyDone and CopyFail end the copy; after a failing row they are dropped anyway.
            Pending::CopyEnd => {
                self.ended = true;
                return 1;
            }
            // Anything else: the server stops the copy with an error there, unless a row
            // failed before.
            _ => {
                self.ended = true;
                self.stopped_after_data = self.data_seen;
                return u32::from(!self.data_seen);
            }
        }
        n
    }
}

/// Most unanswered entries a client may have before the relay stops reading it.
pub const MAX_BACKLOG: usize = 4096;

#[derive(Debug, Clone)]
pub struct TxnTracker {
    /// Client messages not answered yet, oldest first, as (kind, run length).
    unanswered: VecDeque<(Pending, u32)>,
    /// Parse/Bind/Describe/Execute/Close sent since the last Sync.
    open_batch: bool,
    /// An extended-protocol error: the server drops what it reads until the next Sync, and no
    /// Sync has been sent yet.
    skipping: bool,
    copy: Option<CopyReader>,
    /// The model lost certainty: the server stays with this client and is closed after it.
    pinned: bool,
    /// Syncs a copy reader took since the last call to [`TxnTracker::take_ignored_syncs`].
    ignored_syncs: u32,
    /// Transaction status of the last ReadyForQuery: `I` idle, `T` in a block, `E` failed block.
    status: u8,
}

impl Default for TxnTracker {
    fn default() -> Self {
        TxnTracker {
            unanswered: VecDeque::new(),
            open_batch: false,
            skipping: false,
            copy: None,
            pinned: false,
            ignored_syncs: 0,
            status: b'I',
        }
    }
}

impl TxnTracker {
    /// Records a message the client sent to the server.
    pub fn client_sent(&mut self, tag: u8) {
        let Some(kind) = Pending::from_tag(tag) else { return };
        if kind.extended() {
            self.open_batch = true;
        } else if kind == Pending::Sync {
            self.open_batch = false;
        }
        if let Some(reader) = &mut self.copy {
            if reader.take(kind) {
                if kind == Pending::Sync {
                    self.ignored_syncs += 1;
                }
                return;
            }
        }
        if self.skipping {
            // The server drops everything but the Sync that ends the skip.
            if kind != Pending::Sync {
                return;
            }
            self.skipping = false;
        }
        if kind.silent() && self.unanswered.is_empty() {
            // Nothing before it can start a copy: the server will drop it unanswered.
            return;
        }
        self.push(kind, 1);
    }

    fn push(&mut self, kind: Pending, count: u32) {
        match self.unanswered.back_mut() {
            Some((last, n)) if *last == kind && !matches!(kind, Pending::Query | Pending::Execute) => {
                *n = n.saturating_add(count)
            }
            _ => self.unanswered.push_back((kind, count)),
        }
    }

    fn front(&self) -> Option<Pending> {
        self.unanswered.front().map(|(kind, _)| *kind)
    }

    fn pop_front(&mut self) {
        if let Some((_, n)) = self.unanswered.front_mut() {
            *n -= 1;
            if *n == 0 {
                self.unanswered.pop_front();
            }
        }
    }

    /// Copy messages at the front were read outside any copy: dropped by the server.
    fn drop_silent(&mut self) {
        if self.copy.is_some() {
            return;
        }
        while self.front().is_some_and(Pending::silent) {
            self.unanswered.pop_front();
        }
    }

    /// The server answered something it should not have at this point: stop trusting the
    /// model rather than release a server in an unknown state.
    fn lose_track(&mut self) {
        self.pinned = true;
    }

    /// Records a message the server sent; `first_body_byte` is the status for ReadyForQuery.
    pub fn server_sent(&mut self, tag: u8, first_body_byte: Option<u8>) {
        match tag {
            b'Z' => {
                self.drop_silent();
                self.copy = None;
                if let Some(status) = first_body_byte {
                    self.status = status;
                }
                // Everything before the answered Query/Sync/FunctionCall is behind the server.
                loop {
                    match self.front() {
                        Some(kind) if kind.ends_with_ready() => {
                            self.pop_front();
                            break;
                        }
                        Some(_) => {
                            self.unanswered.pop_front();
                        }
                        None => {
                            self.lose_track();
                            break;
                        }
                    }
                }
                self.drop_silent();
            }
            b'1' => self.answered(Pending::Parse),
            b'2' => self.answered(Pending::Bind),
            b'3' => self.answered(Pending::Close),
            b'T' | b'n' if self.front() == Some(Pending::Describe) => {
                self.pop_front();
                self.drop_silent();
            }
            b'C' | b'I' | b's' => {
                // A CommandComplete also ends a COPY (simple or extended).
                self.copy = None;
                if self.front() == Some(Pending::Execute) {
                    self.pop_front();
                    self.drop_silent();
                }
            }
            b'G' | b'W' => self.copy_started(),
            b'E' => self.error(),
            _ => {}
        }
    }

    fn answered(&mut self, kind: Pending) {
        if self.front() == Some(kind) {
            self.pop_front();
            self.drop_silent();
        } else {
            self.lose_track();
        }
    }

    /// CopyInResponse or CopyBothResponse: the Query or Execute at the front runs a COPY whose
    /// reader takes the messages sent after it.
    fn copy_started(&mut self) {
        if !matches!(self.front(), Some(Pending::Query | Pending::Execute)) {
            self.lose_track();
            return;
        }
        let mut reader = CopyReader::default();
        // The front is a single Query/Execute (never merged), so the reader starts at index 1.
        while let Some(&(kind, n)) = self.unanswered.get(1) {
            let taken = reader.take_run(kind, n);
            if kind == Pending::Sync {
                self.ignored_syncs += taken;
            }
            if let Some((_, left)) = self.unanswered.get_mut(1) {
                *left -= taken;
                if *left == 0 {
                    self.unanswered.remove(1);
                }
            }
            if reader.ended {
                break;
            }
        }
        self.copy = Some(reader);
    }

    fn error(&mut self) {
        if let Some(reader) = self.copy.take() {
            if reader.sync_after_data || reader.stopped_after_data {
                self.lose_track();
            }
        } else {
            self.drop_silent();
        }
        match self.front() {
            // Query and FunctionCall errors, and a Sync's failed commit, are followed by
            // their ReadyForQuery.
            Some(kind) if kind.ends_with_ready() => {}
            Some(kind) if kind.extended() => {
                self.pop_front();
                self.skip_to_sync();
            }
            // Nothing was waiting: an error the server sent on its own (a FATAL before close).
            _ => {}
        }
    }

    /// The server drops what it reads up to the next Sync.
    fn skip_to_sync(&mut self) {
        while let Some(kind) = self.front() {
            if kind == Pending::Sync {
                return;
            }
            self.unanswered.pop_front();
        }
        self.skipping = true;
    }

    /// Nothing in flight in either direction: the server could take a query of pgcorral's own.
    pub fn quiet(&self) -> bool {
        self.unanswered.is_empty() && !self.open_batch && self.copy.is_none() && !self.pinned
    }

    /// Quiet and outside any transaction block: releasable in transaction mode.
    pub fn idle(&self) -> bool {
        self.quiet() && self.status == b'I'
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// The server owes at least one answer (a query is running or results are coming).
    pub fn busy(&self) -> bool {
        !self.unanswered.is_empty() || self.copy.is_some()
    }

    /// The model lost certainty: the server must stay with this client, and be closed after.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Entries waiting for an answer: the relay stops reading the client beyond
    /// [`MAX_BACKLOG`].
    pub fn backlog(&self) -> usize {
        self.unanswered.len()
    }

    /// Syncs that turned out to be taken by a COPY reader (no ReadyForQuery will answer them)
    /// since the last call: the prepared-statement rewriter counts batches by Sync too.
    pub fn take_ignored_syncs(&mut self) -> u32 {
        std::mem::take(&mut self.ignored_syncs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(t: &mut TxnTracker, tags: &[u8]) {
        for &tag in tags {
            t.client_sent(tag);
        }
    }

    fn server(t: &mut TxnTracker, tags: &[u8]) {
        for &tag in tags {
            t.server_sent(tag, None);
        }
    }

    fn ready(t: &mut TxnTracker, status: u8) {
        t.server_sent(b'Z', Some(status));
    }

    #[test]
    fn simple_query_cycle() {
        let mut t = TxnTracker::default();
        assert!(t.idle());
        t.client_sent(b'Q');
        assert!(!t.idle() && t.busy());
        server(&mut t, b"TDC");
        assert!(!t.idle());
        ready(&mut t, b'I');
        assert!(t.idle() && !t.pinned());
    }

    #[test]
    fn transaction_block_holds_the_server() {
        let mut t = TxnTracker::default();
        t.client_sent(b'Q');
        ready(&mut t, b'T');
        assert!(t.quiet() && !t.idle());
        t.client_sent(b'Q');
        server(&mut t, b"E");
        ready(&mut t, b'E');
        assert!(!t.idle() && t.status() == b'E');
        t.client_sent(b'Q');
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn extended_batch_is_open_until_sync() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PBDEH");
        server(&mut t, b"12TDC");
        assert!(!t.idle() && !t.busy(), "a flushed batch without Sync keeps the server");
        t.client_sent(b'S');
        assert!(!t.idle());
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn pipelined_syncs_wait_for_every_ready() {
        let mut t = TxnTracker::default();
        client(&mut t, b"BESBESBES");
        for _ in 0..2 {
            server(&mut t, b"2C");
            ready(&mut t, b'I');
        }
        assert!(!t.idle());
        server(&mut t, b"2C");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn copy_in_completes_with_the_querys_ready() {
        let mut t = TxnTracker::default();
        t.client_sent(b'Q');
        server(&mut t, b"G");
        client(&mut t, b"ddc");
        assert!(!t.idle());
        server(&mut t, b"C");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn extended_copy_in_ignores_the_pipelined_sync() {
        // tokio-postgres copy_in and libpq pipelines: P B E S, then the data, CopyDone, Sync.
        let mut t = TxnTracker::default();
        client(&mut t, b"PBES");
        server(&mut t, b"12G");
        client(&mut t, b"dddcS");
        server(&mut t, b"C");
        ready(&mut t, b'I');
        assert!(t.idle(), "the Sync read by the copy reader is never answered");
        assert_eq!(t.take_ignored_syncs(), 1);
    }

    #[test]
    fn extended_copy_in_sent_all_at_once() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PBESddcS");
        server(&mut t, b"12GC");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn extended_copy_failing_on_data_skips_to_the_next_sync() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PBESddcS");
        server(&mut t, b"12GE");
        assert!(!t.idle());
        ready(&mut t, b'I');
        assert!(t.idle() && !t.pinned());
    }

    #[test]
    fn a_sync_between_copy_rows_and_a_failing_copy_pin_the_server() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PBESdSdcS");
        server(&mut t, b"12GE");
        ready(&mut t, b'I');
        assert!(t.pinned() && !t.idle(), "one or two ReadyForQuery may come: never release");
    }

    #[test]
    fn a_sync_between_copy_rows_of_a_copy_that_succeeds_is_taken() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PBESdSdcS");
        server(&mut t, b"12GC");
        ready(&mut t, b'I');
        assert!(t.idle() && !t.pinned());
    }

    #[test]
    fn a_query_pipelined_into_a_copy_ends_it_with_an_error() {
        // COPY ... FROM STDIN by Execute, then a new Query instead of data: the copy reader
        // stops at the Query with an error, which is consumed; the Sync after it answers.
        let mut t = TxnTracker::default();
        client(&mut t, b"BESQS");
        server(&mut t, b"2GE");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn a_query_pipelined_after_copy_rows_is_never_counted_out_early() {
        // Whether the copy reader fails on the Query or a row failed first (and the Query
        // runs) depends on the rows: the Query stays counted, and the failing copy pins.
        let mut t = TxnTracker::default();
        client(&mut t, b"QdQ");
        server(&mut t, b"GE");
        ready(&mut t, b'I');
        assert!(!t.quiet() && t.pinned());
        server(&mut t, b"TDC");
        ready(&mut t, b'I');
        assert!(!t.quiet(), "a pinned server never goes back");
    }

    #[test]
    fn simple_copy_failing_is_answered_by_the_querys_ready() {
        let mut t = TxnTracker::default();
        t.client_sent(b'Q');
        server(&mut t, b"G");
        client(&mut t, b"dd");
        server(&mut t, b"E");
        ready(&mut t, b'I');
        // The client did not see the error yet and finishes its data: dropped unanswered.
        client(&mut t, b"dc");
        assert!(t.idle());
    }

    #[test]
    fn copy_out_needs_nothing_from_the_client() {
        let mut t = TxnTracker::default();
        client(&mut t, b"BES");
        server(&mut t, b"2HddcC");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn an_error_skips_a_query_pipelined_before_the_sync() {
        let mut t = TxnTracker::default();
        client(&mut t, b"BEQS");
        server(&mut t, b"E");
        ready(&mut t, b'I');
        assert!(t.idle(), "the Query was skipped: no ReadyForQuery of its own");
    }

    #[test]
    fn messages_after_an_error_are_dropped_until_the_sync() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PB");
        server(&mut t, b"E");
        client(&mut t, b"EQBE");
        assert!(!t.idle());
        client(&mut t, b"S");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn describe_is_answered_by_row_description_or_no_data() {
        let mut t = TxnTracker::default();
        client(&mut t, b"PDDS");
        server(&mut t, b"1tTn");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn a_failed_implicit_commit_at_sync_is_still_answered() {
        let mut t = TxnTracker::default();
        client(&mut t, b"BES");
        server(&mut t, b"2CE");
        assert!(!t.idle());
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn copy_messages_outside_a_copy_are_dropped() {
        let mut t = TxnTracker::default();
        client(&mut t, b"ddc");
        assert!(t.idle());
        client(&mut t, b"Qdd");
        ready(&mut t, b'I');
        assert!(t.idle());
    }

    #[test]
    fn an_answer_the_model_did_not_expect_pins_the_server() {
        let mut t = TxnTracker::default();
        client(&mut t, b"BS");
        server(&mut t, b"1");
        assert!(t.pinned());
        ready(&mut t, b'I');
        assert!(!t.idle());
    }

    #[test]
    fn the_backlog_is_run_length_encoded() {
        let mut t = TxnTracker::default();
        client(&mut t, b"Q");
        server(&mut t, b"G");
        for _ in 0..10_000 {
            t.client_sent(b'd');
        }
        assert!(t.backlog() <= 1);
        let mut t = TxnTracker::default();
        for _ in 0..100 {
            client(&mut t, b"S");
        }
        assert_eq!(t.backlog(), 1);
    }
}
