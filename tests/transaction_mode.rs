//! Transaction pooling through real clients: many clients share few servers, session
//! parameters stay with their client, a client killed mid-transaction leaves nothing behind,
//! cancels reach the right query, COPY round-trips, and pgbench runs clean.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn two_hundred_clients_share_ten_servers() {
    let pg = Postgres::shared();
    let db = pg.create_database("txn200");
    pg.sql_db(&db, "CREATE TABLE hits (client int, n int); ALTER TABLE hits OWNER TO app_user;");
    let pooler = Pooler::start(
        &pool_ini(
            pg,
            &db,
            "pool_size=10 reserve_pool_size=2",
            "transaction",
            "max_client_conn = 400\nreserve_pool_timeout = 1",
        ),
        &app_userlist(),
    );

    // Sample what PostgreSQL sees while the clients run.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, peak, db) = (done.clone(), peak.clone(), db.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(backend_count(Postgres::shared(), &db), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = pooler.url(APP_USER, APP_PASSWORD, &db);
    let finished = runtime.block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|client| {
                let url = url.clone();
                tokio::spawn(async move {
                    let (c, conn) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("login");
                    tokio::spawn(conn);
                    for n in 0..5 {
                        c.batch_execute(&format!(
                            "BEGIN; INSERT INTO hits VALUES ({client}, {n}); SELECT pg_sleep(0.002); COMMIT;"
                        ))
                        .await
                        .expect("transaction");
                    }
                })
            })
            .collect();
        let mut finished = 0;
        for task in tasks {
            task.await.expect("client task");
            finished += 1;
        }
        finished
    });
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    assert_eq!(finished, 200);
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM hits"), "1000");
    assert_eq!(pg.sql_db(&db, "SELECT count(DISTINCT client) FROM hits"), "200");
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= 12, "PostgreSQL saw {peak} connections for pool_size 10 + reserve 2");
    assert!(peak >= 2, "the pool was used ({peak} connections)");
}

#[tokio::test]
async fn set_timezone_stays_with_its_client() {
    let pg = Postgres::shared();
    let db = pg.create_database("tz");
    // One server: both clients are certainly lent the same backend.
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "max_client_conn = 400"),
        &app_userlist(),
    );
    let tokyo = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let other = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let default_tz = first_value(&other, "SHOW TimeZone").await.unwrap();
    assert_ne!(default_tz, "Asia/Tokyo");

    tokyo.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    for _ in 0..3 {
        let mine = first_value(&tokyo, "SHOW TimeZone").await.unwrap();
        let theirs = first_value(&other, "SHOW TimeZone").await.unwrap();
        assert_eq!(mine, "Asia/Tokyo");
        assert_eq!(theirs, default_tz, "one client's SET leaked to another");
    }
    // A SET inside a rolled-back transaction does not stick either.
    other.batch_execute("BEGIN; SET TimeZone = 'Europe/Paris'; ROLLBACK;").await.unwrap();
    assert_eq!(first_value(&other, "SHOW TimeZone").await.unwrap(), default_tz);
    assert_eq!(backend_count(pg, &db), 1);
}

#[test]
fn client_killed_inside_a_transaction_leaves_no_trace() {
    let pg = Postgres::shared();
    let db = pg.create_database("killed");
    pg.sql_db(&db, "CREATE TABLE t (v int); ALTER TABLE t OWNER TO app_user;");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "max_client_conn = 400"),
        &app_userlist(),
    );

    let mut psql = Command::new(pg_bin("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &pooler.port.to_string(), "-U", APP_USER, "-d", &db])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    psql.stdin.as_mut().unwrap().write_all(b"BEGIN;\nINSERT INTO t VALUES (42);\n").unwrap();
    let in_txn = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state = 'idle in transaction'"
    );
    assert!(
        wait_until(Duration::from_secs(10), || pg.sql(&in_txn) == "1"),
        "psql never got into its transaction"
    );
    psql.kill().unwrap(); // SIGKILL: no Terminate, no ROLLBACK from the client
    psql.wait().unwrap();

    assert!(
        wait_until(Duration::from_secs(10), || pg.sql(&in_txn) == "0"),
        "a backend stayed idle in transaction"
    );
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t"), "0", "the uncommitted row survived");
    // The pool's only server is usable by the next client, and it is not inside a transaction.
    let out = pooler.psql(APP_USER, APP_PASSWORD, &db, "INSERT INTO t VALUES (1); SELECT count(*) FROM t");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().last(), Some("1"));
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t"), "1");
}

#[tokio::test]
async fn cancel_reaches_the_running_query_and_the_connection_keeps_working() {
    let pg = Postgres::shared();
    let db = pg.create_database("cancel");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=2", "transaction", "max_client_conn = 400"),
        &app_userlist(),
    );
    let sleeper = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let bystander = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let token = sleeper.cancel_token();

    let started = Instant::now();
    let sleeping = tokio::spawn(async move {
        let result = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (sleeper, result)
    });
    // The bystander's query runs on the other server and must not be cancelled.
    let bystander_query = tokio::spawn(async move {
        let r = bystander.simple_query("SELECT pg_sleep(1), 'still here'").await;
        (bystander, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.expect("send cancel");
    let (sleeper, result) = sleeping.await.unwrap();
    let elapsed = started.elapsed();
    let err = result.expect_err("pg_sleep(30) should have been cancelled");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err:?}");
    assert!(elapsed < Duration::from_secs(2), "cancel took {elapsed:?}");

    let (_bystander, r) = bystander_query.await.unwrap();
    r.expect("the other client's query was not cancelled");
    assert_eq!(first_value(&sleeper, "SELECT 41 + 1").await.unwrap(), "42", "connection works after cancel");
}

#[tokio::test]
async fn copy_in_and_out_round_trip_byte_for_byte() {
    use futures_util::{SinkExt, StreamExt};
    let pg = Postgres::shared();
    let db = pg.create_database("copy");
    pg.sql_db(&db, "CREATE TABLE c (id int, body text, n numeric); ALTER TABLE c OWNER TO app_user;");
    // One server, so that tokio-postgres's prepare-then-execute lands on the same backend.
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=1", "transaction", "max_client_conn = 400"),
        &app_userlist(),
    );
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();

    let mut data = Vec::new();
    for i in 0..100_000 {
        data.extend_from_slice(
            format!("{i}\trow {i} with tab\\there and quote '\t{}.{}\n", i * 7, i % 100).as_bytes(),
        );
    }
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(64 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100_000);

    let stream = client.copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(out.len(), data.len());
    assert!(out == data, "COPY OUT differs from what COPY IN sent");
    // The connection is in a clean state afterwards.
    assert_eq!(first_value(&client, "SELECT count(*) FROM c").await.unwrap(), "100000");
}

#[test]
fn pgbench_runs_clean_through_a_small_pool() {
    let pg = Postgres::shared();
    let db = pg.create_database("bench");
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=5", "transaction", "max_client_conn = 400"),
        &app_userlist(),
    );
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", APP_USER, &db])
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    for args in [&["-c", "20", "-j", "2", "-t", "50"][..], &["-M", "extended", "-c", "10", "-t", "50"][..]] {
        let run = Command::new(pg_bin("pgbench"))
            .args(["-n", "-h", "127.0.0.1", "-p", &pooler.port.to_string(), "-U", APP_USER])
            .args(args)
            .arg(&db)
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "pgbench {args:?}: {}{stdout}", String::from_utf8_lossy(&run.stderr));
        let clients: usize = args[args.iter().position(|a| *a == "-c").unwrap() + 1].parse().unwrap();
        let expected =
            format!("number of transactions actually processed: {}/{}", clients * 50, clients * 50);
        assert!(stdout.contains(&expected), "pgbench {args:?}:\n{stdout}");
        assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    }
    assert!(backend_count(pg, &db) <= 5);
    let history: usize = pg.sql_db(&db, "SELECT count(*) FROM pgbench_history").parse().unwrap();
    assert_eq!(history, 20 * 50 + 10 * 50);
}
