//! Session parameters follow their client in transaction mode, whichever server it is lent:
//! those from the startup packet and its `options`, those changed by `SET` (reported by
//! PostgreSQL or not, list values such as search_path included), and `RESET` goes back to the
//! client's own starting values. Every test shares one or two servers between clients with
//! different values, so a value that leaked from one client to another would show.

mod support;

use support::*;

/// Transaction mode, `pool_size` servers for the test database.
fn pooler(pg: &Postgres, db: &str, pool_size: usize, entry: &str, general: &str) -> Pooler {
    Pooler::start(
        &pool_ini(pg, db, &format!("pool_size={pool_size} {entry}"), "transaction", general),
        &app_userlist(),
    )
}

async fn client(pooler: &Pooler, db: &str, extra: &str) -> tokio_postgres::Client {
    let url = format!("{} {extra}", pooler.url(APP_USER, APP_PASSWORD, db));
    connect_plain(&url).await.expect("login")
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    first_value(client, &format!("SELECT current_setting('{name}')")).await.unwrap()
}

async fn backend_pid(client: &tokio_postgres::Client) -> String {
    first_value(client, "SELECT pg_backend_pid()").await.unwrap()
}

#[tokio::test]
async fn startup_options_follow_their_client_onto_a_shared_server() {
    let pg = Postgres::shared();
    let db = pg.create_database("sp_options");
    let pooler = pooler(pg, &db, 1, "", "");
    let tuned = client(
        &pooler,
        &db,
        r"options='-c search_path=app,\\ public -c statement_timeout=1234 --work-mem=8MB' application_name=tuned",
    )
    .await;
    let plain = client(&pooler, &db, "").await;
    let default_path = show(&plain, "search_path").await;
    assert_eq!(default_path, "\"$user\", public");

    for _ in 0..3 {
        assert_eq!(backend_pid(&tuned).await, backend_pid(&plain).await, "one server for both");
        assert_eq!(show(&tuned, "search_path").await, "app, public");
        assert_eq!(show(&tuned, "statement_timeout").await, "1234ms");
        assert_eq!(show(&tuned, "work_mem").await, "8MB");
        assert_eq!(show(&tuned, "application_name").await, "tuned");
        assert_eq!(show(&plain, "search_path").await, default_path);
        assert_eq!(show(&plain, "statement_timeout").await, "0");
        assert_eq!(show(&plain, "work_mem").await, "4MB");
        assert_eq!(show(&plain, "application_name").await, "");
    }
    assert_eq!(backend_count(pg, &db), 1);
}

#[tokio::test]
async fn set_outside_a_transaction_follows_its_client() {
    let pg = Postgres::shared();
    let db = pg.create_database("sp_set");
    let pooler = pooler(pg, &db, 1, "", "");
    let setter = client(&pooler, &db, "").await;
    let other = client(&pooler, &db, "").await;

    setter
        .batch_execute(
            "SET search_path = app, public; SET statement_timeout = '2s'; SET IntervalStyle = 'iso_8601'",
        )
        .await
        .unwrap();
    // Committed SET persists, rolled-back SET and SET LOCAL do not: as on a direct connection.
    setter.batch_execute("BEGIN; SET work_mem = '16MB'; COMMIT").await.unwrap();
    setter.batch_execute("BEGIN; SET lock_timeout = '7s'; ROLLBACK").await.unwrap();
    setter.batch_execute("BEGIN; SET LOCAL maintenance_work_mem = '99MB'; COMMIT").await.unwrap();
    for _ in 0..3 {
        assert_eq!(backend_pid(&setter).await, backend_pid(&other).await, "one server for both");
        assert_eq!(show(&setter, "search_path").await, "app, public");
        assert_eq!(show(&setter, "statement_timeout").await, "2s");
        assert_eq!(show(&setter, "IntervalStyle").await, "iso_8601");
        assert_eq!(show(&setter, "work_mem").await, "16MB");
        assert_eq!(show(&setter, "lock_timeout").await, "0");
        assert_eq!(show(&setter, "maintenance_work_mem").await, "64MB");
        assert_eq!(show(&other, "search_path").await, "\"$user\", public");
        assert_eq!(show(&other, "statement_timeout").await, "0");
        assert_eq!(show(&other, "IntervalStyle").await, "postgres");
        assert_eq!(show(&other, "work_mem").await, "4MB");
    }
    // The other client's own SET does not disturb the first.
    other.batch_execute("SET statement_timeout = '3s'").await.unwrap();
    assert_eq!(show(&setter, "statement_timeout").await, "2s");
    assert_eq!(show(&other, "statement_timeout").await, "3s");
    // The statement_timeout a client set is the one that cancels its query.
    let err = setter.batch_execute("SET statement_timeout = '100ms'; SELECT pg_sleep(2)").await.unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
    assert_eq!(first_value(&other, "SELECT pg_sleep(0.3)::text").await.unwrap(), "", "3s applies to it");
}

#[tokio::test]
async fn reset_goes_back_to_the_clients_own_start() {
    let pg = Postgres::shared();
    let db = pg.create_database("sp_reset");
    let pooler = pooler(pg, &db, 1, "", "");
    let started = client(&pooler, &db, "options='-c statement_timeout=1234' application_name=started").await;
    let other = client(&pooler, &db, "").await;

    started.batch_execute("SET statement_timeout = '5s'; SET application_name = 'changed'").await.unwrap();
    assert_eq!(show(&started, "statement_timeout").await, "5s");
    assert_eq!(show(&other, "application_name").await, "");
    started.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(show(&started, "statement_timeout").await, "1234ms");
    assert_eq!(show(&started, "application_name").await, "changed");
    started.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&other, "application_name").await, "");
    assert_eq!(show(&started, "statement_timeout").await, "1234ms");
    assert_eq!(show(&started, "application_name").await, "started");
    started.batch_execute("SET search_path = x").await.unwrap();
    started.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(show(&started, "search_path").await, "\"$user\", public");
    assert_eq!(show(&started, "application_name").await, "started");
    assert_eq!(show(&other, "statement_timeout").await, "0");

    // pgcorral knows what a query ending in RESET ALL leaves without asking; one that goes on
    // after it, or fails before it, is read back.
    started.batch_execute("RESET ALL; SET work_mem = '16MB'").await.unwrap();
    assert_eq!(show(&started, "work_mem").await, "16MB");
    assert!(started.batch_execute("SELECT 1/0; RESET ALL").await.is_err());
    assert_eq!(show(&started, "work_mem").await, "16MB", "the failed query never reached its RESET ALL");
    assert_eq!(show(&other, "work_mem").await, "4MB");
    started
        .batch_execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
        .await
        .unwrap();
    assert_eq!(show(&started, "work_mem").await, "4MB");
    assert_eq!(show(&started, "statement_timeout").await, "1234ms");
}

#[tokio::test]
async fn connect_query_values_stay_the_default_for_everyone() {
    let pg = Postgres::shared();
    let db = pg.create_database("sp_connect_query");
    let pooler = pooler(pg, &db, 1, "connect_query='SET search_path = base, public'", "");
    let setter = client(&pooler, &db, "").await;
    let other = client(&pooler, &db, "").await;
    assert_eq!(show(&other, "search_path").await, "base, public");
    setter.batch_execute("SET search_path = mine").await.unwrap();
    assert_eq!(show(&setter, "search_path").await, "mine");
    assert_eq!(show(&other, "search_path").await, "base, public");
    setter.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(show(&other, "search_path").await, "base, public");
    setter.batch_execute("SET search_path = mine").await.unwrap();
    setter.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&setter, "search_path").await, "base, public");
    assert_eq!(show(&other, "search_path").await, "base, public");
}

#[tokio::test]
async fn many_clients_with_their_own_values_on_two_servers() {
    let pg = Postgres::shared();
    let db = pg.create_database("sp_many");
    let pooler = pooler(pg, &db, 2, "", "");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = format!(
            "{} options='-c search_path=s{i} -c statement_timeout={}'",
            pooler.url(APP_USER, APP_PASSWORD, &db),
            1001 + i
        );
        tasks.push(tokio::spawn(async move {
            let c = connect_plain(&url).await.expect("login");
            for round in 0..10 {
                if i % 2 == 0 && round == 5 {
                    c.batch_execute(&format!("SET TimeZone = 'Etc/GMT-{}'", i % 12)).await.unwrap();
                }
                let row = c
                    .simple_query(
                        "SELECT current_setting('search_path'), current_setting('statement_timeout'), \
                         current_setting('TimeZone')",
                    )
                    .await
                    .unwrap();
                let Some(row) = row.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                }) else {
                    panic!("no row")
                };
                assert_eq!(row.get(0), Some(format!("s{i}").as_str()), "client {i} round {round}");
                assert_eq!(row.get(1), Some(format!("{}ms", 1001 + i).as_str()));
                if i % 2 == 0 && round >= 5 {
                    assert_eq!(row.get(2), Some(format!("Etc/GMT-{}", i % 12).as_str()));
                } else {
                    assert_ne!(row.get(2).unwrap_or_default(), "", "{i}");
                    assert!(
                        !row.get(2).unwrap_or_default().starts_with("Etc/GMT-"),
                        "client {i} round {round}"
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(backend_count(pg, &db) <= 2);
}

#[test]
fn options_that_no_server_could_honour_are_refused() {
    let pg = Postgres::shared();
    let db = pg.create_database("sp_refused");
    let pooler = pooler(pg, &db, 1, "", "");
    let psql = |options: &str| {
        std::process::Command::new(pg_bin("psql"))
            .args(["-X", "-At", "-h", "127.0.0.1", "-p", &pooler.port.to_string(), "-U", APP_USER, "-d", &db])
            .args(["-c", "SELECT current_setting('work_mem')"])
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGOPTIONS", options)
            .output()
            .unwrap()
    };
    let out = psql("-c work_mem=5MB");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5MB");

    let out = psql("-B 100");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported options startup parameter"), "{err}");
    // A parameter PostgreSQL does not know is its own error, on the first query.
    let out = psql("-c no_such_parameter=1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no_such_parameter"), "{err}");
    // The daemon and the pool are fine afterwards.
    let out = psql("");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4MB");
}

#[tokio::test]
async fn reported_values_follow_clients_that_reset_after_every_transaction() {
    // asyncpg's pattern: every release ends in RESET ALL, so each lease must put the client's
    // application_name and TimeZone back on the server, ahead of whatever the client sends,
    // simple or extended, failing or not.
    let pg = Postgres::shared();
    let db = pg.create_database("sp_reported");
    let pooler = pooler(pg, &db, 1, "", "");
    let tokyo = client(&pooler, &db, "application_name=alpha options='-c TimeZone=Asia/Tokyo'").await;
    let plain = client(&pooler, &db, "application_name=beta").await;
    let default_zone = show(&plain, "TimeZone").await;
    assert_ne!(default_zone, "Asia/Tokyo");
    for _ in 0..5 {
        tokyo.batch_execute("RESET ALL").await.unwrap();
        plain.batch_execute("RESET ALL").await.unwrap();
        assert_eq!(show(&tokyo, "application_name").await, "alpha");
        assert_eq!(show(&tokyo, "TimeZone").await, "Asia/Tokyo");
        let failed = plain.simple_query("SELECT 1/0").await.unwrap_err();
        assert_eq!(failed.code().map(|c| c.code()), Some("22012"), "{failed}");
        let row = tokyo.query_one("SELECT current_setting('TimeZone'), $1::text", &[&"x"]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "Asia/Tokyo");
        assert_eq!(show(&plain, "application_name").await, "beta");
        assert_eq!(show(&plain, "TimeZone").await, default_zone);
        assert_eq!(backend_pid(&tokyo).await, backend_pid(&plain).await, "one server for both");
    }
    assert_eq!(backend_count(pg, &db), 1);
}
