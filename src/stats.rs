//! Per-pool traffic statistics: the totals behind `SHOW STATS` and the histograms behind
//! `/metrics`.
//!
//! Every worker counts into its own cache line with relaxed atomic adds, so counting costs
//! the data path a few uncontended instructions per transaction and no lock; a reader sums the
//! workers' slots. Times are in microseconds, as PgBouncer reports them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the histogram buckets, in microseconds (the last bucket is unbounded).
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
}

impl Histogram {
    fn observe(&self, us: u64) {
        let bucket = BUCKETS_US.iter().position(|&bound| us <= bound).unwrap_or(BUCKETS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

/// One worker's counters, on a cache line of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WorkerCounters {
    xact_count: AtomicU64,
    query_count: AtomicU64,
    server_assignment_count: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_time: AtomicU64,
    query_time: AtomicU64,
    wait_time: AtomicU64,
    client_parse_count: AtomicU64,
    server_parse_count: AtomicU64,
    bind_count: AtomicU64,
    wait: Histogram,
    xact: Histogram,
    query: Histogram,
}

#[derive(Debug)]
pub struct PoolStats {
    workers: Vec<WorkerCounters>,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

impl PoolStats {
    pub fn new(workers: usize) -> PoolStats {
        PoolStats { workers: (0..workers.max(1)).map(|_| WorkerCounters::default()).collect() }
    }

    fn slot(&self, worker: usize) -> &WorkerCounters {
        &self.workers[worker % self.workers.len()]
    }

    pub fn received(&self, worker: usize, bytes: usize) {
        self.slot(worker).received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn sent(&self, worker: usize, bytes: usize) {
        self.slot(worker).sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Prepared statements: a client's Parse, a Parse sent to a server (the client's or one
    /// pgcorral added), a client's Bind.
    pub fn client_parse(&self, worker: usize) {
        self.slot(worker).client_parse_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn server_parse(&self, worker: usize, count: u64) {
        self.slot(worker).server_parse_count.fetch_add(count, Ordering::Relaxed);
    }

    pub fn bind(&self, worker: usize) {
        self.slot(worker).bind_count.fetch_add(1, Ordering::Relaxed);
    }

    /// A client got a server after waiting `waited`.
    pub fn assigned(&self, worker: usize, waited: Duration) {
        let slot = self.slot(worker);
        let us = micros(waited);
        slot.server_assignment_count.fetch_add(1, Ordering::Relaxed);
        slot.wait_time.fetch_add(us, Ordering::Relaxed);
        slot.wait.observe(us);
    }

    /// A query (one ReadyForQuery's worth) took `took`.
    pub fn query(&self, worker: usize, took: Duration) {
        let slot = self.slot(worker);
        let us = micros(took);
        slot.query_count.fetch_add(1, Ordering::Relaxed);
        slot.query_time.fetch_add(us, Ordering::Relaxed);
        slot.query.observe(us);
    }

    pub fn transaction(&self, worker: usize, took: Duration) {
        let slot = self.slot(worker);
        let us = micros(took);
        slot.xact_count.fetch_add(1, Ordering::Relaxed);
        slot.xact_time.fetch_add(us, Ordering::Relaxed);
        slot.xact.observe(us);
    }

    /// The sums over every worker.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for w in &self.workers {
            let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
            t.xact_count += load(&w.xact_count);
            t.query_count += load(&w.query_count);
            t.server_assignment_count += load(&w.server_assignment_count);
            t.received += load(&w.received);
            t.sent += load(&w.sent);
            t.xact_time += load(&w.xact_time);
            t.query_time += load(&w.query_time);
            t.wait_time += load(&w.wait_time);
            t.client_parse_count += load(&w.client_parse_count);
            t.server_parse_count += load(&w.server_parse_count);
            t.bind_count += load(&w.bind_count);
            for (hist, sum) in
                [(&w.wait, &mut t.wait_hist), (&w.xact, &mut t.xact_hist), (&w.query, &mut t.query_hist)]
            {
                for (total, bucket) in sum.iter_mut().zip(&hist.buckets) {
                    *total += load(bucket);
                }
            }
        }
        t
    }
}

/// Counters summed over workers (and, for a database, over its pools).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub xact_count: u64,
    pub query_count: u64,
    pub server_assignment_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
    /// Per bucket of [`BUCKETS_US`] plus the unbounded one, not cumulative.
    pub wait_hist: [u64; BUCKETS_US.len() + 1],
    pub xact_hist: [u64; BUCKETS_US.len() + 1],
    pub query_hist: [u64; BUCKETS_US.len() + 1],
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.xact_count += other.xact_count;
        self.query_count += other.query_count;
        self.server_assignment_count += other.server_assignment_count;
        self.received += other.received;
        self.sent += other.sent;
        self.xact_time += other.xact_time;
        self.query_time += other.query_time;
        self.wait_time += other.wait_time;
        self.client_parse_count += other.client_parse_count;
        self.server_parse_count += other.server_parse_count;
        self.bind_count += other.bind_count;
        for (mine, theirs) in [
            (&mut self.wait_hist, &other.wait_hist),
            (&mut self.xact_hist, &other.xact_hist),
            (&mut self.query_hist, &other.query_hist),
        ] {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
    }
}

/// PgBouncer's averages over one `stats_period`: counts and bytes per second; times per
/// transaction, per query and per assignment (wait), in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub server_assignment_count: u64,
    pub recv: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
}

impl Averages {
    /// From the totals at the start (`old`) and end (`new`) of a period of `period`.
    pub fn between(old: &Totals, new: &Totals, period: Duration) -> Averages {
        let secs = period.as_secs_f64().max(1e-3);
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let rate = |a: u64, b: u64| (d(a, b) as f64 / secs).round() as u64;
        let per = |time: u64, count: u64| time.checked_div(count).unwrap_or(0);
        let xacts = d(old.xact_count, new.xact_count);
        let queries = d(old.query_count, new.query_count);
        let assignments = d(old.server_assignment_count, new.server_assignment_count);
        Averages {
            xact_count: rate(old.xact_count, new.xact_count),
            query_count: rate(old.query_count, new.query_count),
            server_assignment_count: rate(old.server_assignment_count, new.server_assignment_count),
            recv: rate(old.received, new.received),
            sent: rate(old.sent, new.sent),
            xact_time: per(d(old.xact_time, new.xact_time), xacts),
            query_time: per(d(old.query_time, new.query_time), queries),
            wait_time: per(d(old.wait_time, new.wait_time), assignments),
            client_parse_count: rate(old.client_parse_count, new.client_parse_count),
            server_parse_count: rate(old.server_parse_count, new.server_parse_count),
            bind_count: rate(old.bind_count, new.bind_count),
        }
    }
}

/// The totals at the last two `stats_period` ticks, per database, as PgBouncer keeps them:
/// `SHOW STATS` averages run from the tick before last to now (one to two periods), and the
/// periodic log line covers exactly the period that just ended.
#[derive(Debug)]
pub struct StatsWindow {
    older: HashMap<String, Totals>,
    newer: HashMap<String, Totals>,
    old_stamp: Instant,
    new_stamp: Instant,
}

impl Default for StatsWindow {
    fn default() -> Self {
        StatsWindow::new()
    }
}

impl StatsWindow {
    pub fn new() -> StatsWindow {
        let now = Instant::now();
        StatsWindow {
            older: HashMap::new(),
            newer: HashMap::new(),
            old_stamp: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            new_stamp: now,
        }
    }

    /// A tick: `current` becomes the newest snapshot. Returns the averages of every database
    /// together over the period that just ended, for the log line.
    pub fn refresh(&mut self, current: HashMap<String, Totals>) -> Averages {
        let now = Instant::now();
        let sum = |map: &HashMap<String, Totals>| {
            map.values().fold(Totals::default(), |mut all, t| {
                all.add(t);
                all
            })
        };
        let period = Averages::between(&sum(&self.newer), &sum(&current), now - self.new_stamp);
        self.older = std::mem::replace(&mut self.newer, current);
        self.old_stamp = self.new_stamp;
        self.new_stamp = now;
        period
    }

    /// The averages of `database` whose totals are `current` now.
    pub fn averages(&self, database: &str, current: &Totals) -> Averages {
        let old = self.older.get(database).copied().unwrap_or_default();
        Averages::between(&old, current, self.old_stamp.elapsed())
    }

    /// The averages of all databases together.
    pub fn overall(&self, current: &Totals) -> Averages {
        let old = self.older.values().fold(Totals::default(), |mut all, t| {
            all.add(t);
            all
        });
        Averages::between(&old, current, self.old_stamp.elapsed())
    }
}

/// PgBouncer's periodic line.
pub fn log_line(a: &Averages) -> String {
    format!(
        "stats: {} xacts/s, {} queries/s, {} client parses/s, {} server parses/s, {} binds/s, in {} B/s, out {} B/s, xact {} us, query {} us, wait {} us",
        a.xact_count,
        a.query_count,
        a.client_parse_count,
        a.server_parse_count,
        a.bind_count,
        a.recv,
        a.sent,
        a.xact_time,
        a.query_time,
        a.wait_time
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_count_apart_and_sum_together() {
        let stats = PoolStats::new(2);
        stats.transaction(0, Duration::from_micros(300));
        stats.transaction(1, Duration::from_micros(700));
        stats.query(1, Duration::from_micros(50));
        stats.received(0, 10);
        stats.sent(1, 20);
        stats.assigned(0, Duration::from_millis(2));
        let t = stats.totals();
        assert_eq!((t.xact_count, t.xact_time), (2, 1000));
        assert_eq!((t.query_count, t.query_time), (1, 50));
        assert_eq!((t.received, t.sent), (10, 20));
        assert_eq!((t.server_assignment_count, t.wait_time), (1, 2000));
        // 300 µs falls in the 500 µs bucket (index 2), 700 µs in the 1 ms one (index 3).
        assert_eq!(t.xact_hist[2], 1);
        assert_eq!(t.xact_hist[3], 1);
        assert_eq!(t.query_hist[0], 1, "50 µs is within the first bucket");
        assert_eq!(t.wait_hist[4], 1, "2 ms is within 2.5 ms");
    }

    #[test]
    fn huge_times_land_in_the_last_bucket() {
        let stats = PoolStats::new(1);
        stats.query(0, Duration::from_secs(60));
        assert_eq!(stats.totals().query_hist[BUCKETS_US.len()], 1);
    }

    #[test]
    fn averages_are_rates_and_per_transaction_times() {
        let old = Totals {
            xact_count: 100,
            query_count: 200,
            received: 1000,
            xact_time: 5000,
            ..Totals::default()
        };
        let new = Totals {
            xact_count: 300,
            query_count: 600,
            received: 3000,
            xact_time: 5000 + 200 * 40,
            query_time: 400 * 10,
            wait_time: 200 * 3,
            server_assignment_count: 200,
            ..Totals::default()
        };
        let a = Averages::between(&old, &new, Duration::from_secs(2));
        assert_eq!((a.xact_count, a.query_count, a.recv), (100, 200, 1000));
        assert_eq!((a.xact_time, a.query_time, a.wait_time), (40, 10, 3));
        let idle = Averages::between(&new, &new, Duration::from_secs(60));
        assert_eq!(idle, Averages::default());
    }
}
