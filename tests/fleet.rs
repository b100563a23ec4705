//! A small fleet, as a user would run one: three pgcorral nodes, each in a network namespace
//! of its own with its own address, HAProxy in TCP mode in front of them, PostgreSQL behind.
//!
//! The test builds it on this one machine (as root, as CI runs): each node gets a namespace
//! (`ip netns`) joined to the root namespace by a veth pair, `10.231.<b+n>.1` on the root side
//! and `10.231.<b+n>.2` inside, where the node listens on port 6432 and serves `/health` on
//! 9127. HAProxy listens on 127.0.0.1, balances round robin across the three node addresses,
//! checks each with `GET /health` every 200 ms, and retries a refused connection on another
//! node (`option redispatch 1`). Nothing routes between namespaces: a node reaches PostgreSQL
//! (which listens on 127.0.0.1 of the root namespace) and its peers through their Unix sockets,
//! which live on the shared filesystem. So every packet stays on 127.0.0.0/8 or on the test's
//! own veth pairs.
//!
//! What it shows:
//! - pgbench through HAProxy spreads its clients across the nodes: HAProxy gives each node 4 or
//!   5 of the 13 connections, each node's `SHOW STATS` (asked over its Unix socket) shows it
//!   served a real share of the transactions, and none fails;
//! - every cancel is honoured though HAProxy hands each cancel request to a node that does not
//!   hold the query (the cancels go out in an order shifted from the logins', so round robin
//!   lands them on the wrong node): the node forwards it to the peer that gave the key out
//!   (`peer_id`, `[peers]`), and every query ends with 57014 in under 2 s;
//! - with a node killed (SIGKILL) under `pgbench -C`, HAProxy takes it out within its health
//!   checks and sends the connections the dead node refused on to the others, the surviving
//!   nodes go on serving and the run goes on every second. pgbench gives up a client whose
//!   connection breaks (it does not reconnect it), so the clients that were on the killed node
//!   at that instant are lost, and only they: none is lost once HAProxy saw the node down;
//! - a rolling restart, one node at a time, under `pgbench -C`, fails no transaction: HAProxy
//!   drains the node (`set server ... state drain` on its admin socket), the node gets SIGTERM
//!   (stop accepting, serve the connected clients until they leave), starts again and HAProxy
//!   is told it is ready. Without the drain step, SIGTERM alone now and then costs one client
//!   connection: one HAProxy opened just before the node closed its listening socket, still in
//!   the kernel's accept queue, is reset;
//! - a rolling upgrade without any drain, under pgbench's persistent connections: each node in
//!   turn is replaced by `pgcorral -R` (an online restart: the new process takes over the
//!   listening sockets, accept queues included, and the clients as they go idle), and no
//!   transaction fails and no client is lost.
//!
//! Everything the test starts is killed when its handle is dropped, and the namespaces (and
//! with them the veth pairs) are deleted, on failure too; their names carry the test's pid, and
//! a run sweeps away what a killed run of an earlier pid left behind. The tests take a lock so
//! that they run one at a time: they measure load spread and timings on a 2-core machine.

mod support;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use support::wire::{read_msg, send_cancel, KeyedSession};
use support::*;

const NODES: usize = 3;
/// Inside its own namespace every node may use the usual ports.
const NODE_PORT: u16 = 6432;
const HEALTH_PORT: u16 = 9127;
/// Namespaces, veths and directories of this test carry this prefix and the test's pid.
const NS_PREFIX: &str = "pgcfleet";
const VETH_PREFIX: &str = "pgcf";

/// One test at a time: they measure spread and timings on a small machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `ip` with `args`; Err carries what it said.
fn ip(args: &[&str]) -> Result<String, String> {
    let out =
        Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn ip_ok(args: &[&str]) {
    ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("{l}\n")).collect()
}

fn pid_alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes the namespaces and veths that runs of this test left behind when they were killed
/// before their Drop ran (their pid is gone).
fn sweep_stale_namespaces() {
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if let (Some(NS_PREFIX), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) {
            if pid.parse::<u32>().is_ok() && !pid_alive(pid) {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        // "12: pgcf1234n1@if11: <...>"
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else { continue };
        let Some(rest) = name.strip_prefix(VETH_PREFIX) else { continue };
        if let Some((pid, _)) = rest.split_once('n') {
            if pid.parse::<u32>().is_ok() && !pid_alive(pid) {
                let _ = ip(&["link", "delete", name]);
            }
        }
    }
}

/// A network namespace with a veth pair to the root namespace; deleted on drop (the veth pair
/// goes with it, and is deleted by name as well in case the namespace end never moved in).
struct Netns {
    name: String,
    veth: String,
    /// The address inside the namespace, where the node listens.
    addr: String,
}

impl Netns {
    fn create(n: usize, third_octet: u8) -> Netns {
        let pid = std::process::id();
        let name = format!("{NS_PREFIX}-{pid}-{n}");
        let veth = format!("{VETH_PREFIX}{pid}n{n}");
        let inner = format!("{VETH_PREFIX}{pid}i{n}");
        let ns = Netns { name, veth, addr: format!("10.231.{third_octet}.2") };
        ip_ok(&["netns", "add", &ns.name]);
        ip_ok(&["link", "add", &ns.veth, "type", "veth", "peer", "name", &inner, "netns", &ns.name]);
        ip_ok(&["addr", "add", &format!("10.231.{third_octet}.1/24"), "dev", &ns.veth]);
        ip_ok(&["link", "set", &ns.veth, "up"]);
        ip_ok(&["-n", &ns.name, "addr", "add", &format!("{}/24", ns.addr), "dev", &inner]);
        ip_ok(&["-n", &ns.name, "link", "set", &inner, "up"]);
        ip_ok(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
        let _ = ip(&["link", "delete", &self.veth]);
    }
}

/// Third octets for `NODES` subnets of 10.231.0.0/16 that no interface of this machine uses,
/// starting from one the pid picks, so parallel runs do not collide.
fn free_subnets() -> Vec<u8> {
    let used = ip(&["-4", "-o", "addr", "show"]).unwrap_or_default();
    let start = (std::process::id() % 80) as usize * 3;
    for step in 0..80 {
        let base = (start + step * 3) % 240 + 1;
        let octets: Vec<u8> = (0..NODES).map(|n| (base + n) as u8).collect();
        if octets.iter().all(|o| !used.contains(&format!("10.231.{o}."))) {
            return octets;
        }
    }
    panic!("no free subnets in 10.231.0.0/16:\n{used}");
}

/// A pgcorral process inside a namespace; killed on drop.
struct Node {
    /// Its `peer_id`, 1-based.
    id: usize,
    netns: String,
    addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn ini(&self, pg: &Postgres, db: &str, peer_dirs: &[PathBuf]) -> String {
        let d = self.dir.display();
        let peers: String = peer_dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| format!("{} = host={} port={NODE_PORT}\n", i + 1, dir.display()))
            .collect();
        format!(
            "[databases]\n{db} = host={socket} port={pg_port} dbname={db}\n\
             [pgbouncer]\nlisten_addr = {addr}\nlisten_port = {NODE_PORT}\nunix_socket_dir = {d}\n\
             auth_type = plain\nauth_file = {d}/userlist.txt\nlogfile = {d}/pgcorral.log\n\
             pidfile = {d}/pgcorral.pid\npool_mode = transaction\ndefault_pool_size = 10\n\
             max_client_conn = 1000\nmetrics_addr = {addr}:{HEALTH_PORT}\npeer_id = {id}\n\
             [peers]\n{peers}",
            socket = pg.socket_dir.display(),
            pg_port = pg.port,
            addr = self.addr,
            id = self.id,
        )
    }

    /// Starts the process in its namespace and waits until it answers on its Unix socket and
    /// on its address.
    fn start(&mut self) {
        assert!(self.child.is_none(), "node {} is running", self.id);
        let out = OpenOptions::new().create(true).append(true).open(self.dir.join("stderr.log")).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(pgcorral_binary())
            .arg("-v")
            .arg(self.dir.join("pgcorral.ini"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // `ip netns exec` execs the binary: the parent-death signal stays on pgcorral itself.
        self.child = Some(spawn_supervised(cmd).expect("spawn pgcorral"));
        let socket = self.dir.join(format!(".s.PGSQL.{NODE_PORT}"));
        let tcp: SocketAddr = format!("{}:{NODE_PORT}", self.addr).parse().unwrap();
        let up = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!("node {} exited with {status}:\n{}", self.id, self.log());
            }
            UnixStream::connect(&socket).is_ok()
                && TcpStream::connect_timeout(&tcp, Duration::from_millis(200)).is_ok()
        });
        assert!(up, "node {} did not listen within 10 s:\n{}", self.id, self.log());
    }

    /// `pgcorral -R` in the node's namespace: a new process takes over this one's sockets and
    /// clients; returns once it holds them and the old process has exited.
    fn reboot(&mut self) {
        let marker = "took over the listening sockets";
        let before = self.log_text().matches(marker).count();
        let out = OpenOptions::new().append(true).open(self.dir.join("stderr.log")).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(pgcorral_binary())
            .arg("-v")
            .arg("-R")
            .arg(self.dir.join("pgcorral.ini"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut next = spawn_supervised(cmd).expect("spawn pgcorral -R");
        let took_over = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(status)) = next.try_wait() {
                panic!("node {}: pgcorral -R exited with {status}:\n{}", self.id, self.log());
            }
            self.log_text().matches(marker).count() > before
        });
        assert!(took_over, "node {}: -R did not take over within 10 s\n{}", self.id, self.log());
        let exited = self.wait_exit(Duration::from_secs(10));
        assert!(
            exited,
            "node {}: the old process did not exit once its clients moved\n{}",
            self.id,
            self.log()
        );
        self.child = Some(next);
    }

    /// The whole logfile (each line also goes to stderr.log).
    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgcorral.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as libc::pid_t, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit; returns whether it did.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let child = self.child.as_mut().expect("running");
        let exited = wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_))));
        if exited {
            self.child = None;
        }
        exited
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its stderr and logfile.
    fn log(&self) -> String {
        let read = |name: &str| tail(&std::fs::read_to_string(self.dir.join(name)).unwrap_or_default(), 60);
        format!(
            "--- node {} stderr.log ---\n{}--- node {} pgcorral.log ---\n{}",
            self.id,
            read("stderr.log"),
            self.id,
            read("pgcorral.log")
        )
    }

    /// Rows of a console `SHOW`, asked over the node's Unix socket as `pgbouncer` (the OS user
    /// running pgcorral may log in so without a password).
    fn show(&self, command: &str) -> Vec<HashMap<String, String>> {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-F", "|", "-P", "footer=off", "-U", "pgbouncer", "-d", "pgbouncer", "-h"])
            .arg(&self.dir)
            .args(["-p", &NODE_PORT.to_string(), "-c", command])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "{command} on node {}: {}",
            self.id,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").split('|').collect();
        lines
            .map(|l| header.iter().zip(l.split('|')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
            .collect()
    }

    /// Transactions this process has served for `db` (`SHOW STATS`' total_xact_count).
    fn xacts(&self, db: &str) -> i64 {
        self.show("SHOW STATS")
            .iter()
            .find(|r| r["database"] == db)
            .map_or(0, |r| r["total_xact_count"].parse().expect("a number"))
    }

    /// How many cancel requests this node forwarded to a peer, from its log.
    fn forwards(&self) -> usize {
        std::fs::read_to_string(self.dir.join("pgcorral.log"))
            .unwrap_or_default()
            .matches("forwarding a cancel request to peer")
            .count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// HAProxy in the root namespace on 127.0.0.1, in TCP mode, in front of the nodes; killed on
/// drop. Its admin socket answers `show stat`.
struct Haproxy {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Haproxy {
    fn start(dir: &Path, nodes: &[Node]) -> Haproxy {
        require_program("haproxy", "apt-get install haproxy");
        let port = free_port();
        let servers: String =
            nodes.iter().map(|n| format!("    server node{} {}:{NODE_PORT}\n", n.id, n.addr)).collect();
        let config = format!(
            "global\n    maxconn 4096\n    stats socket {sock} mode 600 level admin\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 60s\n\
             timeout server 60s\n    timeout check 1s\n    retries 3\n    option redispatch 1\n\
             frontend postgres\n    bind 127.0.0.1:{port}\n    default_backend poolers\n\
             backend poolers\n    balance roundrobin\n    option httpchk GET /health\n\
             http-check expect status 200\n\
             default-server check port {HEALTH_PORT} inter 200ms fall 2 rise 1\n{servers}",
            sock = dir.join("haproxy.sock").display(),
        );
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).unwrap();
        let log = File::create(dir.join("haproxy.log")).unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.arg("-f")
            .arg(&cfg)
            .arg("-db")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = spawn_supervised(cmd).expect("spawn haproxy");
        let mut haproxy = Haproxy { port, dir: dir.to_path_buf(), child };
        let ready = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!("haproxy exited with {status}:\n{}", haproxy.log());
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok() && UnixStream::connect(haproxy.socket()).is_ok()
        });
        assert!(ready, "haproxy did not start:\n{}", haproxy.log());
        haproxy
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("haproxy.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// One command on the admin socket, and its answer.
    fn command(&self, command: &str) -> String {
        let mut stream = UnixStream::connect(self.socket()).expect("haproxy admin socket");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    /// `show stat` for the node servers: name -> column -> value.
    fn servers(&self) -> HashMap<String, HashMap<String, String>> {
        let csv = self.command("show stat");
        let mut lines = csv.lines();
        let header: Vec<&str> =
            lines.next().unwrap_or("").trim_start_matches("# ").split(',').collect::<Vec<_>>();
        lines
            .map(|l| header.iter().zip(l.split(',')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
            .filter(|row: &HashMap<String, String>| {
                row.get("pxname").map(String::as_str) == Some("poolers")
                    && row.get("svname").is_some_and(|s| s.starts_with("node"))
            })
            .map(|row| (row["svname"].clone(), row))
            .collect()
    }

    fn status(&self, node: usize) -> String {
        self.servers().get(&format!("node{node}")).map(|r| r["status"].clone()).unwrap_or_default()
    }

    /// Connections HAProxy has handed to each node so far (`stot`).
    fn sessions(&self) -> Vec<i64> {
        let servers = self.servers();
        (1..=NODES).map(|n| servers[&format!("node{n}")]["stot"].parse().unwrap()).collect()
    }

    fn wait_status(&self, node: usize, status: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.status(node).starts_with(status))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole fleet. Fields drop in order: HAProxy, then the nodes, then their namespaces.
struct Fleet {
    haproxy: Haproxy,
    nodes: Vec<Node>,
    _netns: Vec<Netns>,
    dir: PathBuf,
    db: &'static str,
}

impl Fleet {
    fn start() -> Fleet {
        let pg = Postgres::shared();
        let db = bench_database();
        sweep_stale_namespaces();
        let dir = scratch_dir("fleet");
        let netns: Vec<Netns> =
            free_subnets().into_iter().enumerate().map(|(i, octet)| Netns::create(i + 1, octet)).collect();
        let dirs: Vec<PathBuf> = (1..=NODES).map(|n| dir.join(format!("node{n}"))).collect();
        let mut nodes = Vec::new();
        for (i, ns) in netns.iter().enumerate() {
            std::fs::create_dir_all(&dirs[i]).unwrap();
            std::fs::write(dirs[i].join("userlist.txt"), app_userlist()).unwrap();
            let node = Node {
                id: i + 1,
                netns: ns.name.clone(),
                addr: ns.addr.clone(),
                dir: dirs[i].clone(),
                child: None,
            };
            std::fs::write(dirs[i].join("pgcorral.ini"), node.ini(pg, db, &dirs)).unwrap();
            nodes.push(node);
        }
        for node in &mut nodes {
            node.start();
        }
        let haproxy = Haproxy::start(&dir, &nodes);
        for node in &nodes {
            assert!(
                haproxy.wait_status(node.id, "UP", Duration::from_secs(10)),
                "haproxy does not see node {} up: {:?}\n{}",
                node.id,
                haproxy.servers(),
                haproxy.log()
            );
        }
        Fleet { haproxy, nodes, _netns: netns, dir, db }
    }

    fn node(&mut self, id: usize) -> &mut Node {
        &mut self.nodes[id - 1]
    }

    /// Every node's logs and HAProxy's, for failure messages.
    fn logs(&self) -> String {
        let mut all: String = self.nodes.iter().map(Node::log).collect();
        all.push_str(&format!("--- haproxy ---\n{}", self.haproxy.log()));
        all
    }

    fn xacts(&self) -> Vec<i64> {
        self.nodes.iter().map(|n| if n.child.is_some() { n.xacts(self.db) } else { 0 }).collect()
    }

    /// Starts pgbench against HAProxy with `args`; see [`Bench`].
    fn pgbench(&self, name: &str, args: &[&str]) -> Bench {
        Bench::start(&self.dir, name, self.haproxy.port, self.db, args)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- fleet (dir kept: {}) ---\n{}", self.dir.display(), self.logs());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A database with pgbench's tables (scale 1), made once per test binary directly on
/// PostgreSQL.
fn bench_database() -> &'static str {
    static DB: OnceLock<String> = OnceLock::new();
    DB.get_or_init(|| {
        let pg = Postgres::shared();
        let db = pg.create_database("fleet");
        let out = Command::new(pg_bin("pgbench"))
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", APP_USER, "-p", &pg.port.to_string(), &db])
            .env("PGPASSWORD", APP_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run pgbench -i");
        assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
        db
    })
}

/// A pgbench run in the background, its output in files; killed on drop.
struct Bench {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// What a finished pgbench run printed.
struct BenchResult {
    success: bool,
    processed: i64,
    failed: i64,
    /// "client N aborted ..." lines.
    aborted: usize,
    /// For each of those, how many `-P 1` progress lines came before it: the second of the run
    /// it happened in.
    aborted_in_second: Vec<usize>,
    /// Transactions per second of each `-P 1` progress line.
    progress: Vec<f64>,
    stdout: String,
    stderr: String,
}

impl Bench {
    fn start(dir: &Path, name: &str, port: u16, db: &str, args: &[&str]) -> Bench {
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let mut cmd = Command::new(pg_bin("pgbench"));
        cmd.args(["-n", "-h", "127.0.0.1", "-U", APP_USER, "-p", &port.to_string()])
            .args(args)
            .arg(db)
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        let child = spawn_supervised(cmd).expect("spawn pgbench");
        Bench { child, stdout, stderr }
    }

    fn finish(mut self, timeout: Duration) -> BenchResult {
        let done = wait_until(timeout, || matches!(self.child.try_wait(), Ok(Some(_))));
        assert!(done, "pgbench still running after {timeout:?}");
        let success = self.child.wait().unwrap().success();
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let number_after = |prefix: &str| -> Option<i64> {
            let line = stdout.lines().find(|l| l.starts_with(prefix))?;
            line[prefix.len()..].split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty())?.parse().ok()
        };
        let processed = number_after("number of transactions actually processed:")
            .unwrap_or_else(|| panic!("no summary from pgbench:\n{stdout}\n{stderr}"));
        let failed = number_after("number of failed transactions:").unwrap_or(0);
        let mut aborted_in_second = Vec::new();
        let mut seconds = 0;
        for line in stderr.lines() {
            if line.starts_with("progress: ") {
                seconds += 1;
            } else if line.contains(": client ") && line.contains(" aborted ") {
                aborted_in_second.push(seconds);
            }
        }
        let aborted = aborted_in_second.len();
        let progress = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("progress: "))
            .filter_map(|l| l.split(", ").nth(1)?.strip_suffix(" tps")?.parse().ok())
            .collect();
        BenchResult { success, processed, failed, aborted, aborted_in_second, progress, stdout, stderr }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pgbench_through_haproxy_spreads_clients_across_the_nodes() {
    let _serial = serial();
    let fleet = Fleet::start();
    let sessions_before = fleet.haproxy.sessions();
    let started = Instant::now();
    let bench = fleet.pgbench("spread", &["-S", "-c", "12", "-j", "2", "-T", "5"]);
    let run = bench.finish(Duration::from_secs(30));
    let took = started.elapsed();
    assert!(run.success, "pgbench failed:\n{}\n{}\n{}", run.stdout, run.stderr, fleet.logs());
    assert_eq!(run.failed, 0, "{}", run.stdout);
    assert!(run.processed > 0);

    let sessions: Vec<i64> =
        fleet.haproxy.sessions().iter().zip(&sessions_before).map(|(after, before)| after - before).collect();
    let xacts = fleet.xacts();
    let total: i64 = xacts.iter().sum();
    eprintln!(
        "spread: pgbench -S -c 12 -T 5 through haproxy: {} transactions in {took:?}, 0 failed; \
         connections per node {sessions:?}, transactions per node {xacts:?}",
        run.processed
    );
    // pgbench's 12 clients plus its initial connection: round robin gives each node 4 or 5.
    assert_eq!(sessions.iter().sum::<i64>(), 13, "{sessions:?}");
    assert!(sessions.iter().all(|&s| s >= 4), "haproxy did not spread the clients: {sessions:?}");
    // pgbench's own setup queries (the scale lookup) are counted too.
    assert!(
        (run.processed..=run.processed + 5).contains(&total),
        "every transaction went through one of the nodes: {xacts:?} for {}",
        run.processed
    );
    for (i, &x) in xacts.iter().enumerate() {
        assert!(x * 10 >= total, "node {} served only {x} of {total} transactions: {xacts:?}", i + 1);
    }
}

/// The node that gave out a cancel key: the peer id in its process id, as PgBouncer lays it out.
fn node_of(process_id: i32) -> usize {
    let b = process_id.to_be_bytes();
    b[1] as usize + ((b[2] as usize) << 8)
}

#[test]
fn every_cancel_through_haproxy_is_honoured_whichever_node_it_lands_on() {
    const SESSIONS: usize = 12;
    let _serial = serial();
    let fleet = Fleet::start();
    let pg = Postgres::shared();
    let lb = ("127.0.0.1", fleet.haproxy.port);

    let sessions: Vec<KeyedSession> =
        (0..SESSIONS).map(|_| KeyedSession::login(lb, 0, APP_USER, APP_PASSWORD, fleet.db)).collect();
    let mut per_node = [0usize; NODES];
    for s in &sessions {
        per_node[node_of(s.process_id) - 1] += 1;
    }
    assert!(per_node.iter().all(|&n| n > 0), "sessions per node: {per_node:?}");

    // Each session runs a long query on a thread of its own, and reports how it ended once
    // the main thread says its cancel went out.
    let mut workers = Vec::new();
    for mut session in sessions {
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let holder = node_of(session.process_id);
        let (process_id, key) = (session.process_id, session.key.clone());
        let thread = std::thread::spawn(move || {
            session.stream.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
            session.stream.write_all(&wire::query("SELECT pg_sleep(30)")).unwrap();
            let mut error = None;
            loop {
                let m = read_msg(&mut session.stream);
                match m.tag {
                    b'E' => error = m.sqlstate(),
                    b'Z' => break,
                    _ => {}
                }
            }
            let ended = Instant::now();
            let sent = rx.recv().expect("cancel sent");
            (error, ended.saturating_duration_since(sent))
        });
        workers.push((thread, tx, holder, process_id, key));
    }
    let running = wait_until(Duration::from_secs(10), || {
        pg.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND query = 'SELECT pg_sleep(30)' \
             AND state = 'active'",
            fleet.db
        )) == SESSIONS.to_string()
    });
    assert!(running, "the sleeps did not all reach PostgreSQL\n{}", fleet.logs());

    // The cancels go through HAProxy too, one after the other, in an order shifted by one from
    // the logins', so that round robin hands most of them to a node other than the holder.
    let forwards_before: usize = fleet.nodes.iter().map(Node::forwards).sum();
    let started = Instant::now();
    for i in 0..SESSIONS {
        let (_, tx, _, process_id, key) = &workers[(i + 1) % SESSIONS];
        let sent = Instant::now();
        send_cancel(lb, *process_id, key);
        tx.send(sent).unwrap();
    }
    let mut under_2s = 0;
    let mut slowest = Duration::ZERO;
    for (i, (thread, _, holder, _, _)) in workers.into_iter().enumerate() {
        let (error, took) = thread.join().expect("session thread");
        assert_eq!(error.as_deref(), Some("57014"), "session {i} on node {holder} was not cancelled");
        slowest = slowest.max(took);
        if took < Duration::from_secs(2) {
            under_2s += 1;
        }
    }
    let total = started.elapsed();
    let forwarded = fleet.nodes.iter().map(Node::forwards).sum::<usize>() - forwards_before;
    eprintln!(
        "cancels: {SESSIONS} sessions through haproxy (per node {per_node:?}), {SESSIONS} cancels through \
         haproxy: all ended with 57014, {under_2s} in under 2 s (slowest {slowest:?}, all in {total:?}); \
         {forwarded} were forwarded to the peer holding the query"
    );
    assert_eq!(under_2s, SESSIONS, "cancelled queries that took 2 s or more: slowest {slowest:?}");
    assert!(forwarded > 0, "no cancel landed on a node other than its holder\n{}", fleet.logs());
}

#[test]
fn with_a_node_killed_pgbench_reconnects_through_the_others_and_goes_on() {
    let _serial = serial();
    let mut fleet = Fleet::start();
    let bench = fleet.pgbench("kill", &["-S", "-C", "-c", "12", "-j", "2", "-T", "8", "-P", "1"]);
    std::thread::sleep(Duration::from_millis(2500));
    let at_kill = fleet.xacts();
    fleet.node(2).kill();
    let killed = Instant::now();
    assert!(
        fleet.haproxy.wait_status(2, "DOWN", Duration::from_secs(5)),
        "haproxy does not see node 2 down: {:?}",
        fleet.haproxy.servers()
    );
    let down_after = killed.elapsed();
    let run = bench.finish(Duration::from_secs(30));
    let after = fleet.xacts();
    // Connections HAProxy sent to node 2 after it died, were refused, and went to another node.
    let redispatched: i64 = fleet.haproxy.servers()["node2"]["wredis"].parse().unwrap();
    eprintln!(
        "kill: pgbench -S -C -c 12 -T 8 through haproxy, node 2 killed at 2.5 s, haproxy saw it down \
         {down_after:?} later and meanwhile sent {redispatched} refused connections on to the others; \
         {} transactions processed, {} failed, {} clients aborted (in seconds {:?} of the run); \
         transactions per node at the kill {at_kill:?}, at the end {after:?}; tps per second {:?}",
        run.processed, run.failed, run.aborted, run.aborted_in_second, run.progress
    );
    assert!(at_kill.iter().all(|&x| x > 0), "every node served before the kill: {at_kill:?}");
    for n in [0, 2] {
        assert!(after[n] > at_kill[n], "node {} served nothing after the kill: {at_kill:?} {after:?}", n + 1);
    }
    assert!(redispatched > 0, "no connection was refused by node 2 and sent on");
    // The run went on: every second after the kill still had transactions (pgbench reports 8
    // seconds, or 7 when the last one ends with the run).
    assert!(run.progress.len() >= 6, "progress lines: {:?}\n{}", run.progress, run.stderr);
    assert!(run.progress[3..].iter().all(|&tps| tps > 0.0), "the run stalled: {:?}", run.progress);
    // pgbench gives up a client whose connection breaks: only those that were on node 2 at the
    // kill, in the 3rd second; none once HAProxy had taken node 2 out, and some went on.
    assert!(
        run.aborted_in_second.iter().all(|&s| (2..=3).contains(&s)),
        "clients lost after the kill: {:?}\n{}",
        run.aborted_in_second,
        run.stderr
    );
    assert!(run.aborted < 12, "every client was lost:\n{}", run.stderr);
    assert_eq!(run.failed, 0, "{}", run.stdout);
}

#[test]
fn a_rolling_restart_one_node_at_a_time_drained_at_haproxy_fails_no_transaction() {
    let _serial = serial();
    let mut fleet = Fleet::start();
    let bench = fleet.pgbench("rolling", &["-S", "-C", "-c", "8", "-j", "2", "-T", "10", "-P", "1"]);
    std::thread::sleep(Duration::from_millis(1000));
    let mut timings = Vec::new();
    for id in 1..=NODES {
        let started = Instant::now();
        // Drain: HAProxy sends the node no new connection; those it has finish.
        let said = fleet.haproxy.command(&format!("set server poolers/node{id} state drain"));
        assert!(said.trim().is_empty(), "haproxy: {said}");
        let drained = wait_until(Duration::from_secs(5), || {
            fleet.haproxy.servers()[&format!("node{id}")]["scur"] == "0"
        });
        assert!(drained, "node {id} kept connections: {:?}", fleet.haproxy.servers());
        // SIGTERM: stop accepting, serve the clients still connected, exit once they left.
        let old_pid = fleet.node(id).pid();
        fleet.node(id).signal(libc::SIGTERM);
        let exited = fleet.node(id).wait_exit(Duration::from_secs(10));
        assert!(exited, "node {id} did not exit after SIGTERM\n{}", fleet.node(id).log());
        let stopped = started.elapsed();
        fleet.node(id).start();
        assert_ne!(fleet.node(id).pid(), old_pid);
        let said = fleet.haproxy.command(&format!("set server poolers/node{id} state ready"));
        assert!(said.trim().is_empty(), "haproxy: {said}");
        let up = fleet.haproxy.wait_status(id, "UP", Duration::from_secs(5));
        assert!(up, "haproxy does not see node {id} up again: {:?}", fleet.haproxy.servers());
        timings.push((stopped, started.elapsed()));
        std::thread::sleep(Duration::from_millis(1000));
    }
    let run = bench.finish(Duration::from_secs(30));
    let after = fleet.xacts();
    eprintln!(
        "rolling restart: pgbench -S -C -c 8 -T 10 through haproxy, each node in turn drained, \
         SIGTERMed and started again (exited after, back after): {timings:?}; {} transactions, {} failed, \
         {} clients aborted; transactions per restarted process {after:?}; tps per second {:?}",
        run.processed, run.failed, run.aborted, run.progress
    );
    assert!(run.success, "pgbench failed:\n{}\n{}", run.stdout, run.stderr);
    assert_eq!((run.failed, run.aborted), (0, 0), "{}\n{}", run.stdout, run.stderr);
    assert!(after.iter().all(|&x| x > 0), "a restarted node served nothing: {after:?}");
}

/// A rolling upgrade: each node in turn replaced by `pgcorral -R` (a new process, as a new
/// binary would be) under pgbench's persistent connections, with no drain at HAProxy: the
/// listening sockets and the idle clients move to the new process, and no transaction fails.
#[test]
fn a_rolling_upgrade_with_online_restarts_fails_no_transaction() {
    let _serial = serial();
    let mut fleet = Fleet::start();
    let bench = fleet.pgbench("upgrade", &["-S", "-c", "12", "-j", "2", "-T", "10", "-P", "1"]);
    std::thread::sleep(Duration::from_millis(1500));
    let mut moved = Vec::new();
    for id in 1..=NODES {
        let old_pid = fleet.node(id).pid();
        fleet.node(id).reboot();
        assert_ne!(fleet.node(id).pid(), old_pid);
        let log = fleet.node(id).log_text();
        let line =
            log.lines().rev().find(|l| l.contains("clients moved to the new process")).unwrap_or_default();
        let line = line.to_string();
        moved.push(line);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let run = bench.finish(Duration::from_secs(30));
    let after = fleet.xacts();
    eprintln!(
        "rolling upgrade: pgbench -S -c 12 -T 10 through haproxy, each node replaced by pgcorral -R in turn; \
         {} transactions, {} failed, {} clients aborted; transactions per new process {after:?}; moves: {moved:?}",
        run.processed, run.failed, run.aborted
    );
    assert!(run.success, "pgbench failed:\n{}\n{}", run.stdout, run.stderr);
    assert_eq!((run.failed, run.aborted), (0, 0), "{}\n{}", run.stdout, run.stderr);
    assert!(after.iter().all(|&x| x > 0), "a new process served nothing: {after:?}");
    assert!(
        moved.iter().all(|l| !l.is_empty()),
        "every old process handed its clients over: {moved:?}\n{}",
        fleet.logs()
    );
}
