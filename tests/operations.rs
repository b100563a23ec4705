//! Operating pgcorral as PgBouncer is operated: `/metrics` read by Prometheus's own parser and
//! checked against SHOW POOLS, the console from asyncpg and psycopg, a reload under pgbench,
//! signals, and the log lines operators grep for.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-pass";

fn userlist() -> String {
    app_userlist() + &Pooler::userlist_line(ADMIN, ADMIN_PASSWORD)
}

fn start(pg: &Postgres, db: &str, params: &str, general: &str) -> Pooler {
    Pooler::start(
        &pool_ini(pg, db, params, "transaction", &format!("admin_users = {ADMIN}\n{general}")),
        &userlist(),
    )
}

fn output(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Five clients queue behind an advisory lock on two servers (3 waiting, 2 active); Python
/// scrapes `/metrics`, parses it with prometheus_client, and reads SHOW POOLS and SHOW STATS
/// through asyncpg (extended protocol, binary results) and psycopg; the numbers must agree.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_with_prometheus_client_and_match_the_console() {
    let pg = Postgres::shared();
    let db = pg.create_database("metrics");
    let metrics_port = free_port();
    let pooler = start(pg, &db, "pool_size=2", &format!("metrics_addr = 127.0.0.1:{metrics_port}"));
    let gate = pg.connect(SUPERUSER, "", &db).await.unwrap();
    gate.simple_query("SELECT pg_advisory_lock(7)").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
        tasks.push(tokio::spawn(async move {
            client.simple_query("SELECT pg_advisory_xact_lock_shared(7)").await.is_ok()
        }));
    }
    let script = r#"
import asyncio, json, os, sys, time, urllib.request
import asyncpg, psycopg
from prometheus_client.parser import text_string_to_metric_families

db, port, mport = os.environ["DB"], int(os.environ["PORT"]), os.environ["MPORT"]

def scrape():
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("database") == db or s.name.startswith("pgcorral_") and s.labels.get("database") == db:
                samples[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("database",))))] = s.value
    return samples

def gauge(samples, name):
    return [v for (n, _), v in samples.items() if n == name][0]

async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="admin", password="admin-pass", database="pgbouncer")
    for _ in range(100):
        pools = [r for r in await conn.fetch("SHOW POOLS") if r["database"] == db]
        if pools and pools[0]["cl_waiting"] == 3:
            break
        time.sleep(0.05)
    pool = pools[0]
    samples = scrape()
    for column, metric in [("cl_active", "client_active_connections"), ("cl_waiting", "client_waiting_connections"),
                           ("sv_active", "server_active_connections"), ("sv_idle", "server_idle_connections"),
                           ("sv_login", "server_login_connections")]:
        got = gauge(samples, "pgbouncer_pools_" + metric)
        assert got == pool[column], (column, got, pool[column])
    assert pool["cl_waiting"] == 3 and pool["sv_active"] == 2, dict(pool)
    assert gauge(samples, "pgbouncer_databases_pool_size") == 2
    await conn.close()

    # psycopg, extended protocol with text results, including numeric SHOW STATS columns.
    with psycopg.connect(host="127.0.0.1", port=port, user="admin", password="admin-pass", dbname="pgbouncer", autocommit=True) as c:
        rows = c.execute("SHOW STATS_TOTALS").fetchall()
        names = [d.name for d in c.execute("SHOW STATS_TOTALS").description]
        row = dict(zip(names, [r for r in rows if r[0] == db][0]))
        samples = scrape()
        assert gauge(samples, "pgbouncer_stats_totals_sql_transactions_pooled_total") == row["xact_count"], (samples, row)
        assert gauge(samples, "pgbouncer_stats_totals_received_bytes_total") == row["bytes_received"]
        hist = [v for (n, labels), v in samples.items() if n == "pgcorral_client_wait_seconds_count"]
        assert hist and hist[0] == row["server_assignment_count"], (hist, row)
    print("agree")

asyncio.run(main())
"#;
    let out = tokio::task::spawn_blocking({
        let (db, port) = (db.clone(), pooler.port.to_string());
        move || {
            run_python(
                script,
                &[("DB", db.as_str()), ("PORT", port.as_str()), ("MPORT", metrics_port.to_string().as_str())],
            )
        }
    })
    .await
    .unwrap();
    assert!(out.status.success() && output(&out).contains("agree"), "{}\n{}", output(&out), pooler.log());
    gate.simple_query("SELECT pg_advisory_unlock(7)").await.unwrap();
    for task in tasks {
        assert!(task.await.unwrap());
    }
}

fn pgbench(pg_port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.args(args)
        .args(["-h", "127.0.0.1", "-p", &pg_port.to_string(), "-U", APP_USER])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// SIGHUP while pgbench runs: no transaction fails, the new pool_size shows up in
/// pg_stat_activity, and the log says what changed.
#[test]
fn reload_under_pgbench_resizes_the_pool_and_loses_nothing() {
    let pg = Postgres::shared();
    let db = pg.create_database("reload_bench");
    let init = pgbench(pg.port, &["-i", "-q", "-s", "1", &db]).output().unwrap();
    assert!(init.status.success(), "{}", output(&init));
    let pooler = start(pg, &db, "pool_size=2", "");
    let run = pgbench(pooler.port, &["-n", "-c", "12", "-j", "2", "-T", "6", &db]).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(5), || backend_count(pg, &db) == 2), "two servers at first");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(backend_count(pg, &db), 2, "pool_size = 2 holds under load");

    let ini = pooler.dir.join("pgcorral.ini");
    let text = std::fs::read_to_string(&ini).unwrap();
    std::fs::write(&ini, text.replace("pool_size=2", "pool_size=5")).unwrap();
    pooler.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(4), || backend_count(pg, &db) == 5),
        "the reloaded pool_size shows in pg_stat_activity:\n{}",
        pooler.log()
    );
    let out = run.wait_with_output().expect("pgbench finishes");
    let report = output(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("number of failed transactions: 0"), "{report}");
    assert!(!report.contains("aborted"), "{report}");
    let log = pooler.log();
    assert!(log.contains(&format!("reload: database {db} changed")), "the diff is logged:\n{log}");
}

/// SIGUSR1 pauses and SIGUSR2 resumes; SIGINT waits for the open transaction, then exits.
#[tokio::test(flavor = "multi_thread")]
async fn signals_pause_resume_and_shut_down_gracefully() {
    let pg = Postgres::shared();
    let db = pg.create_database("signals");
    let mut pooler = start(pg, &db, "pool_size=2", "");
    let client = std::sync::Arc::new(pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap());
    first_value(&client, "SELECT 1").await.unwrap();

    pooler.signal(libc::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || backend_count(pg, &db) == 0), "paused: servers closed");
    let held = {
        let client = client.clone();
        tokio::spawn(async move { first_value(&client, "SELECT 2").await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "SIGUSR1 holds new transactions");
    pooler.signal(libc::SIGUSR2);
    assert_eq!(held.await.unwrap().unwrap(), "2", "SIGUSR2 releases them");

    // SIGINT with a transaction open: the daemon stops accepting, lets it finish, then exits.
    client.batch_execute("BEGIN").await.unwrap();
    pooler.signal(libc::SIGINT);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!pooler.has_exited(), "SIGINT waits for the open transaction");
    assert!(pooler.connect(APP_USER, APP_PASSWORD, &db).await.is_err(), "no new clients after SIGINT");
    assert_eq!(first_value(&client, "SELECT 3").await.unwrap(), "3");
    client.batch_execute("COMMIT").await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || pooler.has_exited()), "exits once the server is back");
}

/// SIGTERM waits for clients to leave; a second SIGTERM exits at once. Log lines follow
/// PgBouncer's: logins, disconnections with their reason, the periodic stats line.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_waits_for_clients_and_the_log_says_what_happened() {
    let pg = Postgres::shared();
    let db = pg.create_database("sigterm");
    let mut pooler = start(pg, &db, "", "stats_period = 1");
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&client, "SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pooler.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!pooler.has_exited(), "SIGTERM waits while a client is connected");
    assert_eq!(first_value(&client, "SELECT 2").await.unwrap(), "2", "the client is still served");
    drop(client);
    assert!(wait_until(Duration::from_secs(5), || pooler.has_exited()), "exits once the client left");

    let log = pooler.log();
    assert!(log.contains(&format!("{db}/{APP_USER}@127.0.0.1:")), "{log}");
    assert!(log.contains(&format!("login attempt: db={db} user={APP_USER} tls=no")), "{log}");
    assert!(log.contains("closing because: client close request (age="), "{log}");
    assert!(log.contains("stats: ") && log.contains(" xacts/s, "), "the stats line:\n{log}");

    let mut second = start(pg, &db, "", "");
    let lingering = second.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    second.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || second.has_exited()), "a second SIGTERM exits at once");
    drop(lingering);
}

/// logrotate moves the file away and sends SIGHUP: pgcorral writes a new file.
#[test]
fn reload_reopens_the_logfile() {
    let pg = Postgres::shared();
    let db = pg.create_database("logrotate");
    let pooler = start(pg, &db, "", "");
    let logfile = pooler.dir.join("pgcorral.log");
    let rotated = pooler.dir.join("pgcorral.log.1");
    assert!(wait_until(Duration::from_secs(5), || logfile.exists()));
    std::fs::rename(&logfile, &rotated).unwrap();
    pooler.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&logfile)
            .is_ok_and(|text| text.contains("configuration reloaded"))),
        "after SIGHUP the log goes to a new file"
    );
}

/// `application_name_add_host`: PostgreSQL sees where a client connected from.
#[tokio::test]
async fn application_name_add_host_tags_the_client_address() {
    let pg = Postgres::shared();
    let db = pg.create_database("appname");
    let pooler = start(pg, &db, "", "application_name_add_host = 1");
    let url = format!("{} application_name=worker", pooler.url(APP_USER, APP_PASSWORD, &db));
    let client = support::connect_plain(&url).await.unwrap();
    let name = first_value(&client, "SHOW application_name").await.unwrap();
    assert!(name.starts_with("worker - 127.0.0.1:"), "{name}");
    let seen = pg.sql(&format!("SELECT application_name FROM pg_stat_activity WHERE datname = '{db}'"));
    assert_eq!(seen, name, "the server carries the tagged name");
}

/// A reload that raises `verbose` logs more from then on (the test daemon runs with one -v).
#[tokio::test]
async fn reload_changes_verbosity() {
    let pg = Postgres::shared();
    let db = pg.create_database("verbosity");
    let pooler = start(pg, &db, "", "");
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&client, "SELECT 1").await.unwrap();
    assert!(!pooler.log().contains(" TRACE "), "debug level at first");
    let ini = pooler.dir.join("pgcorral.ini");
    let text = std::fs::read_to_string(&ini).unwrap();
    std::fs::write(&ini, format!("{text}verbose = 1\n")).unwrap();
    pooler.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || pooler.log().contains("reload: verbose")));
    let again = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&again, "SELECT 1").await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || pooler.log().contains(" TRACE ")), "{}", pooler.log());
}
