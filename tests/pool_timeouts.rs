//! Pool policy keys that close, check or refuse on a clock — query_wait_timeout,
//! server_idle_timeout, server_lifetime, client_login_timeout, server_connect_timeout,
//! transaction_timeout, server_check_delay, the bound on pgcorral's own queries — and pools healing after a PostgreSQL restart. Timeouts are set to a second or so; assertions only bound liveness.

mod support;

use std::io::Read;
use std::time::Duration;

use support::*;

async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn query_wait_timeout_disconnects_a_waiting_client() {
    let pg = Postgres::shared();
    let db = pg.create_database("qwait");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "query_wait_timeout = 1"),
        &app_userlist(),
    );
    let holder = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap(); // keeps the only server
    let waiter = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let err = first_value(&waiter, "SELECT 1").await.expect_err("the waiter must be refused");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::PROTOCOL_VIOLATION), "{err:?}");
    assert!(format!("{err:?}").contains("query_wait_timeout"), "{err:?}");
    // The holder is undisturbed and the server is free again afterwards.
    assert_eq!(first_value(&holder, "SELECT 7").await.unwrap(), "7");
    holder.batch_execute("COMMIT").await.unwrap();
    let next = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&next, "SELECT 8").await.unwrap(), "8");
}

#[tokio::test]
async fn server_idle_timeout_closes_idle_servers_above_min_pool_size() {
    let pg = Postgres::shared();
    let db = pg.create_database("idle");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=3", "transaction", "server_idle_timeout = 1"),
        &app_userlist(),
    );
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&client, "SELECT 1").await.unwrap();
    assert_eq!(backend_count(pg, &db), 1);
    assert!(eventually(|| backend_count(pg, &db) == 0).await, "the idle server was never closed");
    // The client does not notice: its next query gets a new server.
    assert_eq!(first_value(&client, "SELECT 2").await.unwrap(), "2");

    let db = pg.create_database("idle_min");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=3 min_pool_size=1", "transaction", "server_idle_timeout = 1"),
        &app_userlist(),
    );
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&client, "SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(backend_count(pg, &db), 1, "min_pool_size keeps one server despite server_idle_timeout");
}

#[tokio::test]
async fn server_lifetime_replaces_old_servers() {
    let pg = Postgres::shared();
    let db = pg.create_database("lifetime");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "server_lifetime = 1"),
        &app_userlist(),
    );
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let first = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(first, second, "a server past server_lifetime was lent again");
    assert_eq!(backend_count(pg, &db), 1);
}

#[test]
fn client_login_timeout_closes_silent_clients() {
    let pg = Postgres::shared();
    let db = pg.create_database("login_timeout");
    let pooler =
        Pooler::start(&pool_ini(pg, &db, "", "transaction", "client_login_timeout = 1"), &app_userlist());
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", pooler.port)).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf).expect("pgcorral should close the silent client, not leave it hanging");
    assert_eq!(n, 0, "expected a close");
    let out = pooler.psql(APP_USER, APP_PASSWORD, &db, "SELECT 1");
    assert!(out.status.success());
}

#[tokio::test]
async fn server_connect_timeout_fails_clients_fast_when_the_server_never_answers() {
    // A listener that accepts (through its backlog) but never speaks: a hung PostgreSQL.
    let hung = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = hung.local_addr().unwrap().port();
    let pooler = Pooler::start(
        &format!(
            "[databases]\nhung = host=127.0.0.1 port={port} dbname=app\n\
             [pgbouncer]\nauth_type = md5\nserver_connect_timeout = 1\n"
        ),
        &app_userlist(),
    );
    let started = std::time::Instant::now();
    let err = match pooler.connect(APP_USER, APP_PASSWORD, "hung").await {
        Ok(_) => panic!("login through a hung server must fail"),
        Err(e) => e,
    };
    assert!(started.elapsed() < Duration::from_secs(10), "the client hung for {:?}", started.elapsed());
    assert!(format!("{err:?}").contains("timed out"), "{err:?}");
    drop(hung);
}

#[tokio::test]
async fn pools_heal_after_postgres_restarts() {
    let pg = Postgres::start(); // private: a restart must not disturb other tests
    let pooler = Pooler::start(&pool_ini(&pg, APP_DB, "pool_size=2", "transaction", ""), &app_userlist());
    let client = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.unwrap();
    let before = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    pg.restart();
    // The idle server died with PostgreSQL; it is noticed before being lent and replaced.
    let after = first_value(&client, "SELECT pg_backend_pid()").await.expect("query after restart");
    assert_ne!(before, after);
    let fresh = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.unwrap();
    assert_eq!(first_value(&fresh, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn client_idle_timeout_disconnects_idle_clients() {
    let pg = Postgres::shared();
    let db = pg.create_database("client_idle");
    let pooler =
        Pooler::start(&pool_ini(pg, &db, "", "transaction", "client_idle_timeout = 1"), &app_userlist());
    let idle = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&idle, "SELECT 1").await.unwrap(), "1");
    let busy = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    // The busy client keeps talking, so its clock keeps restarting.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(first_value(&busy, "SELECT 2").await.unwrap(), "2");
    }
    assert!(first_value(&idle, "SELECT 1").await.is_err(), "the idle client should have been disconnected");
    assert!(pooler.log().contains("client_idle_timeout") || idle.is_closed());
}

#[tokio::test]
async fn idle_transaction_timeout_rolls_back_and_disconnects() {
    let pg = Postgres::shared();
    let db = pg.create_database("idle_tx");
    pg.sql_db(&db, "CREATE TABLE t (v int); ALTER TABLE t OWNER TO app_user;");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "idle_transaction_timeout = 1"),
        &app_userlist(),
    );
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    client.batch_execute("BEGIN; INSERT INTO t VALUES (1);").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(client.batch_execute("COMMIT").await.is_err(), "the stale transaction must not commit");
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t"), "0");
    let in_txn =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in%'");
    assert!(eventually(|| pg.sql(&in_txn) == "0").await);
    // The pool's only server serves the next client.
    let next = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&next, "SELECT count(*) FROM t").await.unwrap(), "0");
}

#[tokio::test]
async fn query_timeout_ends_a_runaway_query() {
    let pg = Postgres::shared();
    let db = pg.create_database("query_timeout");
    let pooler =
        Pooler::start(&pool_ini(pg, &db, "pool_size=1", "transaction", "query_timeout = 1"), &app_userlist());
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let started = std::time::Instant::now();
    let err = first_value(&client, "SELECT pg_sleep(20)").await.expect_err("the query must be stopped");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(format!("{err:?}").contains("query_timeout"), "{err:?}");
    // Its server was closed, not lent on with a query still running; the pool recovers.
    let sleeping = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep(20)%'"
    );
    assert!(eventually(|| pg.sql(&sleeping) == "0").await, "the runaway query is still running");
    let next = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&next, "SELECT 3").await.unwrap(), "3");
}

#[tokio::test]
async fn postgres_down_fails_clients_within_server_connect_timeout_then_heals() {
    let pg = Postgres::start(); // private: it is stopped and started again
    let pooler = Pooler::start(
        &pool_ini(
            &pg,
            APP_DB,
            "pool_size=2",
            "transaction",
            "server_login_retry = 5\nserver_connect_timeout = 2\nquery_wait_timeout = 60",
        ),
        &app_userlist(),
    );
    let idle = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.unwrap();
    assert_eq!(first_value(&idle, "SELECT 1").await.unwrap(), "1");
    pg.stop();
    // Logging in needs no server (the pool's welcome is known): undisturbed.
    let late = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("login while PostgreSQL is down");
    // A query needs one: it waits while logins are retried, then gets a clear error within
    // server_connect_timeout, not a hang until query_wait_timeout.
    let started = std::time::Instant::now();
    let err = first_value(&late, "SELECT 1").await.expect_err("no server can be had");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::CONNECTION_FAILURE), "{err:?}");
    // Twenty more clients meanwhile get the same error, with one log line per backoff step
    // rather than a login attempt each.
    let others = (0..20).map(|_| async {
        let client = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("login");
        first_value(&client, "SELECT 1").await
    });
    for outcome in futures_util::future::join_all(others).await {
        assert!(outcome.is_err(), "a query was answered with PostgreSQL down");
    }
    // (The log is shown twice, from stderr and from logfile: count distinct lines.)
    let log = pooler.log();
    let attempts = log
        .lines()
        .filter(|l| l.contains("next login attempt"))
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert!(
        (1..=8).contains(&attempts),
        "expected one log line per backoff step, got {attempts}:\n{}",
        pooler.log()
    );

    pg.start_again();
    let mut healed = false;
    for _ in 0..60 {
        if let Ok(c) = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await {
            if first_value(&c, "SELECT 42").await.ok().as_deref() == Some("42") {
                healed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(healed, "pgcorral did not heal after PostgreSQL came back:\n{}", pooler.log());
    assert!(pooler.log().contains("server login works again"));
}

/// pgbench through pgcorral while PostgreSQL restarts under it: only clients holding a server
/// at that moment see an error; the others ride through, and the run goes on to the end.
#[test]
fn pgbench_rides_through_a_postgres_restart() {
    let pg = Postgres::start(); // private: it is restarted
    let pgbench = pg_bin("pgbench");
    let init = std::process::Command::new(&pgbench)
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", APP_USER, APP_DB])
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .expect("run pgbench -i");
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    let pooler = Pooler::start(&pool_ini(&pg, APP_DB, "pool_size=4", "transaction", ""), &app_userlist());

    // 16 clients, 4 servers: at any moment most clients hold none. -P 1 prints one progress
    // line per second; the restart comes at about 3 s of 9.
    let run = std::process::Command::new(&pgbench)
        .args(["-n", "-S", "-c", "16", "-j", "2", "-T", "9", "-P", "1"])
        .args(["-h", "127.0.0.1", "-p", &pooler.port.to_string(), "-U", APP_USER, APP_DB])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pgbench");
    std::thread::sleep(Duration::from_secs(3));
    pg.restart();
    let out = run.wait_with_output().expect("pgbench finishes");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // tps of each progress line from the 7th second on: well after the restart.
    let late_tps: Vec<f64> = report
        .lines()
        .filter_map(|l| l.strip_prefix("progress: "))
        .filter_map(|l| {
            let (secs, rest) = l.split_once(" s, ")?;
            let tps = rest.split_once(" tps")?.0.parse::<f64>().ok()?;
            (secs.parse::<f64>().ok()? >= 7.0).then_some(tps)
        })
        .collect();
    assert!(
        !late_tps.is_empty() && late_tps.iter().all(|&tps| tps > 0.0),
        "transactions stopped after the restart:\n{report}\n{}",
        pooler.log()
    );
    let aborted =
        report.lines().filter(|l| l.contains("aborted in command") || l.contains("aborted while")).count();
    // Those holding one of the 4 servers while PostgreSQL shut its backends down fail, with
    // PostgreSQL's own FATAL passed on; 4 in the runs seen. The shutdown is not one instant
    // (a server can be lent again just before its backend is told), so the bound is looser.
    assert!(aborted <= 8, "{aborted} of 16 clients aborted; most should ride through:\n{report}");
}

#[tokio::test]
async fn server_round_robin_lends_the_oldest_idle_server() {
    let pg = Postgres::shared();
    for (round_robin, expect_same) in [("0", true), ("1", false)] {
        let db = pg.create_database("round_robin");
        let pooler = Pooler::start(
            &format!(
                "{}workers = 1\n",
                pool_ini(
                    pg,
                    &db,
                    "pool_size=2",
                    "transaction",
                    &format!("server_round_robin = {round_robin}")
                )
            ),
            &app_userlist(),
        );
        // Two servers: open both with two concurrent transactions.
        let a = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
        let b = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
        a.batch_execute("BEGIN").await.unwrap();
        b.batch_execute("BEGIN").await.unwrap();
        a.batch_execute("COMMIT").await.unwrap();
        b.batch_execute("COMMIT").await.unwrap();
        let first = first_value(&a, "SELECT pg_backend_pid()").await.unwrap();
        let second = first_value(&a, "SELECT pg_backend_pid()").await.unwrap();
        // LIFO reuses the server just returned; round robin takes the other one.
        assert_eq!(first == second, expect_same, "server_round_robin = {round_robin}");
    }
}

#[tokio::test]
async fn query_wait_notify_tells_a_waiting_client() {
    use futures_util::StreamExt;
    let pg = Postgres::shared();
    let db = pg.create_database("wait_notify");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "query_wait_notify = 1"),
        &app_userlist(),
    );
    let holder = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let (waiter, mut connection) =
        tokio_postgres::connect(&pooler.url(APP_USER, APP_PASSWORD, &db), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = message {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    let query = tokio::spawn(async move { first_value(&waiter, "SELECT 'served'").await });
    let notice =
        tokio::time::timeout(Duration::from_secs(10), notices.recv()).await.expect("a notice").unwrap();
    assert!(notice.contains("client being queued"), "{notice}");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(query.await.unwrap().unwrap(), "served", "the waiter is still served after the notice");
}

#[tokio::test]
async fn transaction_timeout_ends_long_transactions_not_long_sessions() {
    let pg = Postgres::shared();
    let db = pg.create_database("txn_timeout");
    pg.sql_db(&db, "CREATE TABLE t (v int); ALTER TABLE t OWNER TO app_user;");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "transaction_timeout = 1"),
        &app_userlist(),
    );
    // Short transactions for longer than the timeout, back to back: never disturbed.
    let steady = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    for i in 0..6 {
        steady.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({i}); COMMIT;")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(first_value(&steady, "SELECT count(*) FROM t").await.unwrap(), "6");
    drop(steady);

    // A transaction that stays open, busy with statements all along, is ended and rolled back.
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    client.batch_execute("BEGIN; INSERT INTO t VALUES (100);").await.unwrap();
    let mut ended = None;
    for _ in 0..40 {
        if let Err(e) = client.batch_execute("SELECT pg_sleep(0.1)").await {
            ended = Some(e);
            break;
        }
    }
    let err = ended.expect("a transaction open for 4 s outlived transaction_timeout = 1");
    assert!(format!("{err:?}").contains("transaction timeout"), "{err:?}");
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t WHERE v = 100"), "0");

    // One long statement inside a transaction is stopped on the server too.
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let err = client.batch_execute("SELECT pg_sleep(20)").await.expect_err("must be stopped");
    assert!(format!("{err:?}").contains("transaction timeout"), "{err:?}");
    let sleeping = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep(20)%'"
    );
    assert!(eventually(|| pg.sql(&sleeping) == "0").await, "the statement is still running");
    let next = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&next, "SELECT count(*) FROM t").await.unwrap(), "6");
}

/// Leases through a one-server pool with a check query that counts itself in a sequence.
async fn checks_counted(pg: &Postgres, name: &str, general: &str) -> (String, String, String) {
    let db = pg.create_database(name);
    pg.sql_db(&db, "CREATE SEQUENCE checks; ALTER SEQUENCE checks OWNER TO app_user;");
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=1", "transaction", general), &app_userlist());
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let first_pid = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        first_value(&client, "SELECT 1").await.unwrap();
    }
    let last_pid = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    let checks = pg.sql_db(&db, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM checks");
    (checks, first_pid, last_pid)
}

#[tokio::test]
async fn server_check_query_runs_on_servers_idle_past_server_check_delay() {
    let pg = Postgres::shared();
    let counting = "server_check_query = SELECT nextval('checks')";
    // server_check_delay = 0: every lease of an idle server is checked first. Login borrows
    // the server fresh from its own login (no check), then six queries: six checks.
    let (checks, first, last) =
        checks_counted(pg, "check_always", &format!("{counting}\nserver_check_delay = 0")).await;
    assert_eq!(checks, "6", "one check per lease of an idle server");
    assert_eq!(first, last, "a server that passes its check is lent on");
    // The default delay (30 s): servers in steady use are not checked.
    let (checks, _, _) = checks_counted(pg, "check_default", counting).await;
    assert_eq!(checks, "0");
    // An empty server_check_query turns checking off; PgBouncer's <empty> sends an empty query.
    let (checks, _, _) =
        checks_counted(pg, "check_off", "server_check_query =\nserver_check_delay = 0").await;
    assert_eq!(checks, "0");
    let (checks, first, last) =
        checks_counted(pg, "check_empty", "server_check_query = <empty>\nserver_check_delay = 0").await;
    assert_eq!((checks.as_str(), first), ("0", last), "an empty query is a check that passes");
    // A server failing its check is closed and replaced; the client does not notice.
    let (_, first, last) = checks_counted(
        pg,
        "check_fails",
        "server_check_query = SELECT 1/0 FROM (SELECT nextval('checks')) s\nserver_check_delay = 0",
    )
    .await;
    assert_ne!(first, last, "a server that failed its check was lent again");
}

/// A pooler serving `moved`, pointing at database `from`, that a reload repoints at `to`.
struct Repointed {
    pooler: Pooler,
    ini: String,
}

impl Repointed {
    fn start(pg: &Postgres, from: &str, mode: &str, general: &str) -> Repointed {
        let ini = format!(
            "[databases]\nmoved = host=127.0.0.1 port={} dbname={from}\n\
             [pgbouncer]\nauth_type = md5\npool_mode = {mode}\n{general}\n",
            pg.port
        );
        Repointed { pooler: Pooler::start(&ini, &app_userlist()), ini }
    }

    /// Rewrites the config with `moved` pointing at `to` and sends SIGHUP.
    async fn repoint(&self, from: &str, to: &str) {
        let path = self.pooler.dir.join("pgcorral.ini");
        let current = std::fs::read_to_string(&path).expect("read pgcorral.ini");
        let changed = current.replace(&format!("dbname={from}\n"), &format!("dbname={to}\n"));
        assert_ne!(changed, current, "the config names {from}: {}", self.ini);
        std::fs::write(&path, changed).unwrap();
        self.pooler.signal(libc::SIGHUP);
        let log = || self.pooler.log().contains("connection settings changed");
        assert!(eventually(log).await, "the reload was not applied:\n{}", self.pooler.log());
    }
}

#[tokio::test]
async fn a_reload_that_changes_a_connection_string_reconnects_servers() {
    let pg = Postgres::shared();
    let (from, to) = (pg.create_database("repoint_from"), pg.create_database("repoint_to"));
    let setup = Repointed::start(pg, &from, "transaction", "");
    let client = setup.pooler.connect(APP_USER, APP_PASSWORD, "moved").await.unwrap();
    assert_eq!(first_value(&client, "SELECT current_database()").await.unwrap(), from);
    setup.repoint(&from, &to).await;
    // The same client's next transaction meets a server of the new database; the old idle
    // server is closed rather than lent again.
    assert_eq!(first_value(&client, "SELECT current_database()").await.unwrap(), to);
    assert!(eventually(|| backend_count(pg, &from) == 0).await, "a server of the old database lingers");
}

#[tokio::test]
async fn server_fast_close_ends_sessions_on_outdated_servers() {
    let pg = Postgres::shared();
    for fast_close in [false, true] {
        let (from, to) = (pg.create_database("fast_close_from"), pg.create_database("fast_close_to"));
        let general = format!("server_fast_close = {}", u8::from(fast_close));
        let setup = Repointed::start(pg, &from, "session", &general);
        let session = setup.pooler.connect(APP_USER, APP_PASSWORD, "moved").await.unwrap();
        assert_eq!(first_value(&session, "SELECT current_database()").await.unwrap(), from);
        setup.repoint(&from, &to).await;
        let next = first_value(&session, "SELECT current_database()").await;
        if fast_close {
            // The session's server is outdated and no transaction is open: both go.
            let err = next.expect_err("server_fast_close ends the session");
            assert!(format!("{err:?}").contains("database configuration changed"), "{err:?}");
        } else {
            // PgBouncer's default: the session keeps its server until it ends.
            assert_eq!(next.unwrap(), from);
            drop(session);
        }
        let fresh = setup.pooler.connect(APP_USER, APP_PASSWORD, "moved").await.unwrap();
        assert_eq!(first_value(&fresh, "SELECT current_database()").await.unwrap(), to);
        assert!(eventually(|| backend_count(pg, &from) == 0).await, "the outdated server was reused or kept");
    }
}

#[tokio::test]
async fn database_and_user_entries_override_the_global_timeouts() {
    let pg = Postgres::shared();
    let db = pg.create_database("entry_timeouts");
    // Globally: no query_timeout, a long query_wait_timeout. The [users] entry sets a
    // query_timeout and the [databases] entry a short query_wait_timeout.
    let ini = format!(
        "[databases]\n{db} = host=127.0.0.1 port={port} dbname={db} pool_size=1 query_wait_timeout=1\n\
         [users]\n{APP_USER} = query_timeout=1\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\nquery_timeout = 0\nquery_wait_timeout = 120\n",
        port = pg.port
    );
    let pooler = Pooler::start(&ini, &app_userlist());
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let err = first_value(&client, "SELECT pg_sleep(20)").await.expect_err("the user's query_timeout");
    assert!(format!("{err:?}").contains("query_timeout"), "{err:?}");

    let holder = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap(); // keeps the only server
    let waiter = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let err = first_value(&waiter, "SELECT 1").await.expect_err("the database's query_wait_timeout");
    assert!(format!("{err:?}").contains("query_wait_timeout"), "{err:?}");
    holder.batch_execute("COMMIT").await.unwrap();
}

/// A server that hangs on pgcorral's own round trip (here the reset query, after its client
/// left) is closed once `server_connect_timeout` has passed, instead of holding its pool's only
/// slot for good: the next client is served by a new server long before its query_wait_timeout.
#[tokio::test]
async fn a_server_hung_on_the_reset_query_is_closed_and_its_slot_reused() {
    let pg = Postgres::shared();
    let db = pg.create_database("hung_reset");
    let general =
        "server_reset_query = SELECT pg_sleep(30)\nserver_connect_timeout = 1\nquery_wait_timeout = 20";
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=1", "session", general), &app_userlist());
    let first = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let first_pid = first_value(&first, "SELECT pg_backend_pid()").await.unwrap();
    drop(first);

    let next = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let next_pid =
        first_value(&next, "SELECT pg_backend_pid()").await.expect("served before query_wait_timeout");
    assert_ne!(next_pid, first_pid, "a new server, the hung one was closed");
    assert!(pooler.log().contains("did not answer"), "{}", pooler.log());
}
