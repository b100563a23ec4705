//! Replication connections through pgcorral, as PgBouncer 1.23 passes them: pg_basebackup and
//! pg_receivewal (physical, `replication=true`), over plain TCP and TLS, and a logical
//! subscription (`replication=database`) that reaches its publisher through pgcorral.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;

const REPLICATOR: &str = "replicator";
const REPLICATOR_PASSWORD: &str = "replicator-pass";

/// pgcorral in front of `pg`: the clients log in as `replicator`, and pgcorral logs in to
/// PostgreSQL as `postgres` (trusted for replication from 127.0.0.1) for the physical
/// `replication` entry and for `app`.
fn pooler(pg: &Postgres, general: &str) -> Pooler {
    let ini = format!(
        "[databases]\nreplication = host=127.0.0.1 port={port} user=postgres\n\
         {APP_DB} = host=127.0.0.1 port={port} dbname={APP_DB} user=postgres\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\ndefault_pool_size = 1\n\
         admin_users = {REPLICATOR}\n{general}\n",
        port = pg.port
    );
    Pooler::start(&ini, &Pooler::userlist_line(REPLICATOR, REPLICATOR_PASSWORD))
}

fn conninfo(pooler: &Pooler, extra: &str) -> String {
    format!("host=127.0.0.1 port={} user={REPLICATOR} password={REPLICATOR_PASSWORD} {extra}", pooler.port)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(pg_bin(program))
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn check(out: &Output, what: &str, pooler: &Pooler) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        pooler.log()
    );
}

#[test]
fn pg_basebackup_takes_a_backup_through_pgcorral_over_tcp_and_tls() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let tls = format!(
        "client_tls_sslmode = prefer\nclient_tls_key_file = {}\nclient_tls_cert_file = {}\n",
        certs.server_key.display(),
        certs.server_cert.display()
    );
    let pooler = pooler(pg, &tls);
    for sslmode in ["disable", "require"] {
        let target =
            std::env::temp_dir().join(format!("pgcorral-basebackup-{}-{sslmode}", std::process::id()));
        let _ = std::fs::remove_dir_all(&target);
        // -X stream: a second replication connection streams WAL while the first copies files.
        let out = run(
            "pg_basebackup",
            &[
                "-d",
                &conninfo(&pooler, &format!("sslmode={sslmode}")),
                "-D",
                target.to_str().unwrap(),
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        check(&out, &format!("pg_basebackup, sslmode={sslmode}"), &pooler);
        for file in ["PG_VERSION", "backup_label", "global/pg_control"] {
            assert!(target.join(file).exists(), "{file} missing from the backup ({sslmode})");
        }
        let _ = std::fs::remove_dir_all(&target);
    }
    // The pool's one server slot was never needed: replication connections are pairs of their own.
    assert_eq!(pooler.psql(REPLICATOR, REPLICATOR_PASSWORD, APP_DB, "SELECT 1").stdout, b"1\n");
}

#[test]
fn pg_receivewal_streams_wal_through_pgcorral() {
    let pg = Postgres::shared();
    let pooler = pooler(pg, "");
    // pg_receivewal starts at the current segment and stops at `-E`: a megabyte ahead, which
    // the inserts below write while it streams.
    let end = pg.sql("SELECT pg_current_wal_insert_lsn() + 1048576");
    let target = std::env::temp_dir().join(format!("pgcorral-receivewal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(&target).unwrap();
    let mut receiver = Command::new(pg_bin("pg_receivewal"))
        .args(["-d", &conninfo(&pooler, ""), "-D", target.to_str().unwrap(), "-E", &end, "-n", "--no-sync"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pg_receivewal");
    pg.sql("DROP TABLE IF EXISTS receivewal_filler; CREATE TABLE receivewal_filler AS SELECT generate_series(1, 100000) AS n");
    let finished = wait_until(Duration::from_secs(30), || receiver.try_wait().unwrap().is_some());
    if !finished {
        let _ = receiver.kill();
    }
    let out = receiver.wait_with_output().unwrap();
    assert!(finished, "pg_receivewal did not reach {end}:\n{}", pooler.log());
    check(&out, "pg_receivewal", &pooler);
    let received: u64 =
        std::fs::read_dir(&target).unwrap().flatten().map(|f| f.metadata().unwrap().len()).sum();
    assert!(received >= 1 << 20, "only {received} bytes of WAL received");
    let _ = std::fs::remove_dir_all(&target);
}

#[test]
fn a_logical_subscription_reaches_its_publisher_through_pgcorral() {
    let publisher = Postgres::start_with_config("wal_level = logical");
    let subscriber = Postgres::start();
    let pooler = pooler(&publisher, "");
    publisher.sql_db(
        APP_DB,
        "CREATE TABLE items (id int PRIMARY KEY, name text); CREATE PUBLICATION p FOR TABLE items;",
    );
    publisher.sql_db(APP_DB, "INSERT INTO items SELECT g, 'before ' || g FROM generate_series(1, 50) g");
    subscriber.sql_db(APP_DB, "CREATE TABLE items (id int PRIMARY KEY, name text)");
    // The subscription's walsender and its table-sync worker both come through pgcorral.
    subscriber.sql_db(
        APP_DB,
        &format!(
            "CREATE SUBSCRIPTION s CONNECTION '{}' PUBLICATION p",
            conninfo(&pooler, &format!("dbname={APP_DB}"))
        ),
    );
    publisher.sql_db(APP_DB, "INSERT INTO items SELECT g, 'after ' || g FROM generate_series(51, 100) g");
    let copied = wait_until(Duration::from_secs(30), || {
        subscriber.sql_db(APP_DB, "SELECT count(*) FROM items") == "100"
    });
    assert!(
        copied,
        "the subscriber has {} rows:\n{}",
        subscriber.sql_db(APP_DB, "SELECT count(*) FROM items"),
        pooler.log()
    );
    assert_eq!(subscriber.sql_db(APP_DB, "SELECT name FROM items WHERE id = 77"), "after 77");

    // The publisher sees the walsender as pgcorral's connection, named for the subscription.
    let senders = || publisher.sql("SELECT string_agg(application_name, ',') FROM pg_stat_replication");
    assert!(wait_until(Duration::from_secs(20), || senders() == "s"), "walsenders: {}", senders());
    // The console lists the client as a logical replication connection.
    let out = pooler.psql(REPLICATOR, REPLICATOR_PASSWORD, "pgbouncer", "SHOW CLIENTS");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.lines().any(|l| l.contains("|logical|")), "{shown}");
    subscriber.sql_db(APP_DB, "DROP SUBSCRIPTION s");
}

#[test]
fn a_bad_replication_value_is_refused_as_postgresql_refuses_it() {
    let pg = Postgres::shared();
    let pooler = pooler(pg, "");
    let out = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-At",
            "-c",
            "SELECT 1",
            "-d",
            &conninfo(&pooler, &format!("dbname={APP_DB} replication=maybe")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value for parameter \"replication\": \"maybe\""), "{stderr}");
}
