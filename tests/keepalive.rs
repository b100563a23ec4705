//! `tcp_keepalive`, `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt` and `tcp_user_timeout` on
//! the sockets pgcorral really has: the client sockets it accepted and its server connections.
//!
//! The options are read from the running daemon's own sockets: `pidfd_getfd` (Linux 5.6, as
//! root) duplicates each of its socket descriptors into the test, where `getsockopt` answers
//! for the very socket pgcorral set up. `ss -tno`, which is what an operator would look at,
//! must show the keepalive timer on the same connections.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use support::*;

const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-pass";

const TUNED: &str = "tcp_keepidle = 7\ntcp_keepintvl = 3\ntcp_keepcnt = 4\ntcp_user_timeout = 9000\n";

/// The options of one of pgcorral's TCP connections, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    keepalive: bool,
    idle: Duration,
    interval: Duration,
    probes: u32,
    user_timeout: Option<Duration>,
}

/// One connected TCP socket of the daemon.
#[derive(Debug, Clone)]
struct Seen {
    local: SocketAddr,
    peer: SocketAddr,
    options: Options,
}

/// Every connected TCP socket `pid` holds, read through duplicates of its descriptors.
fn tcp_sockets_of(pid: u32) -> Vec<Seen> {
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut seen = Vec::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return seen };
    for entry in entries.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Ok(target_fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if !is_socket {
            continue;
        }
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
        if dup < 0 {
            let error = std::io::Error::last_os_error();
            // EBADF: closed since the directory was listed.
            assert_eq!(error.raw_os_error(), Some(libc::EBADF), "pidfd_getfd({pid}, {target_fd}): {error}");
            continue;
        }
        let socket = unsafe { socket2::Socket::from_raw_fd(dup as i32) };
        let (Some(local), Some(peer)) = (
            socket.local_addr().ok().and_then(|a| a.as_socket()),
            socket.peer_addr().ok().and_then(|a| a.as_socket()),
        ) else {
            continue; // a listener or a Unix socket
        };
        let options = Options {
            keepalive: socket.keepalive().expect("SO_KEEPALIVE"),
            idle: socket.keepalive_time().expect("TCP_KEEPIDLE"),
            interval: socket.keepalive_interval().expect("TCP_KEEPINTVL"),
            probes: socket.keepalive_retries().expect("TCP_KEEPCNT"),
            user_timeout: socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
        };
        seen.push(Seen { local, peer, options });
    }
    seen
}

/// pgcorral's accepted client sockets and its server connections to `pg`.
fn client_and_server_sockets(pooler: &Pooler, pg: &Postgres) -> (Vec<Seen>, Vec<Seen>) {
    let all = tcp_sockets_of(pooler.pid());
    let clients = all.iter().filter(|s| s.local.port() == pooler.port).cloned().collect();
    let servers = all.iter().filter(|s| s.peer.port() == pg.port).cloned().collect();
    (clients, servers)
}

/// `ss -tno`'s timer column ("" for none) of every established connection, by (local, peer).
/// A connection on its way out (the harness's readiness probe, a console query's) is in
/// another state and has other timers, so it is left out.
fn ss_timers() -> HashMap<(String, String), String> {
    let out = Command::new("ss").args(["-tnoH"]).output().expect("run ss");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // State Recv-Q Send-Q Local Peer [timer:(...)]
            let fields: Vec<&str> = line.split_whitespace().collect();
            let timer = fields.iter().find(|f| f.starts_with("timer:")).copied().unwrap_or("");
            (fields.len() >= 5 && fields[0] == "ESTAB")
                .then(|| ((fields[3].to_string(), fields[4].to_string()), timer.to_string()))
        })
        .collect()
}

/// The ss timer of each established one among `sockets` once it is idle: just after a
/// message the timer is a retransmission's (`on`) until the peer acknowledges. Panics if ss
/// shows none of them.
fn idle_timers<'a>(sockets: impl Iterator<Item = &'a Seen>) -> Vec<(&'a Seen, String)> {
    let mut found = Vec::new();
    for socket in sockets {
        let key = (socket.local.to_string(), socket.peer.to_string());
        let mut timer = None;
        wait_until(Duration::from_secs(10), || {
            timer = ss_timers().get(&key).cloned();
            timer.as_deref().is_none_or(|t| t.is_empty() || t.starts_with("timer:(keepalive,"))
        });
        if let Some(timer) = timer {
            found.push((socket, timer));
        }
    }
    assert!(!found.is_empty(), "ss shows none of these connections established");
    found
}

/// `timer:(keepalive,6.969ms,0)` -> the time left, in ms (ss writes 6 s 969 ms as `6.969ms`,
/// 7 s as `7sec`, and minutes as `119min`).
fn keepalive_left(timer: &str) -> Option<Duration> {
    let left = timer.strip_prefix("timer:(keepalive,")?.split(',').next()?;
    let (minutes, rest) = match left.split_once("min") {
        Some((m, rest)) => (m.parse::<u64>().ok()?, rest),
        None => (0, left),
    };
    let ms = if let Some((secs, ms)) = rest.split_once('.') {
        secs.parse::<u64>().ok()? * 1000 + ms.trim_end_matches("ms").parse::<u64>().ok()?
    } else if let Some(secs) = rest.strip_suffix("sec") {
        secs.parse::<u64>().ok()? * 1000
    } else if let Some(ms) = rest.strip_suffix("ms") {
        ms.parse().ok()?
    } else {
        0
    };
    Some(Duration::from_millis(minutes * 60_000 + ms))
}

fn start(pg: &Postgres, db: &str, tcp: &str) -> Pooler {
    let general = format!("admin_users = {ADMIN}\nworkers = 1\n{tcp}");
    Pooler::start(
        &pool_ini(pg, db, "pool_size=2", "session", &general),
        &(app_userlist() + &Pooler::userlist_line(ADMIN, ADMIN_PASSWORD)),
    )
}

/// A client through the pooler holding a server (session mode keeps it for the session).
async fn client_with_server(pooler: &Pooler, db: &str) -> tokio_postgres::Client {
    let client = pooler.connect(APP_USER, APP_PASSWORD, db).await.expect("login through pgcorral");
    assert_eq!(first_value(&client, "SELECT 1").await.expect("query"), "1");
    client
}

async fn show_config(pooler: &Pooler) -> HashMap<String, String> {
    let console = pooler.connect(ADMIN, ADMIN_PASSWORD, "pgbouncer").await.expect("admin login");
    let mut values = HashMap::new();
    for message in console.simple_query("SHOW CONFIG").await.expect("SHOW CONFIG") {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            values.insert(row.get("key").unwrap().to_string(), row.get("value").unwrap_or("").to_string());
        }
    }
    values
}

fn tuned(idle: u64) -> Options {
    Options {
        keepalive: true,
        idle: Duration::from_secs(idle),
        interval: Duration::from_secs(3),
        probes: 4,
        user_timeout: Some(Duration::from_millis(9000)),
    }
}

#[tokio::test]
async fn configured_keepalive_and_user_timeout_are_on_client_and_server_sockets() {
    let pg = Postgres::shared();
    let db = pg.create_database("keepalive");
    let pooler = start(pg, &db, TUNED);
    let _client = client_with_server(&pooler, &db).await;

    let (clients, servers) = client_and_server_sockets(&pooler, pg);
    assert!(!clients.is_empty(), "no accepted client socket found in pgcorral");
    assert!(!servers.is_empty(), "no server connection found in pgcorral");
    for socket in clients.iter().chain(&servers) {
        assert_eq!(socket.options, tuned(7), "{} -> {}", socket.local, socket.peer);
    }

    // What an operator sees: a keepalive timer, counting down from at most tcp_keepidle.
    for sockets in [&clients, &servers] {
        for (socket, timer) in idle_timers(sockets.iter()) {
            let left = keepalive_left(&timer).unwrap_or_else(|| {
                panic!("{} -> {}: no keepalive timer: {timer:?}", socket.local, socket.peer)
            });
            assert!(left <= Duration::from_secs(7), "{timer}: the system's 2 hours, not tcp_keepidle = 7");
        }
    }

    let config = show_config(&pooler).await;
    let shown: Vec<&str> =
        ["tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout"]
            .iter()
            .map(|key| config[*key].as_str())
            .collect();
    assert_eq!(shown, ["1", "7", "3", "4", "9000"]);
}

#[tokio::test]
async fn keepalive_off_leaves_no_keepalive_timer() {
    let pg = Postgres::shared();
    let db = pg.create_database("keepalive_off");
    let pooler = start(pg, &db, "tcp_keepalive = 0\ntcp_keepidle = 7\n");
    let _client = client_with_server(&pooler, &db).await;

    let (clients, servers) = client_and_server_sockets(&pooler, pg);
    assert!(!clients.is_empty() && !servers.is_empty(), "clients {clients:?}, servers {servers:?}");
    for socket in clients.iter().chain(&servers) {
        assert!(!socket.options.keepalive, "SO_KEEPALIVE on {} -> {}", socket.local, socket.peer);
        assert_ne!(socket.options.idle, Duration::from_secs(7), "timings are not set when keepalive is off");
    }
    for sockets in [&clients, &servers] {
        for (socket, timer) in idle_timers(sockets.iter()) {
            assert!(!timer.contains("keepalive"), "{} -> {}: {timer}", socket.local, socket.peer);
        }
    }
    assert_eq!(show_config(&pooler).await["tcp_keepalive"], "0");
}

#[tokio::test]
async fn a_reload_applies_to_connections_made_after_it() {
    let pg = Postgres::shared();
    let db = pg.create_database("keepalive_reload");
    let pooler = start(pg, &db, TUNED);
    let _first = client_with_server(&pooler, &db).await;
    let console = pooler.connect(ADMIN, ADMIN_PASSWORD, "pgbouncer").await.expect("admin login");
    let (clients_before, servers_before) = client_and_server_sockets(&pooler, pg);
    let ports = |sockets: &[Seen]| -> BTreeSet<(u16, u16)> {
        sockets.iter().map(|s| (s.local.port(), s.peer.port())).collect()
    };
    let (old_clients, old_servers) = (ports(&clients_before), ports(&servers_before));

    let ini = pooler.dir.join("pgcorral.ini");
    let text = std::fs::read_to_string(&ini).unwrap();
    std::fs::write(&ini, text.replace("tcp_keepidle = 7", "tcp_keepidle = 11")).unwrap();
    console.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(show_config(&pooler).await["tcp_keepidle"], "11");

    let _second = client_with_server(&pooler, &db).await;
    let (clients, servers) = client_and_server_sockets(&pooler, pg);
    let mut new = 0;
    for (socket, old) in
        clients.iter().map(|s| (s, &old_clients)).chain(servers.iter().map(|s| (s, &old_servers)))
    {
        let idle = if old.contains(&(socket.local.port(), socket.peer.port())) {
            7
        } else {
            new += 1;
            11
        };
        assert_eq!(socket.options, tuned(idle), "{} -> {}", socket.local, socket.peer);
    }
    // At least the second client and its server.
    assert!(new >= 2, "{new} new sockets: {clients:?} {servers:?}");
}
