//! Which timeout a client is on (`client_idle_timeout`, `query_timeout`,
//! `idle_transaction_timeout`, and `transaction_timeout` beside them), and arming its timer only
//! when the key is set.

use super::*;
pub(super) use crate::session::Clock;
use crate::session::Timeouts;

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
        let timeouts = Timeouts {
            client_idle: settings.client_idle_timeout,
            query: settings.query_timeout,
            idle_transaction: settings.idle_transaction_timeout,
            transaction: settings.transaction_timeout,
        };
        self.session.clock(self.lease.is_some(), &timeouts)
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
        let armed = !limit.is_zero() && self.session.in_transaction(self.lease.is_some());
        match (armed, &self.transaction_timer) {
            (true, None) => self.transaction_timer = Some(Box::pin(tokio::time::sleep(limit))),
            (false, Some(_)) => self.transaction_timer = None,
            _ => {}
        }
    }
}
