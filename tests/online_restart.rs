//! Online restart, `pgcorral -R`: a new process takes over the running one's listening sockets
//! and its clients, which move as soon as they are idle between transactions and keep their
//! session (parameters, prepared statements, cancel key); the old process exits once they
//! have moved. No client notices: pgbench runs through two restarts without a failed
//! transaction, with a new connection per transaction and without.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::console::show;
use support::*;
use support::{python, Certs};

fn ini(pg: &Postgres, db: &str) -> String {
    pool_ini(pg, db, "pool_size=4", "transaction", &format!("admin_users = {APP_USER}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_client_moves_with_its_session_and_the_old_process_exits() {
    let pg = Postgres::shared();
    let db = pg.create_database("reboot_session");
    let mut old = Pooler::start(&ini(pg, &db), &app_userlist());
    let client = old.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    client.batch_execute("SET application_name = 'mover'").await.unwrap();
    client.batch_execute("SET search_path = pg_catalog, public").await.unwrap();
    let statement = client.prepare("SELECT $1::int + 1").await.unwrap();
    let row = client.query_one(&statement, &[&41i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    let new = old.reboot().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || old.has_exited()),
        "the old process exits once its client moved\n{}",
        new.log()
    );
    assert!(new.log().contains("moved in from the process this one took over from"), "{}", new.log());

    // The same connection, now served by the new process: its statement, its settings.
    let row =
        client.query_one(&statement, &[&1i32]).await.expect("the prepared statement moved with the client");
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(first_value(&client, "SHOW search_path").await.unwrap(), "pg_catalog, public");
    assert_eq!(first_value(&client, "SHOW application_name").await.unwrap(), "mover");
    let console = new.connect(APP_USER, APP_PASSWORD, "pgbouncer").await.unwrap();
    let clients = show(&console, "SHOW CLIENTS").await;
    assert!(clients.rows.iter().any(|r| r["application_name"] == "mover"), "{:?}", clients.rows);

    // Its cancel key moved too.
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let started = Instant::now();
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (result, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, took) = sleeping.await.unwrap();
    let error = result.expect_err("cancelled");
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("57014"), "{error:?}");
    assert!(took < Duration::from_secs(20), "cancelled only after {took:?}");
}

/// pgbench with 50 clients for 30 s while pgcorral is replaced twice. Returns pgbench's
/// report, how many clients each new process says moved in, and how many of the database's
/// clients the last process lists in SHOW CLIENTS once it is alone.
fn pgbench_through_two_restarts(connect_per_transaction: bool) -> (String, Vec<usize>, usize) {
    let pg = Postgres::shared();
    let db = pg.create_database(if connect_per_transaction { "reboot_bench_c" } else { "reboot_bench" });
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", APP_USER, "-p"])
        .arg(pg.port.to_string())
        .arg(&db)
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut first = Pooler::start(&ini(pg, &db), &app_userlist());
    let mut bench = Command::new(pg_bin("pgbench"));
    bench.args(["-S", "-c", "50", "-j", "2", "-T", "30", "-n", "-h", "127.0.0.1", "-U", APP_USER, "-p"]);
    bench.arg(first.port.to_string()).arg(&db).env("PGPASSWORD", APP_PASSWORD);
    if connect_per_transaction {
        bench.arg("-C");
    }
    let run =
        bench.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let mut second = first.reboot().unwrap();
    assert!(
        wait_until(Duration::from_secs(8), || first.has_exited()),
        "the first process exits\n{}",
        second.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    let third = second.reboot().unwrap();
    assert!(
        wait_until(Duration::from_secs(8), || second.has_exited()),
        "the second process exits\n{}",
        third.log()
    );
    let listed = third.psql(APP_USER, APP_PASSWORD, "pgbouncer", "SHOW CLIENTS");
    let listed = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.split('|').nth(2) == Some(db.as_str()))
        .count();
    let out = run.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}\n{}", third.log());
    // Each line is in stderr.log and in the logfile: every other one.
    let moved_in: Vec<usize> = third
        .log()
        .lines()
        .filter_map(|l| l.split("takeover complete: ").nth(1))
        .filter_map(|rest| rest.strip_suffix(" clients moved in; the old process exits"))
        .filter_map(|n| n.parse().ok())
        .step_by(2)
        .collect();
    (report, moved_in, listed)
}

fn transactions(report: &str, what: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(what))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {what:?} in\n{report}"))
}

#[test]
fn pgbench_runs_through_two_restarts_without_a_failed_transaction() {
    let (report, moved_in, listed) = pgbench_through_two_restarts(false);
    assert_eq!(moved_in, [50, 50], "every pgbench client moved, twice\n{report}");
    assert_eq!(listed, 50, "the last process lists them all in SHOW CLIENTS");
    assert_eq!(transactions(&report, "number of failed transactions: "), 0, "{report}");
    assert!(transactions(&report, "number of transactions actually processed: ") > 0, "{report}");
    assert!(!report.contains("aborted"), "{report}");
}

#[test]
fn pgbench_with_a_connection_per_transaction_runs_through_two_restarts() {
    let (report, moved_in, _) = pgbench_through_two_restarts(true);
    assert_eq!(moved_in.len(), 2, "two takeovers\n{report}");
    assert_eq!(transactions(&report, "number of failed transactions: "), 0, "{report}");
    assert!(transactions(&report, "number of transactions actually processed: ") > 0, "{report}");
    assert!(!report.contains("aborted"), "{report}");
}

/// A session-pooling client holds its server for its whole session: it cannot move without it,
/// so it stays on the old process, which serves it until it leaves, and only then exits. New
/// clients go to the new process meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_pooling_client_stays_on_the_old_process_until_it_leaves() {
    let pg = Postgres::shared();
    let db = pg.create_database("reboot_sessionmode");
    let mut old = Pooler::start(
        &pool_ini(pg, &db, "pool_size=2", "session", &format!("admin_users = {APP_USER}")),
        &app_userlist(),
    );
    let staying = old.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let pid_before = first_value(&staying, "SELECT pg_backend_pid()").await.unwrap();
    let new = old.reboot().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!old.has_exited(), "the old process still serves its session client");
    assert_eq!(
        first_value(&staying, "SELECT pg_backend_pid()").await.unwrap(),
        pid_before,
        "still on its own server, in the old process"
    );
    let newcomer = new.connect(APP_USER, APP_PASSWORD, &db).await.expect("new clients reach the new process");
    assert_eq!(first_value(&newcomer, "SELECT 1").await.unwrap(), "1");
    drop(staying);
    assert!(
        wait_until(Duration::from_secs(10), || old.has_exited()),
        "the old process exits once its client left"
    );
    assert_eq!(first_value(&newcomer, "SELECT 2").await.unwrap(), "2");
}

/// The new process dies in the middle of the takeover: the old one takes its listening
/// sockets back, goes on serving the client that had not moved yet (it was in a transaction),
/// accepts new clients again, and can be taken over again later.
#[tokio::test(flavor = "multi_thread")]
async fn if_the_new_process_dies_the_old_one_listens_again() {
    let pg = Postgres::shared();
    let db = pg.create_database("reboot_dies");
    let mut old = Pooler::start(&ini(pg, &db), &app_userlist());
    let in_transaction = old.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    in_transaction.batch_execute("BEGIN").await.unwrap();
    first_value(&in_transaction, "SELECT 1").await.unwrap();
    let mut doomed = old.reboot().unwrap();
    doomed.signal(libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(5), || doomed.has_exited()));
    assert!(
        wait_until(Duration::from_secs(5), || old
            .log()
            .contains("listening again on the sockets handed over")),
        "{}",
        old.log()
    );
    assert!(!old.has_exited(), "the old process stays");
    assert_eq!(first_value(&in_transaction, "SELECT 2").await.unwrap(), "2");
    in_transaction.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        first_value(&in_transaction, "SELECT 3").await.unwrap(),
        "3",
        "served here after its transaction"
    );
    let newcomer = old.connect(APP_USER, APP_PASSWORD, &db).await.expect("the old process accepts again");
    assert_eq!(first_value(&newcomer, "SELECT 4").await.unwrap(), "4");

    // And a later takeover works.
    let new = old.reboot().unwrap();
    assert!(wait_until(Duration::from_secs(10), || old.has_exited()), "{}", new.log());
    assert_eq!(first_value(&newcomer, "SELECT 5").await.unwrap(), "5");
    assert_eq!(first_value(&in_transaction, "SELECT 6").await.unwrap(), "6");
}

/// A TLS client cannot move: its session keys live in the old process's OpenSSL. It is let go
/// between transactions, never in the middle of one, and its driver reconnects, over TLS, to
/// the new process; the old process does not wait for it.
#[test]
fn a_tls_client_is_let_go_between_transactions_and_reconnects_to_the_new_process() {
    use std::io::{BufRead, BufReader, Write};
    let pg = Postgres::shared();
    let db = pg.create_database("reboot_tls");
    let certs = Certs::make();
    let general = format!(
        "client_tls_sslmode = require\nclient_tls_key_file = {}\nclient_tls_cert_file = {}\n",
        certs.server_key.display(),
        certs.server_cert.display()
    );
    let mut old = Pooler::start(&pool_ini(pg, &db, "", "transaction", &general), &app_userlist());
    let script = r#"
import os, sys, psycopg
dsn = f"host=127.0.0.1 port={os.environ['PORT']} user=app_user password=app-pass dbname={os.environ['DB']} sslmode=require"
conn = psycopg.connect(dsn, autocommit=True)
print("before", conn.execute("SELECT 1").fetchone()[0], conn.info.pgconn.ssl_in_use, flush=True)
sys.stdin.readline()
try:
    conn.execute("SELECT 2")
    print("after: still served", flush=True)
except psycopg.Error as e:
    print("after: let go", flush=True)
with psycopg.connect(dsn) as again:
    print("again", again.execute("SELECT 3").fetchone()[0], again.info.pgconn.ssl_in_use, flush=True)
"#;
    let path = old.dir.join("tls_client.py");
    std::fs::write(&path, script).unwrap();
    let mut child = Command::new(python())
        .arg(&path)
        .env("PORT", old.port.to_string())
        .env("DB", &db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "before 1 True");
    let new = old.reboot().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || old.has_exited()),
        "the old process waits for no TLS client\n{}",
        new.log()
    );
    assert!(
        old.log().contains("pgcorral is restarting; reconnect (TLS sessions cannot move)"),
        "{}",
        old.log()
    );
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "after: let go");
    assert_eq!(lines.next().unwrap().unwrap(), "again 3 True", "reconnected over TLS to the new process");
    assert!(child.wait().unwrap().success());
}
