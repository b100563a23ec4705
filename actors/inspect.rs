//! Snapshots of the live system for the console's `SHOW` commands and for `/metrics`.
//!
//! Reads the census, the pools' counters and the configuration (locks held only to copy), and
//! fills the plain views that [`crate::admin::show`] turns into PgBouncer's tables. Nothing
//! here touches a connection: a snapshot costs the data path nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::actors::census::{ClientState, ServerState};
use crate::actors::control::{is_admin_database, ADMIN_DATABASES};
use crate::actors::registry::Shared;
use crate::actors::replication::Replication;
use crate::admin::resultset::ResultSet;
use crate::admin::show::{self, ConfigRow, ConnView, DatabaseView, PoolView, StatsView, UserView};
use crate::config::catalog;
use crate::metrics;
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;
use crate::stats::Totals;
use crate::version::CONSOLE_VERSION;

/// What a `SHOW` sends: a notice (message, detail), rows, or both.
#[derive(Debug, Default)]
pub struct Shown {
    pub notice: Option<(String, String)>,
    pub rows: Option<ResultSet>,
}

fn rows(set: ResultSet) -> Result<Shown, PgError> {
    Ok(Shown { notice: None, rows: Some(set) })
}

pub fn show(shared: &Shared, what: &str) -> Result<Shown, PgError> {
    match what {
        "HELP" => Ok(Shown { notice: Some(("Console usage".into(), show::HELP.into())), rows: None }),
        "VERSION" => rows(show::version(CONSOLE_VERSION)),
        "CONFIG" => rows(show::config(&config_rows(shared))),
        "DATABASES" => rows(show::databases(&databases(shared))),
        "POOLS" => rows(show::pools(&pools(shared))),
        "CLIENTS" => rows(show::connections(&clients(shared))),
        "SERVERS" => rows(show::connections(&servers(shared))),
        "SOCKETS" | "ACTIVE_SOCKETS" => {
            let mut all = clients(shared);
            all.extend(servers(shared));
            rows(show::sockets(&all, what == "ACTIVE_SOCKETS"))
        }
        "USERS" => rows(show::users(&users(shared))),
        "STATS" => rows(show::stats(&stats(shared))),
        "STATS_TOTALS" => rows(show::stats_totals(&stats(shared))),
        "STATS_AVERAGES" => rows(show::stats_averages(&stats(shared))),
        "TOTALS" => rows(show::totals(&overall(shared))),
        "LISTS" => rows(show::lists(&lists(shared))),
        "PEERS" => rows(show::peers(&shared.peers.views())),
        "PEER_POOLS" => rows(show::peer_pools(&shared.peers.views())),
        "MEM" => rows(show::mem(&mem(shared))),
        "STATE" => {
            let (active, paused, suspended) = shared.holds.lock().state();
            rows(show::state(active, paused, suspended))
        }
        other => match show::empty(other).or_else(|| show::fake_parameter(other)) {
            Some(set) => rows(set),
            None => Err(PgError::error(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid command 'SHOW {other}', use SHOW HELP;"),
            )),
        },
    }
}

fn config_rows(shared: &Shared) -> Vec<ConfigRow> {
    let config = shared.config();
    catalog::KEYS
        .iter()
        .map(|(key, default, changeable)| {
            let value = match *key {
                "conffile" => Some(config.path.display().to_string()),
                key => config.shown(key).or_else(|| default.map(str::to_string)),
            };
            ConfigRow { key, value, default: default.map(str::to_string), changeable: *changeable }
        })
        .collect()
}

/// Counts of one pool's clients and servers by state, from the census.
#[derive(Default)]
struct Tally {
    view: PoolView,
}

pub fn pools(shared: &Shared) -> Vec<PoolView> {
    let census = &shared.census;
    let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for pool in shared.all_pools() {
        let settings = pool.settings();
        let tally = tallies.entry((pool.key.database.clone(), pool.key.user.clone())).or_default();
        tally.view.database = pool.key.database.clone();
        tally.view.user = pool.key.user.clone();
        tally.view.pool_mode = settings.pool_mode.as_str().into();
    }
    // The console's own pool is listed like PgBouncer's, even with nobody in it.
    let admin = (ADMIN_DATABASES[0].to_string(), ADMIN_DATABASES[0].to_string());
    let admin_tally = tallies.entry(admin.clone()).or_default();
    admin_tally.view.database = admin.0.clone();
    admin_tally.view.user = admin.1.clone();
    admin_tally.view.pool_mode = "statement".into();
    for client in census.clients() {
        let Some(login) = client.login() else { continue };
        let key = match &login.pool {
            Some(pool) => (pool.key.database.clone(), pool.key.user.clone()),
            None => admin.clone(),
        };
        let Some(tally) = tallies.get_mut(&key) else { continue };
        // A cancel on its way is a request forwarded over a connection of its own to
        // PostgreSQL: PgBouncer's active cancel request and its cancelling server.
        let cancels = client.cancels() as usize;
        tally.view.cl_active_cancel_req += cancels;
        tally.view.sv_active_cancel += cancels;
        match client.state() {
            ClientState::Waiting => {
                tally.view.cl_waiting += 1;
                let waited = census.clock.since(client.waiting_since());
                tally.view.maxwait = tally.view.maxwait.max(waited);
            }
            _ => tally.view.cl_active += 1,
        }
    }
    for server in census.servers() {
        let key = (server.pool.key.database.clone(), server.pool.key.user.clone());
        let Some(tally) = tallies.get_mut(&key) else { continue };
        match server_state(&server) {
            "active" => tally.view.sv_active += 1,
            "idle" => tally.view.sv_idle += 1,
            "used" => tally.view.sv_used += 1,
            "tested" => tally.view.sv_tested += 1,
            _ => tally.view.sv_login += 1,
        }
    }
    tallies.into_values().map(|t| t.view).collect()
}

/// A server's state as PgBouncer names it: an idle one that has not been used for
/// `server_check_delay` is "used" (it is checked before its next lease).
fn server_state(server: &crate::actors::census::ServerEntry) -> &'static str {
    match server.state() {
        ServerState::Login => "new",
        ServerState::Active => "active",
        ServerState::Tested => "tested",
        ServerState::Idle => {
            let settings = server.pool.settings();
            let idle_for = server.pool.census.clock.since(server.changed());
            if settings.server_check_query.is_some() && idle_for >= settings.server_check_delay {
                "used"
            } else {
                "idle"
            }
        }
    }
}

pub fn clients(shared: &Shared) -> Vec<ConnView> {
    let census = &shared.census;
    census
        .clients()
        .into_iter()
        .filter_map(|client| {
            let login = client.login()?;
            let server = client.server();
            let (state, wait) = match client.state() {
                ClientState::Waiting => ("waiting", census.clock.since(client.waiting_since())),
                _ if server != 0 => ("active", census.clock.since(client.request())),
                _ if login.pool.is_none() => ("active", Duration::ZERO),
                // It holds a server of its own for as long as it stays.
                _ if login.replication != Replication::None => ("active", Duration::ZERO),
                _ => ("idle", Duration::ZERO),
            };
            Some(ConnView {
                kind: "C",
                user: login.user.clone(),
                database: login.database.clone(),
                state,
                addr: client.remote.addr.clone(),
                port: client.remote.port,
                local_addr: client.local.addr.clone(),
                local_port: client.local.port,
                connect_time: census.clock.wall(client.connected),
                request_time: census.clock.wall(client.request()).or(census.clock.wall(client.connected)),
                wait,
                close_needed: false,
                id: client.id,
                link: (server != 0).then_some(server),
                remote_pid: client.remote_pid,
                tls: client.tls().to_string(),
                prepared: client.prepared(),
                application_name: client.application_name(),
                buffered: 0,
                replication: login.replication.shown(),
            })
        })
        .collect()
}

pub fn servers(shared: &Shared) -> Vec<ConnView> {
    let census = &shared.census;
    census
        .servers()
        .into_iter()
        .map(|server| {
            let settings = server.pool.settings();
            let (remote, local) = server.endpoints().cloned().unwrap_or_else(|| {
                // Still logging in: which host it reaches is not known yet; the first is named.
                let first = &settings.servers[0];
                let remote = crate::net::Endpoint { addr: first.to_string(), port: first.port() };
                (remote, Default::default())
            });
            let client = server.client();
            ConnView {
                kind: "S",
                user: server.pool.key.user.clone(),
                database: server.pool.key.database.clone(),
                state: server_state(&server),
                addr: remote.addr,
                port: remote.port,
                local_addr: local.addr,
                local_port: local.port,
                connect_time: census.clock.wall(server.connected),
                request_time: census.clock.wall(server.changed()).or(census.clock.wall(server.connected)),
                wait: Duration::ZERO,
                close_needed: server.generation != server.pool.connection_generation(),
                id: server.id,
                link: (client != 0).then_some(client),
                remote_pid: server.remote_pid(),
                tls: server.tls().to_string(),
                prepared: server.prepared(),
                application_name: server.application_name(),
                buffered: 0,
                replication: "none",
            }
        })
        .collect()
}

/// Server connections per database and per user, from the census.
fn server_counts(shared: &Shared) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let (mut per_db, mut per_user) = (HashMap::new(), HashMap::new());
    for server in shared.census.servers() {
        *per_db.entry(server.pool.key.database.clone()).or_insert(0) += 1;
        *per_user.entry(server.pool.key.user.clone()).or_insert(0) += 1;
    }
    (per_db, per_user)
}

pub fn databases(shared: &Shared) -> Vec<DatabaseView> {
    let config = shared.config();
    let general = &config.general;
    let holds = shared.holds.lock();
    let (servers_per_db, _) = server_counts(shared);
    let mut names: BTreeSet<String> =
        config.databases.iter().map(|d| d.name.clone()).filter(|n| n != "*").collect();
    names.extend(shared.all_pools().into_iter().map(|p| p.key.database.clone()));
    let mut views: Vec<DatabaseView> = names
        .into_iter()
        .filter_map(|name| {
            let entry = config.database(&name)?;
            let host = entry.host.clone();
            Some(DatabaseView {
                host,
                port: entry.port,
                database: entry.dbname.clone().unwrap_or_else(|| name.clone()),
                force_user: entry.user.clone(),
                pool_size: entry.pool_size.unwrap_or(general.default_pool_size),
                min_pool_size: entry.min_pool_size.unwrap_or(general.min_pool_size),
                reserve_pool_size: entry.reserve_pool_size.unwrap_or(general.reserve_pool_size),
                server_lifetime: entry.server_lifetime.unwrap_or(general.server_lifetime),
                pool_mode: entry.pool_mode.map(|m| m.as_str().to_string()),
                max_connections: entry.max_db_connections.unwrap_or(general.max_db_connections),
                current_connections: servers_per_db.get(&name).copied().unwrap_or(0),
                max_client_connections: entry
                    .max_db_client_connections
                    .unwrap_or(general.max_db_client_connections),
                current_client_connections: shared.clients_of_database(&name),
                paused: holds.paused(&name),
                disabled: holds.disabled(&name),
                name,
            })
        })
        .collect();
    views.push(DatabaseView {
        name: ADMIN_DATABASES[0].into(),
        host: None,
        port: general.listen_port,
        database: ADMIN_DATABASES[0].into(),
        force_user: Some(ADMIN_DATABASES[0].into()),
        pool_size: 2,
        pool_mode: Some("statement".into()),
        current_client_connections: shared.clients_of_database(ADMIN_DATABASES[0]),
        ..DatabaseView::default()
    });
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

pub fn users(shared: &Shared) -> Vec<UserView> {
    let config = shared.config();
    let general = &config.general;
    let (_, servers_per_user) = server_counts(shared);
    let mut names: BTreeSet<String> = config.users.iter().map(|u| u.name.clone()).collect();
    names.extend(config.userlist.iter().map(|(u, _)| u.clone()));
    names.extend(shared.all_pools().into_iter().map(|p| p.key.user.clone()));
    names.insert(ADMIN_DATABASES[0].into());
    names
        .into_iter()
        .map(|name| {
            let entry = config.user(&name);
            UserView {
                pool_size: entry.and_then(|u| u.pool_size),
                reserve_pool_size: entry.and_then(|u| u.reserve_pool_size),
                pool_mode: entry.and_then(|u| u.pool_mode).map(|m| m.as_str().to_string()),
                max_user_connections: entry
                    .and_then(|u| u.max_user_connections)
                    .unwrap_or(general.max_user_connections),
                current_connections: servers_per_user.get(&name).copied().unwrap_or(0),
                max_user_client_connections: entry
                    .and_then(|u| u.max_user_client_connections)
                    .unwrap_or(general.max_user_client_connections),
                current_client_connections: shared.clients_of_user(&name),
                name,
            }
        })
        .collect()
}

/// Totals per database (its pools summed), the console's own included.
pub fn totals_per_database(shared: &Shared) -> BTreeMap<String, Totals> {
    let mut per_db: BTreeMap<String, Totals> = BTreeMap::new();
    for pool in shared.all_pools() {
        per_db.entry(pool.key.database.clone()).or_default().add(&pool.stats.totals());
    }
    per_db.insert(ADMIN_DATABASES[0].into(), shared.console_stats.totals());
    per_db
}

pub fn stats(shared: &Shared) -> Vec<StatsView> {
    let window = shared.stats_window.lock();
    totals_per_database(shared)
        .into_iter()
        .map(|(database, totals)| StatsView {
            averages: window.averages(&database, &totals),
            database,
            totals,
        })
        .collect()
}

fn overall(shared: &Shared) -> StatsView {
    let mut all = Totals::default();
    for totals in totals_per_database(shared).values() {
        all.add(totals);
    }
    let averages = shared.stats_window.lock().overall(&all);
    StatsView { database: String::new(), totals: all, averages }
}

fn lists(shared: &Shared) -> Vec<(&'static str, i64)> {
    let clients = shared.census.clients();
    let login = clients.iter().filter(|c| c.state() == ClientState::Login).count();
    let servers = shared.census.servers().len();
    let peers = shared.peers.views().len();
    [
        ("databases", databases(shared).len()),
        ("users", users(shared).len()),
        ("peers", peers),
        ("pools", shared.all_pools().len() + 1),
        ("peer_pools", peers),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", login),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    .map(|(name, n)| (name, n as i64))
    .to_vec()
}

/// pgcorral allocates per object rather than from slab caches: each row is one kind of
/// object, its size and how many are alive.
fn mem(shared: &Shared) -> Vec<(&'static str, usize, usize, usize)> {
    use crate::actors::census::{ClientEntry, ServerEntry};
    use crate::actors::pool::PoolShared;
    use crate::config::DatabaseEntry;
    let config = shared.config();
    vec![
        ("db_cache", std::mem::size_of::<DatabaseEntry>(), config.databases.len(), 0),
        ("pool_cache", std::mem::size_of::<PoolShared>(), shared.all_pools().len(), 0),
        ("server_cache", std::mem::size_of::<ServerEntry>(), shared.census.servers().len(), 0),
        ("client_cache", std::mem::size_of::<ClientEntry>(), shared.census.clients().len(), 0),
    ]
}

/// Everything `/metrics` shows, from the same views as the console.
pub fn metrics_snapshot(shared: &Shared) -> metrics::Snapshot {
    let config = shared.config();
    metrics::Snapshot {
        version: CONSOLE_VERSION.to_string(),
        pools: pools(shared),
        pool_totals: shared
            .all_pools()
            .into_iter()
            .map(|p| (p.key.database.clone(), p.key.user.clone(), p.stats.totals()))
            .collect(),
        databases: databases(shared),
        database_totals: totals_per_database(shared).into_iter().collect(),
        lists: lists(shared),
        max_client_conn: config.general.max_client_conn,
        max_user_connections: config.general.max_user_connections,
    }
}

/// Whether a client logged in to `database` reaches the console.
pub fn is_console(database: &str) -> bool {
    is_admin_database(database)
}

/// What `GET /health` answers: whether pgcorral can serve, and each database's state.
#[derive(Debug, PartialEq, Eq)]
pub struct Health {
    /// 200 when true; 503 while paused, shutting down, or with a database none of whose
    /// hosts can be reached.
    pub serving: bool,
    /// `ok`, `paused`, `suspended`, `shutting down` or `unreachable`.
    pub status: &'static str,
    /// Per `[databases]` entry: `reachable` (its last server login worked), `untried` (no
    /// server opened yet), `unreachable` (every host failed at the last attempt, within
    /// `server_login_retry`), `paused` or `disabled`.
    pub databases: BTreeMap<String, &'static str>,
}

impl Health {
    pub fn to_json(&self) -> String {
        let databases: Vec<String> =
            self.databases.iter().map(|(name, state)| format!("{}:\"{state}\"", json_string(name))).collect();
        format!("{{\"status\":\"{}\",\"databases\":{{{}}}}}\n", self.status, databases.join(","))
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn health(shared: &Shared, now: std::time::Instant) -> Health {
    let config = shared.config();
    let pools = shared.all_pools();
    let holds = shared.holds.lock();
    let mut databases = BTreeMap::new();
    for entry in config.databases.iter().filter(|db| db.name != "*") {
        let of_db: Vec<_> = pools.iter().filter(|p| p.key.database == entry.name).collect();
        let state = if holds.disabled(&entry.name) {
            "disabled"
        } else if holds.of(&entry.name) != crate::actors::pool::Hold::None {
            "paused"
        } else if !of_db.is_empty() && of_db.iter().all(|p| p.login_blocked(now).is_some()) {
            "unreachable"
        } else if of_db.iter().any(|p| p.ever_logged_in()) {
            "reachable"
        } else {
            "untried"
        };
        databases.insert(entry.name.clone(), state);
    }
    let (_, paused, suspended) = holds.state();
    let status = if shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
        "shutting down"
    } else if paused {
        "paused"
    } else if suspended {
        "suspended"
    } else if databases.values().any(|s| matches!(*s, "unreachable" | "paused")) {
        "unreachable"
    } else {
        "ok"
    };
    Health { serving: status == "ok", status, databases }
}
