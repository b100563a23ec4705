//! Which of a database's hosts a new server connection tries, in which order. Pure logic, one
//! per pool, shared by its workers; the server login (`server.rs`) walks the order it gives.
//!
//! `load_balance_hosts = round-robin` starts each new connection at the next host of the
//! list; `disable` starts where the last connection succeeded, moving on only when a
//! connection there fails. A host that could not be reached is tried last until
//! `server_login_retry` has passed, so a dead address costs at most one
//! `server_connect_timeout` per backoff period, and is tried again after it.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::hosts::LoadBalanceHosts;

#[derive(Debug, Default)]
pub struct HostRotation {
    state: Mutex<RotationState>,
}

#[derive(Debug, Default)]
struct RotationState {
    /// Round robin: where the next connection starts.
    next: usize,
    /// `disable`: the host the last connection reached.
    current: usize,
    /// Per host: tried last until then, after it could not be reached.
    down_until: Vec<Option<Instant>>,
}

impl HostRotation {
    /// The hosts (indices into a list of `count`) one new connection tries, in order: from
    /// where the policy starts, reachable hosts first, then those still in their backoff.
    pub fn order(&self, count: usize, policy: LoadBalanceHosts, now: Instant) -> Vec<usize> {
        let mut state = self.state.lock();
        if state.down_until.len() != count {
            *state = RotationState { down_until: vec![None; count], ..RotationState::default() };
        }
        if count == 0 {
            return Vec::new();
        }
        let start = match policy {
            LoadBalanceHosts::RoundRobin => {
                let start = state.next % count;
                state.next = (start + 1) % count;
                start
            }
            LoadBalanceHosts::Disable => state.current % count,
        };
        let ring = (0..count).map(|i| (start + i) % count);
        let down = |i: &usize| state.down_until[*i].is_some_and(|until| now < until);
        let (mut order, later): (Vec<usize>, Vec<usize>) = ring.partition(|i| !down(i));
        order.extend(later);
        order
    }

    /// Host `index` could not be reached: tried last for `backoff`, and with `disable` the
    /// next connection starts at the host after it.
    pub fn unreachable(&self, index: usize, now: Instant, backoff: Duration) {
        let mut state = self.state.lock();
        let count = state.down_until.len();
        if let Some(slot) = state.down_until.get_mut(index) {
            *slot = now.checked_add(backoff);
        }
        if state.current == index && count > 0 {
            state.current = (index + 1) % count;
        }
    }

    /// A connection to host `index` logged in.
    pub fn reached(&self, index: usize) {
        let mut state = self.state.lock();
        if let Some(slot) = state.down_until.get_mut(index) {
            *slot = None;
            state.current = index;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_secs(15);

    #[test]
    fn round_robin_starts_each_connection_at_the_next_host() {
        let hosts = HostRotation::default();
        let now = Instant::now();
        let starts: Vec<usize> =
            (0..5).map(|_| hosts.order(3, LoadBalanceHosts::RoundRobin, now)[0]).collect();
        assert_eq!(starts, [0, 1, 2, 0, 1]);
        assert_eq!(hosts.order(3, LoadBalanceHosts::RoundRobin, now), [2, 0, 1]);
    }

    #[test]
    fn disable_stays_on_the_host_that_worked_until_it_fails() {
        let hosts = HostRotation::default();
        let now = Instant::now();
        assert_eq!(hosts.order(3, LoadBalanceHosts::Disable, now), [0, 1, 2]);
        assert_eq!(hosts.order(3, LoadBalanceHosts::Disable, now), [0, 1, 2]);
        hosts.unreachable(0, now, RETRY);
        hosts.reached(1);
        assert_eq!(hosts.order(3, LoadBalanceHosts::Disable, now), [1, 2, 0]);
        assert_eq!(hosts.order(3, LoadBalanceHosts::Disable, now), [1, 2, 0]);
    }

    #[test]
    fn an_unreachable_host_is_tried_last_until_its_backoff_ends() {
        let hosts = HostRotation::default();
        let now = Instant::now();
        hosts.order(3, LoadBalanceHosts::RoundRobin, now);
        hosts.unreachable(1, now, RETRY);
        assert_eq!(hosts.order(3, LoadBalanceHosts::RoundRobin, now), [2, 0, 1], "starts at 1: it goes last");
        assert_eq!(hosts.order(3, LoadBalanceHosts::RoundRobin, now), [2, 0, 1]);
        let later = now + RETRY;
        assert_eq!(
            hosts.order(3, LoadBalanceHosts::RoundRobin, later),
            [0, 1, 2],
            "tried again after backoff"
        );
        // Every host down: all are still tried, none is given up on.
        for i in 0..3 {
            hosts.unreachable(i, later, RETRY);
        }
        assert_eq!(hosts.order(3, LoadBalanceHosts::RoundRobin, later).len(), 3);
        // A host list that changed size (a reload) starts afresh.
        assert_eq!(hosts.order(2, LoadBalanceHosts::RoundRobin, later), [0, 1]);
    }
}
