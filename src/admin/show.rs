//! The row sets of the console's `SHOW` commands, with PgBouncer 1.25's column names, order
//! and types, built from plain views of the live system (filled in by `actors/inspect.rs`).
//!
//! Pure formatting: every number arrives in a view, so each table is unit-tested here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::admin::resultset::{ColumnType, ColumnType::*, ResultSet, Value};
use crate::stats::{Averages, Totals};

/// The text PgBouncer sends as the DETAIL of `SHOW HELP`'s notice.
pub const HELP: &str = "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\tSHOW PEERS|PEER_POOLS\n\tSHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE\n\tSHOW DNS_HOSTS|DNS_ZONES\n\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n\tSET key = arg\n\tRELOAD\n\tPAUSE [<db>]\n\tRESUME [<db>]\n\tDISABLE <db>\n\tENABLE <db>\n\tRECONNECT [<db>]\n\tKILL [<db>]\n\tKILL_CLIENT <client_id>\n\tSUSPEND\n\tSHUTDOWN\n\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n\tWAIT_CLOSE [<db>]";

/// The session parameters PgBouncer's console pretends to have (`SHOW client_encoding`).
pub const FAKE_PARAMETERS: &[(&str, &str)] = &[
    ("client_encoding", "UTF-8"),
    ("default_transaction_isolation", "read committed"),
    ("standard_conforming_strings", "on"),
    ("datestyle", "ISO"),
    ("timezone", "GMT"),
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    pub database: String,
    pub user: String,
    pub cl_active: usize,
    pub cl_waiting: usize,
    pub cl_active_cancel_req: usize,
    pub cl_waiting_cancel_req: usize,
    pub sv_active: usize,
    pub sv_active_cancel: usize,
    pub sv_being_canceled: usize,
    pub sv_idle: usize,
    pub sv_used: usize,
    pub sv_tested: usize,
    pub sv_login: usize,
    /// How long the oldest waiting client has waited.
    pub maxwait: Duration,
    pub pool_mode: String,
}

/// One client or server connection (`SHOW CLIENTS`, `SHOW SERVERS`, `SHOW SOCKETS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnView {
    /// `C` or `S`.
    pub kind: &'static str,
    pub user: String,
    pub database: String,
    pub state: &'static str,
    pub addr: String,
    pub port: u16,
    pub local_addr: String,
    pub local_port: u16,
    pub connect_time: Option<SystemTime>,
    pub request_time: Option<SystemTime>,
    pub wait: Duration,
    pub close_needed: bool,
    pub id: u64,
    /// The id of the connection on the other side, if linked.
    pub link: Option<u64>,
    pub remote_pid: i32,
    /// TLS protocol and cipher; empty for plaintext.
    pub tls: String,
    /// Named prepared statements the client holds, or the server has.
    pub prepared: u32,
    pub application_name: String,
    /// Bytes buffered, for `SHOW ACTIVE_SOCKETS` (pgcorral keeps none between reads).
    pub buffered: usize,
    /// `none`, `physical` or `logical`.
    pub replication: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseView {
    pub name: String,
    pub host: Option<String>,
    pub port: u16,
    pub database: String,
    pub force_user: Option<String>,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub server_lifetime: Duration,
    /// `None` when inherited from `[pgbouncer]`.
    pub pool_mode: Option<String>,
    pub max_connections: usize,
    pub current_connections: usize,
    pub max_client_connections: usize,
    pub current_client_connections: usize,
    pub paused: bool,
    pub disabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserView {
    pub name: String,
    pub pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub pool_mode: Option<String>,
    pub max_user_connections: usize,
    pub current_connections: usize,
    pub max_user_client_connections: usize,
    pub current_client_connections: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsView {
    pub database: String,
    pub totals: Totals,
    pub averages: Averages,
}

/// One `[peers]` entry and the cancel requests on their way to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub peer_id: u16,
    pub host: String,
    pub port: u16,
    pub pool_size: usize,
    /// Waiting for a turn (`cl_waiting_cancel_req`).
    pub waiting: usize,
    /// Connecting to the peer (`sv_login`).
    pub connecting: usize,
    /// Sent, waiting for the peer to close (`cl_active_cancel_req`, `sv_active_cancel`).
    pub active: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRow {
    pub key: &'static str,
    pub value: Option<String>,
    pub default: Option<String>,
    pub changeable: bool,
}

/// Whole seconds and the microseconds beyond them, as PgBouncer splits waits.
fn split(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_micros())
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest / 60 % 60, rest % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn pointer(id: u64) -> String {
    format!("0x{id:x}")
}

pub fn version(version: &str) -> ResultSet {
    let mut set = ResultSet::new(&[("version", Text)]);
    set.push(vec![version.into()]);
    set
}

pub fn config(rows: &[ConfigRow]) -> ResultSet {
    let mut set = ResultSet::new(&[("key", Text), ("value", Text), ("default", Text), ("changeable", Text)]);
    for row in rows {
        set.push(vec![
            row.key.into(),
            row.value.clone().into(),
            row.default.clone().into(),
            if row.changeable { "yes" } else { "no" }.into(),
        ]);
    }
    set
}

pub fn databases(rows: &[DatabaseView]) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int4),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int4),
        ("min_pool_size", Int4),
        ("reserve_pool_size", Int4),
        ("server_lifetime", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int4),
        ("current_connections", Int4),
        ("max_client_connections", Int4),
        ("current_client_connections", Int4),
        ("paused", Int4),
        ("disabled", Int4),
    ]);
    for db in rows {
        set.push(vec![
            db.name.as_str().into(),
            db.host.clone().into(),
            db.port.into(),
            db.database.as_str().into(),
            db.force_user.clone().into(),
            db.pool_size.into(),
            db.min_pool_size.into(),
            db.reserve_pool_size.into(),
            db.server_lifetime.as_secs().into(),
            db.pool_mode.clone().into(),
            Value::Null,
            db.max_connections.into(),
            db.current_connections.into(),
            db.max_client_connections.into(),
            db.current_client_connections.into(),
            (db.paused as i32).into(),
            (db.disabled as i32).into(),
        ]);
    }
    set
}

pub fn pools(rows: &[PoolView]) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int4),
        ("cl_waiting", Int4),
        ("cl_active_cancel_req", Int4),
        ("cl_waiting_cancel_req", Int4),
        ("sv_active", Int4),
        ("sv_active_cancel", Int4),
        ("sv_being_canceled", Int4),
        ("sv_idle", Int4),
        ("sv_used", Int4),
        ("sv_tested", Int4),
        ("sv_login", Int4),
        ("maxwait", Int4),
        ("maxwait_us", Int4),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
    ]);
    for p in rows {
        let (secs, us) = split(p.maxwait);
        set.push(vec![
            p.database.as_str().into(),
            p.user.as_str().into(),
            p.cl_active.into(),
            p.cl_waiting.into(),
            p.cl_active_cancel_req.into(),
            p.cl_waiting_cancel_req.into(),
            p.sv_active.into(),
            p.sv_active_cancel.into(),
            p.sv_being_canceled.into(),
            p.sv_idle.into(),
            p.sv_used.into(),
            p.sv_tested.into(),
            p.sv_login.into(),
            secs.into(),
            us.into(),
            p.pool_mode.as_str().into(),
            Value::Null,
        ]);
    }
    set
}

const CONNECTION_COLUMNS: &[(&str, ColumnType)] = &[
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int4),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int4),
    ("id", Int4),
];

const SOCKET_COLUMNS: &[(&str, ColumnType)] = &[
    ("recv_pos", Int4),
    ("pkt_pos", Int4),
    ("pkt_remain", Int4),
    ("send_pos", Int4),
    ("send_remain", Int4),
    ("pkt_avail", Int4),
    ("send_avail", Int4),
];

fn connection_row(c: &ConnView) -> Vec<Value> {
    let (secs, us) = split(c.wait);
    let time = |t: Option<SystemTime>| t.map(format_time).into();
    vec![
        c.kind.into(),
        c.user.as_str().into(),
        c.database.as_str().into(),
        c.replication.into(),
        c.state.into(),
        c.addr.as_str().into(),
        c.port.into(),
        c.local_addr.as_str().into(),
        c.local_port.into(),
        time(c.connect_time),
        time(c.request_time),
        secs.into(),
        us.into(),
        (c.close_needed as i32).into(),
        pointer(c.id).into(),
        c.link.map_or(String::new(), pointer).into(),
        c.remote_pid.into(),
        c.tls.as_str().into(),
        c.application_name.as_str().into(),
        (c.prepared as i32).into(),
        c.id.into(),
    ]
}

/// `SHOW CLIENTS` and `SHOW SERVERS`.
pub fn connections(rows: &[ConnView]) -> ResultSet {
    let mut set = ResultSet::new(CONNECTION_COLUMNS);
    for c in rows {
        set.push(connection_row(c));
    }
    set
}

/// `SHOW SOCKETS` (every connection) and `SHOW ACTIVE_SOCKETS` (those with buffered bytes),
/// with states named as PgBouncer's socket lists are.
pub fn sockets(rows: &[ConnView], active_only: bool) -> ResultSet {
    let columns: Vec<_> = CONNECTION_COLUMNS.iter().chain(SOCKET_COLUMNS).copied().collect();
    let mut set = ResultSet::new(&columns);
    for c in rows.iter().filter(|c| !active_only || c.buffered > 0) {
        let mut row = connection_row(c);
        let prefix = if c.kind == "C" { "cl_" } else { "sv_" };
        let state = match c.state {
            "idle" if c.kind == "C" => "active",
            "new" => "login",
            other => other,
        };
        row[4] = format!("{prefix}{state}").into();
        row.extend([c.buffered, 0, 0, 0, 0, c.buffered, 0].map(Value::from));
        set.push(row);
    }
    set
}

pub fn users(rows: &[UserView]) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("name", Text),
        ("pool_size", Text),
        ("reserve_pool_size", Text),
        ("pool_mode", Text),
        ("max_user_connections", Int4),
        ("current_connections", Int4),
        ("max_user_client_connections", Int4),
        ("current_client_connections", Int4),
    ]);
    // PgBouncer prints overrides right-aligned to nine places, and nothing when unset.
    let padded = |n: Option<usize>| n.map_or(String::new(), |n| format!("{n:9}"));
    for u in rows {
        set.push(vec![
            u.name.as_str().into(),
            padded(u.pool_size).into(),
            padded(u.reserve_pool_size).into(),
            u.pool_mode.clone().into(),
            u.max_user_connections.into(),
            u.current_connections.into(),
            u.max_user_client_connections.into(),
            u.current_client_connections.into(),
        ]);
    }
    set
}

fn totals_values(t: &Totals) -> [u64; 11] {
    [
        t.server_assignment_count,
        t.xact_count,
        t.query_count,
        t.received,
        t.sent,
        t.xact_time,
        t.query_time,
        t.wait_time,
        t.client_parse_count,
        t.server_parse_count,
        t.bind_count,
    ]
}

fn averages_values(a: &Averages) -> [u64; 11] {
    [
        a.server_assignment_count,
        a.xact_count,
        a.query_count,
        a.recv,
        a.sent,
        a.xact_time,
        a.query_time,
        a.wait_time,
        a.client_parse_count,
        a.server_parse_count,
        a.bind_count,
    ]
}

fn numeric_table(names: &[&'static str], rows: impl Iterator<Item = (String, Vec<u64>)>) -> ResultSet {
    let columns: Vec<(&'static str, ColumnType)> =
        std::iter::once(("database", Text)).chain(names.iter().map(|n| (*n, Numeric))).collect();
    let mut set = ResultSet::new(&columns);
    for (database, values) in rows {
        let mut row = vec![Value::from(database)];
        row.extend(values.into_iter().map(Value::from));
        set.push(row);
    }
    set
}

pub fn stats(rows: &[StatsView]) -> ResultSet {
    const NAMES: &[&str] = &[
        "total_server_assignment_count",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "total_client_parse_count",
        "total_server_parse_count",
        "total_bind_count",
        "avg_server_assignment_count",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
        "avg_client_parse_count",
        "avg_server_parse_count",
        "avg_bind_count",
    ];
    numeric_table(
        NAMES,
        rows.iter().map(|s| {
            let mut values = totals_values(&s.totals).to_vec();
            values.extend(averages_values(&s.averages));
            (s.database.clone(), values)
        }),
    )
}

pub fn stats_totals(rows: &[StatsView]) -> ResultSet {
    const NAMES: &[&str] = &[
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        "client_parse_count",
        "server_parse_count",
        "bind_count",
    ];
    numeric_table(NAMES, rows.iter().map(|s| (s.database.clone(), totals_values(&s.totals).to_vec())))
}

pub fn stats_averages(rows: &[StatsView]) -> ResultSet {
    const NAMES: &[&str] = &[
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        "avg_client_parse_count",
        "avg_server_parse_count",
        "avg_bind_count",
    ];
    numeric_table(NAMES, rows.iter().map(|s| (s.database.clone(), averages_values(&s.averages).to_vec())))
}

/// `SHOW TOTALS`: every database's counters summed, one row per counter.
pub fn totals(all: &StatsView) -> ResultSet {
    const NAMES: &[&str] = &[
        "total_server_assignment_count",
        "total_xact_count",
        "total_query_count",
        "total_client_bytes",
        "total_server_bytes",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "total_ps_client_parse_count",
        "total_ps_server_parse_count",
        "total_ps_bind_count",
        "avg_server_assignment_count",
        "avg_xact_count",
        "avg_query_count",
        "avg_client_bytes",
        "avg_server_bytes",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
        "avg_ps_client_parse_count",
        "avg_ps_server_parse_count",
        "avg_ps_bind_count",
    ];
    let values = totals_values(&all.totals).into_iter().chain(averages_values(&all.averages));
    let mut set = ResultSet::new(&[("name", Text), ("value", Numeric)]);
    for (name, value) in NAMES.iter().zip(values) {
        set.push(vec![(*name).into(), value.into()]);
    }
    set
}

/// `SHOW LISTS`, from (name, count) pairs in PgBouncer's order.
pub fn lists(items: &[(&'static str, i64)]) -> ResultSet {
    let mut set = ResultSet::new(&[("list", Text), ("items", Int4)]);
    for (name, count) in items {
        set.push(vec![(*name).into(), (*count).into()]);
    }
    set
}

/// `SHOW PEERS`.
pub fn peers(peers: &[PeerView]) -> ResultSet {
    let mut set = ResultSet::new(&[("peer_id", Int4), ("host", Text), ("port", Int4), ("pool_size", Int4)]);
    for peer in peers {
        set.push(vec![
            (peer.peer_id as i64).into(),
            peer.host.as_str().into(),
            (peer.port as i64).into(),
            (peer.pool_size as i64).into(),
        ]);
    }
    set
}

/// `SHOW PEER_POOLS`: a forwarded request holds one connection to its peer, so the active
/// requests and the active connections are the same count.
pub fn peer_pools(peers: &[PeerView]) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("peer_id", Int4),
        ("cl_active_cancel_req", Int4),
        ("cl_waiting_cancel_req", Int4),
        ("sv_active_cancel", Int4),
        ("sv_login", Int4),
    ]);
    for peer in peers {
        set.push(vec![
            (peer.peer_id as i64).into(),
            (peer.active as i64).into(),
            (peer.waiting as i64).into(),
            (peer.active as i64).into(),
            (peer.connecting as i64).into(),
        ]);
    }
    set
}

/// `SHOW MEM`: (cache name, object size, used, free).
pub fn mem(caches: &[(&'static str, usize, usize, usize)]) -> ResultSet {
    let mut set =
        ResultSet::new(&[("name", Text), ("size", Int4), ("used", Int4), ("free", Int4), ("memtotal", Int4)]);
    for (name, size, used, free) in caches {
        set.push(vec![
            (*name).into(),
            (*size).into(),
            (*used).into(),
            (*free).into(),
            (size * (used + free)).into(),
        ]);
    }
    set
}

pub fn state(active: bool, paused: bool, suspended: bool) -> ResultSet {
    let mut set = ResultSet::new(&[("key", Text), ("value", Text)]);
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    for (key, value) in [("active", active), ("paused", paused), ("suspended", suspended)] {
        set.push(vec![key.into(), yes_no(value).into()]);
    }
    set
}

/// The tables pgcorral has no rows for, with PgBouncer's columns: sockets are not handed over
/// (`FDS`), and names are resolved per connection without a cache (`DNS_*`).
pub fn empty(what: &str) -> Option<ResultSet> {
    let columns: &[(&'static str, ColumnType)] = match what {
        "FDS" => &[
            ("fd", Int4),
            ("task", Text),
            ("user", Text),
            ("database", Text),
            ("addr", Text),
            ("port", Int4),
            ("cancel", Int8),
            ("link", Int4),
            ("client_encoding", Text),
            ("std_strings", Text),
            ("datestyle", Text),
            ("timezone", Text),
            ("password", Text),
            ("scram_client_key", Bytea),
            ("scram_server_key", Bytea),
        ],
        "DNS_HOSTS" => &[("hostname", Text), ("ttl", Int8), ("addrs", Text)],
        "DNS_ZONES" => &[("zonename", Text), ("serial", Int8), ("count", Int4)],
        _ => return None,
    };
    Some(ResultSet::new(columns))
}

/// `SHOW client_encoding` and the other parameters the console pretends to have.
pub fn fake_parameter(name: &str) -> Option<ResultSet> {
    let (column, value) = FAKE_PARAMETERS.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))?;
    let mut set = ResultSet::new(&[(column, Text)]);
    set.push(vec![(*value).into()]);
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &ResultSet) -> Vec<&str> {
        set.columns.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn times_print_as_pgbouncer_prints_them() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        // 2026-11-25 09:07:40 UTC
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(1_795_597_660)), "2026-11-25 09:07:40 UTC");
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn pools_split_maxwait_into_seconds_and_microseconds() {
        let view = PoolView {
            database: "app".into(),
            user: "u".into(),
            cl_waiting: 48,
            cl_active: 2,
            sv_active: 2,
            maxwait: Duration::from_micros(3_250_000),
            pool_mode: "transaction".into(),
            ..PoolView::default()
        };
        let set = pools(&[view]);
        assert_eq!(set.columns.len(), 17);
        let row = &set.rows[0];
        let at = |name: &str| row[set.column(name).unwrap()].clone();
        assert_eq!(at("cl_waiting"), Value::Int(48));
        assert_eq!(at("maxwait"), Value::Int(3));
        assert_eq!(at("maxwait_us"), Value::Int(250_000));
        assert_eq!(at("load_balance_hosts"), Value::Null);
    }

    #[test]
    fn connection_tables_have_pgbouncers_columns() {
        let conn = ConnView { kind: "C", state: "idle", id: 255, link: Some(16), ..ConnView::default() };
        let set = connections(std::slice::from_ref(&conn));
        assert_eq!(
            names(&set),
            [
                "type",
                "user",
                "database",
                "replication",
                "state",
                "addr",
                "port",
                "local_addr",
                "local_port",
                "connect_time",
                "request_time",
                "wait",
                "wait_us",
                "close_needed",
                "ptr",
                "link",
                "remote_pid",
                "tls",
                "application_name",
                "prepared_statements",
                "id"
            ]
        );
        assert_eq!(set.rows[0][14], Value::Text("0xff".into()));
        assert_eq!(set.rows[0][15], Value::Text("0x10".into()));
        let sockets = sockets(&[conn], false);
        assert_eq!(sockets.columns.len(), 28);
        assert_eq!(sockets.rows[0][4], Value::Text("cl_active".into()));
    }

    #[test]
    fn stats_tables_are_numeric_and_named_like_pgbouncer() {
        let view = StatsView {
            database: "app".into(),
            totals: Totals { xact_count: 10, query_count: 20, ..Totals::default() },
            averages: Averages { xact_count: 2, ..Averages::default() },
        };
        let set = stats(std::slice::from_ref(&view));
        assert_eq!(set.columns.len(), 23);
        assert!(set.columns[1..].iter().all(|(_, t)| *t == Numeric));
        assert_eq!(set.rows[0][set.column("total_xact_count").unwrap()], Value::Int(10));
        assert_eq!(set.rows[0][set.column("avg_xact_count").unwrap()], Value::Int(2));
        let averages = stats_averages(std::slice::from_ref(&view));
        assert_eq!(averages.rows[0][averages.column("xact_count").unwrap()], Value::Int(2));
        let all = totals(&view);
        assert_eq!(all.rows.len(), 22);
        assert_eq!(all.rows[1], vec![Value::from("total_xact_count"), Value::Int(10)]);
    }

    #[test]
    fn users_pad_overrides_like_pgbouncer() {
        let set = users(&[UserView { name: "u".into(), pool_size: Some(5), ..UserView::default() }]);
        assert_eq!(set.rows[0][1], Value::Text("        5".into()));
        assert_eq!(set.rows[0][2], Value::Text(String::new()));
    }

    #[test]
    fn peers_and_their_forwards() {
        let peer = PeerView {
            peer_id: 2,
            host: "/tmp/b".into(),
            port: 6432,
            pool_size: 4,
            waiting: 1,
            connecting: 2,
            active: 3,
        };
        let set = peers(std::slice::from_ref(&peer));
        assert_eq!(names(&set), ["peer_id", "host", "port", "pool_size"]);
        assert_eq!(set.rows[0], [2.into(), "/tmp/b".into(), 6432.into(), 4.into()]);
        let set = peer_pools(&[peer]);
        assert_eq!(
            names(&set),
            ["peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"]
        );
        assert_eq!(set.rows[0], [Value::from(2), 3.into(), 1.into(), 3.into(), 2.into()]);
    }

    #[test]
    fn tables_without_rows_still_describe_their_columns() {
        assert_eq!(empty("FDS").unwrap().columns.len(), 15);
        assert_eq!(names(&empty("DNS_HOSTS").unwrap()), ["hostname", "ttl", "addrs"]);
        assert!(empty("POOLS").is_none() && empty("PEERS").is_none());
        let p = fake_parameter("CLIENT_ENCODING").unwrap();
        assert_eq!(names(&p), ["client_encoding"]);
        assert_eq!(p.rows[0][0], Value::from("UTF-8"));
    }
}
