//! The invariants checked after every step of the simulation, and once it is quiet.

use std::collections::HashSet;

use super::{ClientId, ClientState, Sim, SimServer, Violation, FAIRNESS_BOUND};
use crate::actors::pool::Hold;
use crate::actors::router::core::{past_lifetime, JANITOR_PERIOD};

impl Sim {
    pub(super) fn check_limits(&mut self, pool: usize, worker: usize) {
        let settings = self.pools[pool].settings();
        let open = self.live[pool].len();
        if open > settings.pool_size + settings.reserve_pool_size {
            return self.fail(Violation::OverLimit(format!(
                "pool {pool}: {open} servers, pool_size {} + reserve {}",
                settings.pool_size, settings.reserve_pool_size
            )));
        }
        if open > settings.pool_size {
            let entitled = self.queues[pool][worker].iter().any(|(c, _)| {
                !self.gone.contains(c)
                    && self.clients[c]
                        .queued_at
                        .is_some_and(|(t, _)| self.now.duration_since(t) >= self.reserve_timeouts[pool])
            });
            if !entitled {
                return self.fail(Violation::OverLimit(format!(
                    "pool {pool}: {open} servers over pool_size {} with no client waiting reserve_pool_timeout",
                    settings.pool_size
                )));
            }
        }
        let db: usize = self.live.iter().map(HashSet::len).sum();
        if settings.max_db_connections > 0 && db > settings.max_db_connections {
            return self.fail(Violation::OverLimit(format!(
                "{db} servers for the database, max_db_connections {}",
                settings.max_db_connections
            )));
        }
        if settings.max_user_connections > 0 && open > settings.max_user_connections {
            self.fail(Violation::OverLimit(format!(
                "{open} servers for user u{pool}, max_user_connections {}",
                settings.max_user_connections
            )));
        }
    }

    /// A server lent to `client` must be young enough and opened under today's connection
    /// settings.
    pub(super) fn check_fit(&mut self, pool: usize, worker: usize, client: ClientId, server: &SimServer) {
        let lifetime = self.cores[pool][worker].settings().server_lifetime;
        if past_lifetime(server.born, lifetime, self.now) {
            let age = self.now.duration_since(server.born);
            return self.fail(Violation::Outlived(format!(
                "router {pool}/{worker} lent server {} to client {client} at age {age:?}, server_lifetime {lifetime:?}",
                server.conn
            )));
        }
        let generation = self.pools[pool].connection_generation();
        if server.generation != generation {
            self.fail(Violation::Outlived(format!(
                "router {pool}/{worker} lent server {} of connection settings {} to client {client} under settings {generation}",
                server.conn, server.generation
            )));
        }
    }

    pub(super) fn fail(&mut self, violation: Violation) {
        trace!(self, "VIOLATION {violation:?}");
        if self.violation.is_none() {
            self.violation = Some(violation);
        }
    }

    /// Invariants that hold after every step.
    pub(super) fn check(&mut self) {
        for p in 0..self.pools.len() {
            let counted = self.pools[p].server_count();
            let open = self.live[p].len();
            if counted != open {
                return self.fail(Violation::PermitMismatch(format!(
                    "pool {p}: {counted} permits taken, {open} servers open"
                )));
            }
            // Fairness: nobody waits long while a server of its pool idles on another worker.
            for w in 0..self.workers {
                let waiting = self.queues[p][w].iter().find(|(c, _)| !self.gone.contains(c)).map(|(c, _)| *c);
                let idle_elsewhere: usize = (0..self.workers)
                    .filter(|&o| o != w)
                    .map(|o| self.cores[p][o].idle_servers().filter(|s| s.healthy).count())
                    .sum();
                let held = self.pools[p].hold() != Hold::None;
                let Some(client) = waiting.filter(|_| idle_elsewhere > 0 && !held) else {
                    self.unfair_since.remove(&(p, w));
                    continue;
                };
                let since = *self.unfair_since.entry((p, w)).or_insert(self.now);
                let unfair_for = self.now.duration_since(since);
                if unfair_for > FAIRNESS_BOUND {
                    return self.fail(Violation::Unfair(format!(
                        "router {p}/{w}'s clients (client {client} first) waited {unfair_for:?} while \
                         {idle_elsewhere} servers idled on other workers"
                    )));
                }
            }
        }
    }

    /// Once every client is done and time has passed every timeout: nothing is left behind.
    pub(super) fn check_quiet(&mut self) {
        for (id, c) in &self.clients {
            if c.state != ClientState::Done {
                let what = format!("client {id} still {:?}", c.state);
                return self.fail(Violation::Forgotten(what));
            }
        }
        if !self.lent.is_empty() {
            let what = format!("servers still lent: {:?}", self.lent);
            return self.fail(Violation::Leak(what));
        }
        for p in 0..self.pools.len() {
            for w in 0..self.workers {
                let core = &self.cores[p][w];
                if core.is_starving() {
                    let what = format!("router {p}/{w} still starving");
                    return self.fail(Violation::Leak(what));
                }
                if core.waiting() > 0 {
                    let what = format!("router {p}/{w} still has {} waiters", core.waiting());
                    return self.fail(Violation::Leak(what));
                }
            }
            let lifetime = self.pools[p].settings().server_lifetime;
            for w in (0..self.workers).filter(|_| !lifetime.is_zero()) {
                let outlived = self.cores[p][w]
                    .idle_servers()
                    .find(|s| past_lifetime(s.born, lifetime + JANITOR_PERIOD, self.now))
                    .map(|s| s.conn);
                if let Some(conn) = outlived {
                    let what =
                        format!("router {p}/{w} keeps server {conn} idle past server_lifetime {lifetime:?}");
                    return self.fail(Violation::Outlived(what));
                }
            }
            let idle: usize = (0..self.workers).map(|w| self.cores[p][w].idle_count()).sum();
            if idle != self.live[p].len() {
                let what = format!("pool {p}: {} servers open, {idle} idle in routers", self.live[p].len());
                return self.fail(Violation::Leak(what));
            }
        }
        for (id, c) in &self.clients {
            if c.served + c.refused == 0 && !self.gone.contains(id) {
                let what = format!("client {id} neither served nor refused");
                return self.fail(Violation::Forgotten(what));
            }
        }
    }
}
