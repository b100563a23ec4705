// Memory cost of idle client connections: PgBouncer vs pgcorral. Opens
// CLIENTS connections through each pooler (each runs SELECT 1 once, then
// idles) and reports the pooler's RSS growth per client.
//
//   cargo build --release && CLIENTS=10000 cargo bench --bench idle_clients
//
// Env: CLIENTS (default 10000), POOLERS (comma list, default
// "pgbouncer,pgcorral"), PGCORRAL (binary; default the one Cargo built),
// PGBOUNCER (default: pgbouncer on PATH or /usr/sbin/pgbouncer).

#[path = "../tests/support/mod.rs"]
mod support;

use futures_util::future::join_all;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, Postgres, TRUST_USER};

/// Connections opened concurrently: enough to finish 10k connects in
/// seconds, few enough not to overflow the pooler's listen backlog.
const BATCH: usize = 200;

struct Row {
    pooler: String,
    clients: usize,
    before_kib: u64,
    after_kib: u64,
    note: String,
}

fn main() {
    let clients: usize = std::env::var("CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let poolers = std::env::var("POOLERS").unwrap_or_else(|_| "pgbouncer,pgcorral".into());
    // Each client costs one fd here and one in the pooler, which inherits
    // the limit set here; the slack covers server connections and the rest.
    raise_nofile(clients as u64 + 2048);

    eprintln!("starting PostgreSQL");
    let pg = Postgres::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let mut rows = Vec::new();
    for name in poolers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let binary = match binary_for(name) {
            Ok(b) => b,
            Err(why) => {
                eprintln!("{name}: {why}");
                rows.push(Row { pooler: name.into(), clients: 0, before_kib: 0, after_kib: 0, note: why });
                continue;
            }
        };
        eprintln!("{name}: {}", binary.display());
        rows.push(measure(&rt, &pg, name, &binary, clients));
    }

    println!();
    println!(
        "Idle clients through each pooler (transaction mode, default_pool_size 20), RSS from /proc VmRSS:"
    );
    println!();
    println!("| pooler | clients | RSS before | RSS after | KiB per idle client |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        if r.clients == 0 {
            println!("| {} | - | - | - | {} |", r.pooler, r.note);
            continue;
        }
        let per = (r.after_kib as f64 - r.before_kib as f64) / r.clients as f64;
        let note = if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) };
        println!(
            "| {} | {}{note} | {} | {} | {per:.2} |",
            r.pooler,
            r.clients,
            mib(r.before_kib),
            mib(r.after_kib)
        );
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn binary_for(name: &str) -> Result<PathBuf, String> {
    let path: PathBuf = match name {
        "pgbouncer" => std::env::var_os("PGBOUNCER").map(PathBuf::from).unwrap_or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join("pgbouncer"))
                .find(|p| p.exists())
                .unwrap_or_else(|| "/usr/sbin/pgbouncer".into())
        }),
        "pgcorral" => match std::env::var_os("PGCORRAL") {
            Some(p) => p.into(),
            None => match option_env!("CARGO_BIN_EXE_pgcorral") {
                Some(p) => p.into(),
                None => return Err("no binary: set PGCORRAL or run `cargo build --release`".into()),
            },
        },
        other => return Err(format!("unknown pooler {other:?} in POOLERS")),
    };
    if path.exists() {
        Ok(path)
    } else if name == "pgcorral" {
        Err(format!("{} missing: run `cargo build --release` first", path.display()))
    } else {
        Err(format!("{} missing: apt-get install pgbouncer", path.display()))
    }
}

fn measure(rt: &tokio::runtime::Runtime, pg: &Postgres, name: &str, binary: &Path, clients: usize) -> Row {
    let mut row = Row { pooler: name.into(), clients: 0, before_kib: 0, after_kib: 0, note: String::new() };
    let daemon = match Daemon::start(name, binary, pg.port, clients) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{name} did not start:\n{e}");
            row.note = "did not start (see stderr)".into();
            return row;
        }
    };
    // Let start-up allocations settle before the baseline.
    std::thread::sleep(Duration::from_millis(500));
    row.before_kib = rss_tree_kib(daemon.pid());

    let url = format!("host=127.0.0.1 port={} user={TRUST_USER} dbname=app connect_timeout=30", daemon.port);
    let started = Instant::now();
    let (held, errors) = rt.block_on(async {
        let mut held = Vec::with_capacity(clients);
        let mut errors: Vec<String> = Vec::new();
        let mut left = clients;
        while left > 0 {
            let n = left.min(BATCH);
            left -= n;
            let batch = join_all((0..n).map(|_| {
                let url = url.clone();
                async move {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client.simple_query("SELECT 1").await?;
                    Ok::<_, tokio_postgres::Error>(client)
                }
            }))
            .await;
            for r in batch {
                match r {
                    Ok(c) => held.push(c),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        (held, errors)
    });
    eprintln!("{name}: {} clients connected in {:.1?}", held.len(), started.elapsed());
    if !errors.is_empty() {
        eprintln!("{name}: {} connections failed, first: {}", errors.len(), errors[0]);
        row.note = format!("{} failed", errors.len());
    }
    // Idle for a moment so buffers freed after the query are returned.
    std::thread::sleep(Duration::from_secs(2));
    row.after_kib = rss_tree_kib(daemon.pid());
    row.clients = held.len();
    rt.block_on(async move { drop(held) });
    drop(daemon);
    row
}

/// A pooler started as user postgres (PgBouncer refuses root) from an ini
/// generated the same way for both poolers.
struct Daemon {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(name: &str, binary: &Path, pg_port: u16, clients: usize) -> Result<Daemon, String> {
        let dir = support::scratch_dir(&format!("bench{name}"));
        let port = free_port();
        let d = dir.display();
        std::fs::write(dir.join("userlist.txt"), format!("\"{TRUST_USER}\" \"\"\n")).unwrap();
        let ini = format!(
            "[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
             auth_type = trust\nauth_file = {d}/userlist.txt\npool_mode = transaction\n\
             default_pool_size = 20\nmax_client_conn = {}\nlogfile = {d}/{name}.log\npidfile = {d}/{name}.pid\n\
             log_connections = 0\nlog_disconnections = 0\n",
            clients + 100
        );
        let ini_path = dir.join(format!("{name}.ini"));
        std::fs::write(&ini_path, ini).unwrap();
        let ids = if unsafe { libc::geteuid() } == 0 { support::postgres_ids() } else { None };
        if let Some((uid, gid)) = ids {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                chown(&entry.path(), uid, gid);
            }
            chown(&dir, uid, gid);
        }
        let out = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut cmd = Command::new(binary);
        cmd.arg(&ini_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some((uid, gid)) = ids {
            // Registered before spawn_supervised's hook: changing uid clears
            // the parent-death signal, so it must be set afterwards.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = support::spawn_supervised(cmd).map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        let mut daemon = Daemon { port, dir, child };
        let listening = support::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || matches!(daemon.child.try_wait(), Ok(Some(_)))
        });
        if listening && matches!(daemon.child.try_wait(), Ok(None)) {
            Ok(daemon)
        } else {
            Err(daemon.log())
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        let mut s = String::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                s += &format!("--- {} ---\n{}", p.display(), std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        // Up to a minute: under valgrind (benches/README.md) the daemon is slow to stop.
        if !support::wait_until(Duration::from_secs(60), || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chown(path: &Path, uid: libc::uid_t, gid: libc::gid_t) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    unsafe { libc::chown(c.as_ptr(), uid, gid) };
}

/// RSS of `pid` plus its descendants, in case a pooler forks workers.
fn rss_tree_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let own: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.extend(list.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
    }
    own + children.into_iter().map(rss_tree_kib).sum::<u64>()
}

/// Raises RLIMIT_NOFILE to at least `want` (the hard limit too when root).
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur >= want {
        return;
    }
    let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let capped = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
        eprintln!("warning: RLIMIT_NOFILE capped at {} (wanted {want})", lim.rlim_max);
    }
}
