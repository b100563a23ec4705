//! `tcp_keepalive`, `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt` and `tcp_user_timeout` on
//! the sockets pgcorral really has: the client sockets it accepted and its server connections.
//!
//! The options are read from the running daemon's own sockets: `pidfd_getfd` (Linux 5.6, as
//! root) duplicates each of its socket descriptors into the test, where `getsockopt` answers
//! for the very socket pgcorral set up. `ss -tno`, which is what an operator would look at,
//! must show the keepalive timer on the same connections.
//!
//! Last, the point of it all: a client whose network vanishes without a FIN or RST is ended.
//! pgcorral runs in a network namespace of the test's own, the client in another, joined by a
//! veth pair the test then takes down.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command};
use std::str::FromStr;
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

/// Runs `ip` with the words of `args`, panicking with its output if it fails.
fn ip(args: &str) {
    let out = Command::new("ip").args(args.split_whitespace()).output().expect("run ip");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace made by this test, deleted on drop. Names carry the test's pid, so
/// that ones left by a killed run can be recognised and removed.
struct Netns(String);

const NETNS_PREFIX: &str = "pgcorral-ka-";

impl Netns {
    fn new(role: &str) -> Netns {
        let name = format!("{NETNS_PREFIX}{role}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&format!("netns add {name}"));
        ip(&format!("-n {name} link set lo up"));
        Netns(name)
    }

    /// Namespaces of earlier runs whose process is gone.
    fn sweep_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(pid) = name.strip_prefix(NETNS_PREFIX).and_then(|rest| rest.rsplit('-').next()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A pgcorral process run inside a namespace; killed on drop.
struct Daemon {
    child: Child,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pgcorral in a namespace ---\n{}", self.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connects to `addr` from inside the namespace `netns`: a socket belongs to the namespace of
/// the thread that made it, so a thread of its own joins the namespace for the connect.
fn connect_in(netns: &Netns, addr: SocketAddr) -> std::net::TcpStream {
    let path = format!("/run/netns/{}", netns.0);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let joined = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns {path}: {}", std::io::Error::last_os_error());
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect across the veth")
    })
    .join()
    .expect("connecting thread")
}

/// The client addresses `SHOW CLIENTS` lists, over pgcorral's Unix socket in `dir`.
async fn client_addrs(dir: &std::path::Path, port: u16) -> Vec<String> {
    let url =
        format!("host={} port={port} user={ADMIN} password={ADMIN_PASSWORD} dbname=pgbouncer", dir.display());
    let console = connect_plain(&url).await.expect("console over pgcorral's Unix socket");
    let mut addrs = Vec::new();
    for message in console.simple_query("SHOW CLIENTS").await.expect("SHOW CLIENTS") {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            addrs.push(row.get("addr").unwrap_or("").to_string());
        }
    }
    addrs
}

#[tokio::test]
async fn a_client_whose_network_vanished_is_ended_by_keepalive() {
    Netns::sweep_stale();
    let pg = Postgres::shared();
    let db = pg.create_database("keepalive_gone");
    let (pooler_ns, client_ns) = (Netns::new("p"), Netns::new("c"));
    // Interface names are limited to 15 bytes.
    let id = std::process::id() % 100_000;
    let (pooler_if, client_if) = (format!("kap{id}"), format!("kac{id}"));
    let (p, c) = (&pooler_ns.0, &client_ns.0);
    ip(&format!("-n {p} link add {pooler_if} type veth peer name {client_if} netns {c}"));
    ip(&format!("-n {p} addr add 10.200.0.1/24 dev {pooler_if}"));
    ip(&format!("-n {c} addr add 10.200.0.2/24 dev {client_if}"));
    ip(&format!("-n {p} link set {pooler_if} up"));
    ip(&format!("-n {c} link set {client_if} up"));

    // PostgreSQL is reached over its Unix socket, which no network namespace hides.
    let dir = std::env::temp_dir().join(format!("pgcorral-netns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = 6432;
    std::fs::write(dir.join("userlist.txt"), app_userlist() + &Pooler::userlist_line(ADMIN, ADMIN_PASSWORD))
        .unwrap();
    let ini = format!(
        "[databases]\n{db} = host={socket} port={pg_port} dbname={db}\n\
         [pgbouncer]\nlisten_addr = 10.200.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
         auth_type = md5\nauth_file = {d}/userlist.txt\nadmin_users = {ADMIN}\npool_mode = transaction\n\
         workers = 1\ntcp_keepidle = 1\ntcp_keepintvl = 1\ntcp_keepcnt = 3\ntcp_user_timeout = 5000\n",
        socket = pg.socket_dir.display(),
        pg_port = pg.port,
        d = dir.display(),
    );
    std::fs::write(dir.join("pgcorral.ini"), ini).unwrap();
    let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pooler_ns.0, env!("CARGO_BIN_EXE_pgcorral"), "-v"])
        .arg(dir.join("pgcorral.ini"))
        .stdout(stderr.try_clone().unwrap())
        .stderr(stderr);
    let daemon =
        Daemon { child: spawn_supervised(cmd).expect("start pgcorral in its namespace"), dir: dir.clone() };
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    assert!(
        wait_until(Duration::from_secs(10), || socket.exists()),
        "pgcorral did not start:\n{}",
        daemon.log()
    );

    let stream = connect_in(&client_ns, SocketAddr::from(([10, 200, 0, 1], port)));
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let config =
        tokio_postgres::Config::from_str(&format!("user={APP_USER} password={APP_PASSWORD} dbname={db}"))
            .unwrap();
    let (client, connection) =
        config.connect_raw(stream, tokio_postgres::NoTls).await.expect("login across the veth");
    let connection = tokio::spawn(connection);
    assert_eq!(first_value(&client, "SELECT 1").await.unwrap(), "1");
    assert!(client_addrs(&dir, port).await.contains(&"10.200.0.2".to_string()), "the client is listed");

    // The client's end of the link goes away: nothing is sent to pgcorral, not even a RST.
    ip(&format!("-n {c} link set {client_if} down"));
    let mut listed = Vec::new();
    let mut gone = false;
    for _ in 0..60 {
        listed = client_addrs(&dir, port).await;
        if !listed.contains(&"10.200.0.2".to_string()) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The system's keepalive would wait over two hours; a minute is only a liveness bound.
    assert!(gone, "the vanished client is still listed after a minute: {listed:?}\n{}", daemon.log());
    connection.abort();
}
