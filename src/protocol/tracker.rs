//! When is a server free to go back to the pool?
//!
//! A pure state machine fed with the tags of the messages crossing the pooler. A server may be
//! released in transaction mode only when it owes no ReadyForQuery, the client has no
//! extended-protocol batch open (messages sent without their Sync yet), and the last
//! ReadyForQuery said `I` (idle, not in a transaction block). Getting this wrong desyncs the
//! protocol for two clients at once, so it is kept free of I/O and tested message by message.

#[derive(Debug, Clone)]
pub struct TxnTracker {
    /// ReadyForQuery messages the server still owes: one per Query, FunctionCall and Sync sent.
    owed_ready: u32,
    /// Parse/Bind/Describe/Execute/Close sent since the last Sync.
    open_batch: bool,
    /// Transaction status of the last ReadyForQuery: `I` idle, `T` in a block, `E` failed block.
    status: u8,
}

impl Default for TxnTracker {
    fn default() -> Self {
        TxnTracker { owed_ready: 0, open_batch: false, status: b'I' }
    }
}

impl TxnTracker {
    /// Records a message the client sent to the server.
    pub fn client_sent(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => self.owed_ready += 1,
            b'S' => {
                self.owed_ready += 1;
                self.open_batch = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => self.open_batch = true,
            _ => {}
        }
    }

    /// Records a message the server sent; `first_body_byte` is the status for ReadyForQuery.
    pub fn server_sent(&mut self, tag: u8, first_body_byte: Option<u8>) {
        if tag == b'Z' {
            self.owed_ready = self.owed_ready.saturating_sub(1);
            if let Some(status) = first_body_byte {
                self.status = status;
            }
        }
    }

    /// Nothing in flight in either direction: the server could take a query of pgcorral's own.
    pub fn quiet(&self) -> bool {
        self.owed_ready == 0 && !self.open_batch
    }

    /// Quiet and outside any transaction block: releasable in transaction mode.
    pub fn idle(&self) -> bool {
        self.quiet() && self.status == b'I'
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// The server owes at least one ReadyForQuery (a query is running or results are coming).
    pub fn busy(&self) -> bool {
        self.owed_ready > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_query_cycle() {
        let mut t = TxnTracker::default();
        assert!(t.idle());
        t.client_sent(b'Q');
        assert!(!t.idle() && t.busy());
        t.server_sent(b'T', None);
        t.server_sent(b'D', None);
        t.server_sent(b'C', None);
        assert!(!t.idle());
        t.server_sent(b'Z', Some(b'I'));
        assert!(t.idle());
    }

    #[test]
    fn transaction_block_holds_the_server() {
        let mut t = TxnTracker::default();
        t.client_sent(b'Q');
        t.server_sent(b'Z', Some(b'T'));
        assert!(t.quiet() && !t.idle());
        t.client_sent(b'Q');
        t.server_sent(b'E', None);
        t.server_sent(b'Z', Some(b'E'));
        assert!(!t.idle() && t.status() == b'E');
        t.client_sent(b'Q');
        t.server_sent(b'Z', Some(b'I'));
        assert!(t.idle());
    }

    #[test]
    fn extended_batch_is_open_until_sync() {
        let mut t = TxnTracker::default();
        for tag in [b'P', b'B', b'D', b'E'] {
            t.client_sent(tag);
        }
        t.client_sent(b'H');
        t.server_sent(b'1', None);
        t.server_sent(b'2', None);
        assert!(!t.idle(), "a flushed batch without Sync keeps the server");
        t.client_sent(b'S');
        assert!(!t.idle());
        t.server_sent(b'Z', Some(b'I'));
        assert!(t.idle());
    }

    #[test]
    fn pipelined_syncs_wait_for_every_ready() {
        let mut t = TxnTracker::default();
        for _ in 0..3 {
            for tag in [b'B', b'E', b'S'] {
                t.client_sent(tag);
            }
        }
        t.server_sent(b'Z', Some(b'I'));
        t.server_sent(b'Z', Some(b'I'));
        assert!(!t.idle());
        t.server_sent(b'Z', Some(b'I'));
        assert!(t.idle());
    }

    #[test]
    fn copy_in_completes_with_the_querys_ready() {
        let mut t = TxnTracker::default();
        t.client_sent(b'Q');
        t.server_sent(b'G', None);
        t.client_sent(b'd');
        t.client_sent(b'd');
        assert!(!t.idle());
        t.client_sent(b'c');
        t.server_sent(b'C', None);
        t.server_sent(b'Z', Some(b'I'));
        assert!(t.idle());
    }
}
