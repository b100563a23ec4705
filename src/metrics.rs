//! Prometheus text exposition (format 0.0.4) of the console's figures.
//!
//! Metric names follow prometheus-community's `pgbouncer_exporter`, so dashboards built on it
//! keep working when pgcorral is scraped directly: `pgbouncer_pools_*` (SHOW POOLS),
//! `pgbouncer_databases_*` (SHOW DATABASES), `pgbouncer_stats_totals_*` (SHOW STATS_TOTALS),
//! the SHOW LISTS gauges and two SHOW CONFIG limits. pgcorral adds histograms PgBouncer does
//! not have, per pool: how long clients waited for a server, and how long transactions and
//! queries took (`pgcorral_*_seconds`).

use std::fmt::Write;

use crate::admin::show::{DatabaseView, PoolView};
use crate::stats::{Totals, BUCKETS_US};

/// Everything one scrape shows.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: String,
    pub pools: Vec<PoolView>,
    /// Per pool (database, user): its traffic totals, histograms included.
    pub pool_totals: Vec<(String, String, Totals)>,
    pub databases: Vec<DatabaseView>,
    /// Per database, as SHOW STATS_TOTALS.
    pub database_totals: Vec<(String, Totals)>,
    pub lists: Vec<(&'static str, i64)>,
    pub max_client_conn: usize,
    pub max_user_connections: usize,
}

/// Escapes a label value as the text format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

struct Out(String);

impl Out {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }

    /// One metric family: a header, then a sample per item.
    fn family<T>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        items: &[T],
        sample: impl Fn(&T) -> (String, f64),
    ) {
        self.header(name, kind, help);
        for item in items {
            let (labels, value) = sample(item);
            self.sample(name, &labels, value);
        }
    }

    /// A histogram from per-bucket (not cumulative) counts, a sum in microseconds and a count.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], buckets: &[u64], sum_us: u64) {
        let mut cumulative = 0;
        for (index, count) in buckets.iter().enumerate() {
            cumulative += count;
            let le = match BUCKETS_US.get(index) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".into(),
            };
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &self::labels(&with_le), cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), &self::labels(labels), sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), &self::labels(labels), cumulative as f64);
    }
}

const POOL_GAUGES: &[(&str, &str)] = &[
    ("client_active_connections", "Client connections linked to server connection and able to process queries, shown as connection"),
    ("client_active_cancel_connections", "Client connections that have forwarded query cancellations to the server and are waiting for the server response"),
    ("client_waiting_connections", "Client connections waiting on a server connection, shown as connection"),
    ("client_waiting_cancel_connections", "Client connections that have not forwarded query cancellations to the server yet"),
    ("server_active_connections", "Server connections linked to a client connection, shown as connection"),
    ("server_active_cancel_connections", "Server connections that are currently forwarding a cancel request."),
    ("server_being_canceled_connections", "Servers that normally could become idle but are waiting to do so until all in-flight cancel requests have completed that were sent to cancel a query on this server."),
    ("server_idle_connections", "Server connections idle and ready for a client query, shown as connection"),
    ("server_used_connections", "Server connections idle more than server_check_delay, needing server_check_query, shown as connection"),
    ("server_testing_connections", "Server connections currently running either server_reset_query or server_check_query, shown as connection"),
    ("server_login_connections", "Server connections currently in the process of logging in, shown as connection"),
    ("client_maxwait_seconds", "Age of oldest unserved client connection, shown as second"),
];

fn pool_value(p: &PoolView, index: usize) -> f64 {
    match index {
        0 => p.cl_active as f64,
        1 => p.cl_active_cancel_req as f64,
        2 => p.cl_waiting as f64,
        3 => p.cl_waiting_cancel_req as f64,
        4 => p.sv_active as f64,
        5 => p.sv_active_cancel as f64,
        6 => p.sv_being_canceled as f64,
        7 => p.sv_idle as f64,
        8 => p.sv_used as f64,
        9 => p.sv_tested as f64,
        10 => p.sv_login as f64,
        _ => p.maxwait.as_secs_f64(),
    }
}

/// (metric suffix, help, value in the metric's unit).
type Counter = (&'static str, &'static str, fn(&Totals) -> f64);

const STATS_COUNTERS: &[Counter] = &[
    ("queries_pooled_total", "Total number of SQL queries pooled", |t| t.query_count as f64),
    (
        "queries_duration_seconds_total",
        "Total number of seconds spent by pgbouncer when actively connected to PostgreSQL, executing queries",
        |t| t.query_time as f64 / 1e6,
    ),
    (
        "received_bytes_total",
        "Total volume in bytes of network traffic received by pgbouncer, shown as bytes",
        |t| t.received as f64,
    ),
    ("sent_bytes_total", "Total volume in bytes of network traffic sent by pgbouncer, shown as bytes", |t| {
        t.sent as f64
    }),
    ("client_wait_seconds_total", "Time spent by clients waiting for a server in seconds", |t| {
        t.wait_time as f64 / 1e6
    }),
    ("sql_transactions_pooled_total", "Total number of SQL transactions pooled", |t| t.xact_count as f64),
    (
        "server_in_transaction_seconds_total",
        "Total number of seconds spent by pgbouncer when connected to PostgreSQL in a transaction, either idle in transaction or executing queries",
        |t| t.xact_time as f64 / 1e6,
    ),
    ("server_assignments_total", "Total number of times a server was assigned to a client", |t| {
        t.server_assignment_count as f64
    }),
    ("client_parses_total", "Total number of prepared statement Parse messages received from clients", |_| 0.0),
    ("server_parses_total", "Total number of prepared statement Parse messages sent by pgbouncer to PostgreSQL", |_| 0.0),
    ("binds_total", "Total number of prepared statements readied for execution with a Bind message", |_| 0.0),
];

const LIST_GAUGES: &[(&str, &str, &str)] = &[
    ("databases", "pgbouncer_databases", "Count of databases"),
    ("users", "pgbouncer_users", "Count of users"),
    ("pools", "pgbouncer_pools", "Count of pools"),
    ("free_clients", "pgbouncer_free_clients", "Count of free clients"),
    ("used_clients", "pgbouncer_used_clients", "Count of used clients"),
    ("login_clients", "pgbouncer_login_clients", "Count of clients in login state"),
    ("free_servers", "pgbouncer_free_servers", "Count of free servers"),
    ("used_servers", "pgbouncer_used_servers", "Count of used servers"),
    ("dns_names", "pgbouncer_cached_dns_names", "Count of DNS names in the cache"),
    ("dns_zones", "pgbouncer_cached_dns_zones", "Count of DNS zones in the cache"),
    ("dns_queries", "pgbouncer_in_flight_dns_queries", "Count of in-flight DNS queries"),
];

pub fn render(s: &Snapshot) -> String {
    let mut out = Out(String::with_capacity(16 * 1024));
    out.header("pgbouncer_up", "gauge", "The pgbouncer scrape succeeded");
    out.sample("pgbouncer_up", "", 1.0);
    out.header("pgbouncer_version_info", "gauge", "The pgbouncer version info");
    out.sample("pgbouncer_version_info", &labels(&[("version", &s.version)]), 1.0);

    for (index, (suffix, help)) in POOL_GAUGES.iter().enumerate() {
        out.family(&format!("pgbouncer_pools_{suffix}"), "gauge", help, &s.pools, |p| {
            (labels(&[("database", &p.database), ("user", &p.user)]), pool_value(p, index))
        });
    }

    let db_labels = |d: &DatabaseView| {
        let port = d.port.to_string();
        labels(&[
            ("name", &d.name),
            ("host", d.host.as_deref().unwrap_or("")),
            ("port", &port),
            ("database", &d.database),
            ("force_user", d.force_user.as_deref().unwrap_or("")),
            ("pool_mode", d.pool_mode.as_deref().unwrap_or("")),
        ])
    };
    type DbGauge = (&'static str, &'static str, fn(&DatabaseView) -> f64);
    let db_gauges: &[DbGauge] = &[
        ("pool_size", "Maximum number of server connections", |d| d.pool_size as f64),
        ("reserve_pool", "Maximum number of additional connections for this database", |d| {
            d.reserve_pool_size as f64
        }),
        ("max_connections", "Maximum number of allowed connections for this database", |d| {
            d.max_connections as f64
        }),
        ("current_connections", "Current number of connections for this database", |d| {
            d.current_connections as f64
        }),
        ("paused", "1 if this database is currently paused, else 0", |d| d.paused as u8 as f64),
        ("disabled", "1 if this database is currently disabled, else 0", |d| d.disabled as u8 as f64),
    ];
    for (suffix, help, value) in db_gauges {
        out.family(&format!("pgbouncer_databases_{suffix}"), "gauge", help, &s.databases, |d| {
            (db_labels(d), value(d))
        });
    }

    for (suffix, help, value) in STATS_COUNTERS {
        out.family(
            &format!("pgbouncer_stats_totals_{suffix}"),
            "counter",
            help,
            &s.database_totals,
            |(db, t)| (labels(&[("database", db)]), value(t)),
        );
    }

    for (row, name, help) in LIST_GAUGES {
        let value = s.lists.iter().find(|(n, _)| n == row).map_or(0, |(_, v)| *v);
        out.header(name, "gauge", help);
        out.sample(name, "", value as f64);
    }
    out.header(
        "pgbouncer_config_max_client_connections",
        "gauge",
        "Config maximum number of client connections",
    );
    out.sample("pgbouncer_config_max_client_connections", "", s.max_client_conn as f64);
    out.header(
        "pgbouncer_config_max_user_connections",
        "gauge",
        "Config maximum number of server connections per user",
    );
    out.sample("pgbouncer_config_max_user_connections", "", s.max_user_connections as f64);

    type Histogram = (&'static str, &'static str, fn(&Totals) -> (&[u64], u64));
    let histograms: &[Histogram] = &[
        ("pgcorral_client_wait_seconds", "How long clients waited for a server, per assignment", |t| {
            (&t.wait_hist, t.wait_time)
        }),
        ("pgcorral_transaction_seconds", "How long transactions held their server", |t| {
            (&t.xact_hist, t.xact_time)
        }),
        ("pgcorral_query_seconds", "How long queries took, up to their ReadyForQuery", |t| {
            (&t.query_hist, t.query_time)
        }),
    ];
    for (name, help, pick) in histograms {
        out.header(name, "histogram", help);
        for (database, user, totals) in &s.pool_totals {
            let (buckets, sum) = pick(totals);
            out.histogram(name, &[("database", database), ("user", user)], buckets, sum);
        }
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exporter_names_labels_and_cumulative_buckets() {
        let mut totals = Totals { xact_count: 3, xact_time: 1_500, query_count: 4, ..Totals::default() };
        totals.xact_hist[0] = 2;
        totals.xact_hist[3] = 1;
        let snapshot = Snapshot {
            version: "PgBouncer 1.25.1".into(),
            pools: vec![PoolView {
                database: "app".into(),
                user: "u\"x".into(),
                cl_waiting: 48,
                maxwait: Duration::from_millis(1500),
                ..PoolView::default()
            }],
            pool_totals: vec![("app".into(), "u".into(), totals)],
            database_totals: vec![("app".into(), totals)],
            lists: vec![("used_clients", 50)],
            max_client_conn: 100,
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        assert!(
            text.contains(
                "pgbouncer_pools_client_waiting_connections{database=\"app\",user=\"u\\\"x\"} 48\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("pgbouncer_pools_client_maxwait_seconds{database=\"app\",user=\"u\\\"x\"} 1.5\n")
        );
        assert!(text.contains("pgbouncer_stats_totals_sql_transactions_pooled_total{database=\"app\"} 3\n"));
        assert!(text.contains(
            "pgbouncer_stats_totals_server_in_transaction_seconds_total{database=\"app\"} 0.0015\n"
        ));
        assert!(text.contains("pgbouncer_used_clients 50\n"));
        assert!(text
            .contains("pgcorral_transaction_seconds_bucket{database=\"app\",user=\"u\",le=\"0.0001\"} 2\n"));
        assert!(text
            .contains("pgcorral_transaction_seconds_bucket{database=\"app\",user=\"u\",le=\"0.001\"} 3\n"));
        assert!(
            text.contains("pgcorral_transaction_seconds_bucket{database=\"app\",user=\"u\",le=\"+Inf\"} 3\n")
        );
        assert!(text.contains("pgcorral_transaction_seconds_count{database=\"app\",user=\"u\"} 3\n"));
        assert!(text.contains("# TYPE pgbouncer_stats_totals_queries_pooled_total counter\n"));
    }
}
