// Shared harness for pgcorral's integration tests and benches: throwaway
// PostgreSQL clusters, a supervised pgcorral process, a Python venv, node-postgres
// and pgjdbc for driver-compatibility tests, and small helpers. Included with `mod support;`
// from tests/*.rs and with `#[path]` from benches.

// Every test binary uses a different subset of this module.
#![allow(dead_code, unused_imports)]

mod certs;
pub mod console;
mod java;
mod node;
mod pgbouncer;
mod pooler;
mod postgres;
mod python;
pub mod wire;

pub use certs::Certs;
pub use java::{run_java, PGJDBC_JAR};
pub use node::run_node;
pub use pgbouncer::PgBouncer;
pub use pooler::{binary as pgcorral_binary, spawn_supervised, Pooler};
pub use postgres::pg_bin;
pub(crate) use postgres::postgres_ids;
pub use postgres::Postgres;
use postgres::HELPER_APPLICATION_NAME;
pub use python::{python, run_python};

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Superuser; trusted over TCP from 127.0.0.1 and over the socket.
pub const SUPERUSER: &str = "postgres";
/// Owner of [`APP_DB`] and of every database made by `create_database`; SCRAM.
pub const APP_USER: &str = "app_user";
pub const APP_PASSWORD: &str = "app-pass";
/// Role whose password is stored as an md5 hash, so the server asks for md5.
pub const MD5_USER: &str = "md5_user";
pub const MD5_PASSWORD: &str = "md5-pass";
/// Role without a password, trusted by pg_hba.conf.
pub const TRUST_USER: &str = "trust_user";
pub const APP_DB: &str = "app";

/// Ports are drawn from 20000..32000 because the kernel hands out
/// 32768..60999 as ephemeral ports for outgoing connections, and a listener
/// there can collide with a client socket of some unrelated test.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// A port that nothing listens on right now and that this process has not
/// handed out before (two servers started back to back would otherwise race
/// for the same port, since neither binds it before the other checks).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = rand::random::<u16>() % (PORT_RANGE.end - PORT_RANGE.start) + PORT_RANGE.start;
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns
/// whether it did, so callers can assert with their own message.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh private directory under the system temp dir; the pid and a counter
/// keep parallel test binaries and repeated calls apart.
pub(crate) fn scratch_dir(kind: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if n == 0 {
        sweep_stale_dirs();
    }
    let dir = std::env::temp_dir().join(format!("pgcorral-{kind}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Removes pooler dirs left by test processes that were killed before their
/// Drop ran. Cluster dirs are left to their watchdog, which must stop the
/// server before the directory goes.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('-');
        let (Some("pgcorral"), Some(kind), Some(pid)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if kind == "pg" || pid.parse::<u32>().is_err() {
            continue;
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Directory of the cargo target dir in use, so that caches such as the
/// Python venv survive `cargo clean`-free reruns and honour CARGO_TARGET_DIR.
pub(crate) fn target_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return dir.into();
    }
    // Test and bench executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).map(|p| p.to_path_buf()).unwrap_or_else(std::env::temp_dir)
}

/// libpq-style "host=127.0.0.1 port=.. user=.. password=.. dbname=..".
/// An empty password is left out (an empty `password=` would swallow the
/// next key), and values with spaces or quotes are quoted.
pub(crate) fn conninfo(port: u16, user: &str, password: &str, db: &str) -> String {
    fn value(v: &str) -> String {
        if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
            v.to_string()
        } else {
            format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
        }
    }
    let mut s = format!("host=127.0.0.1 port={port} user={}", value(user));
    if !password.is_empty() {
        s.push_str(&format!(" password={}", value(password)));
    }
    s.push_str(&format!(" dbname={}", value(db)));
    s
}

/// The configuration most tests need: a `[databases]` entry for `db` on `pg` with extra
/// connection-string `params`, then `[pgbouncer]` with md5 auth, `mode` and `general` lines.
pub fn pool_ini(pg: &Postgres, db: &str, params: &str, mode: &str, general: &str) -> String {
    format!(
        "[databases]\n{db} = host=127.0.0.1 port={port} dbname={db} {params}\n\
         [pgbouncer]\nauth_type = md5\npool_mode = {mode}\n{general}\n",
        port = pg.port
    )
}

/// An auth_file with app_user's plain password.
pub fn app_userlist() -> String {
    Pooler::userlist_line(APP_USER, APP_PASSWORD)
}

/// First column of the first row of a simple-protocol query, "" if it returned no row. Simple
/// protocol because tokio-postgres prepares statements in one transaction and runs them in the
/// next, which transaction pooling does not carry yet.
pub async fn first_value(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    for message in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            return Ok(row.get(0).unwrap_or_default().to_string());
        }
    }
    Ok(String::new())
}

/// Client backends PostgreSQL has open to `db`: the pooler's server connections, since tests
/// reach a test database only through the pooler.
pub fn backend_count(pg: &Postgres, db: &str) -> usize {
    pg.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend' \
         AND application_name <> '{HELPER_APPLICATION_NAME}'"
    ))
    .parse()
    .expect("a count")
}

/// A tokio-postgres client without TLS, its connection driven by a spawned task.
pub(crate) async fn connect_plain(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The `key=value` lines a test program (a driver script, a Java class) printed, after
/// asserting that it succeeded; `context` (the pooler's log, say) goes into the failure message.
pub fn printed_results(
    what: &str,
    out: &std::process::Output,
    context: impl FnOnce() -> String,
) -> std::collections::HashMap<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Panics with what to install when `program` cannot be run: a driver test that silently
/// skipped would report a compatibility it never checked.
pub fn require_program(program: &str, install_hint: &str) {
    let found = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(found, "`{program}` is not installed: {install_hint} (.ci/run installs it)");
}

/// The most server connections PostgreSQL had open to one database while a test's clients
/// ran, sampled every 10 ms on a thread of its own over one direct superuser connection
/// (cheaper than a psql per sample, so the sampling does not slow the clients it watches).
pub struct PeakBackends {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl PeakBackends {
    /// Returns once the first sample has been taken.
    pub fn start(pg: &Postgres, db: &str) -> PeakBackends {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, db, flag) = (pg.url(SUPERUSER, "", "postgres"), db.to_string(), stop.clone());
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = connect_plain(&url).await.expect("sampler connects to PostgreSQL");
                let query = client
                    .prepare(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = $1 AND backend_type = 'client backend'",
                    )
                    .await
                    .expect("prepare sampler query");
                let mut peak = 0usize;
                loop {
                    let count: i64 = client.query_one(&query, &[&db]).await.expect("sample").get(0);
                    peak = peak.max(count as usize);
                    let _ = first_tx.send(());
                    if flag.load(Ordering::Relaxed) {
                        return peak;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        });
        first_rx.recv().expect("the sampler took its first sample");
        PeakBackends { stop, thread: Some(thread) }
    }

    /// Stops sampling (after one last sample) and returns the peak.
    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("sampler thread")
    }
}

impl Drop for PeakBackends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
