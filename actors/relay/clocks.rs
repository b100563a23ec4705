//! Which timeout a client is on (`client_idle_timeout`, `query_timeout`,
//! `idle_transaction_timeout`, and `transaction_timeout` beside them), and arming its timer only
//! when the key is set.

use super::*;

/// The clock a client is on, by what it is doing; each has a timeout key (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Clock {
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
    pub(super) fn expired(self) -> PgError {
        let what = match self {
            Clock::ClientIdle => "client_idle_timeout",
            Clock::Query => "query_timeout",
            Clock::IdleInTransaction => "idle transaction timeout",
        };
        PgError::fatal(sqlstate::PROTOCOL_VIOLATION, what)
    }
}

impl Relay {
    /// Which clock applies now and its timeout, if that timeout is set.
    pub(super) fn clock(&self) -> Option<(Clock, Duration)> {
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
    pub(super) fn arm_timer(&mut self) {
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
}
