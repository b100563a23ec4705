//! When pools come and go: nothing is made for a client before it authenticated, and pools
//! nobody uses are freed (`pool_idle_timeout`, `autodb_idle_timeout`) and made again on demand.

mod support;

use std::time::Duration;

use support::console::show;
use support::*;

const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-pass";

fn userlist() -> String {
    app_userlist() + &Pooler::userlist_line(ADMIN, ADMIN_PASSWORD)
}

fn ini(pg: &Postgres, databases: &str, general: &str) -> String {
    format!(
        "[databases]\n{databases}\n[pgbouncer]\nauth_type = md5\npool_mode = transaction\n\
         admin_users = {ADMIN}\n{general}\n",
    )
    .replace("@PORT@", &pg.port.to_string())
}

/// The (database, user) of every row of SHOW POOLS but the console's own.
async fn pools(pooler: &Pooler) -> Vec<(String, String)> {
    let console = pooler.connect(ADMIN, ADMIN_PASSWORD, "pgbouncer").await.expect("admin login");
    let table = show(&console, "SHOW POOLS").await;
    let rows = table.rows.iter().filter(|row| row["database"] != "pgbouncer");
    rows.map(|row| (row["database"].clone(), row["user"].clone())).collect()
}

fn sqlstate(error: &tokio_postgres::Error) -> String {
    error.as_db_error().map_or_else(|| format!("{error:?}"), |db| db.code().code().to_string())
}

async fn until_pools(pooler: &Pooler, want: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    for _ in 0..200 {
        let now = pools(pooler).await;
        if want(&now) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pools(pooler).await
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_leave_no_pool_behind() {
    let pg = Postgres::shared();
    let db = pg.create_database("lifecycle_junk");
    // No user= on the entry: every client name would make a pool of its own.
    let databases = format!("{db} = host=127.0.0.1 port=@PORT@ dbname={db}");
    let pooler = Pooler::start(&ini(pg, &databases, ""), &userlist());

    // 300 guessed names, 50 at a time (max_client_conn is 100).
    for batch in 0..6 {
        let mut attempts = Vec::new();
        for i in 0..50 {
            let url = pooler.url(&format!("guess_{batch}_{i}"), "wrong", &db);
            attempts.push(tokio::spawn(async move { connect_plain(&url).await.map(|_| ()) }));
        }
        for attempt in attempts {
            let error = attempt.await.unwrap().expect_err("an unknown user must be refused");
            assert_eq!(sqlstate(&error), "28P01", "{error:?}");
        }
    }
    // A name that would forge a log line stays on its own line.
    let forger = pooler.url("guess\nFATAL forged line", "wrong", &db);
    assert!(connect_plain(&forger).await.is_err());
    assert!(!pooler.log().lines().any(|line| line.starts_with("FATAL forged")), "{}", pooler.log());
    assert!(pooler.log().contains("guess\\nFATAL forged line"), "the name is logged, escaped");

    // A real user with a wrong password, and one who logs in.
    let error = pooler.connect(APP_USER, "wrong", &db).await.expect_err("wrong password");
    assert_eq!(sqlstate(&error), "28P01");
    assert_eq!(pools(&pooler).await, vec![], "no login succeeded, so no pool exists");
    let app = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("login");
    assert_eq!(first_value(&app, "SELECT 1").await.unwrap(), "1");
    assert_eq!(pools(&pooler).await, vec![(db.clone(), APP_USER.to_string())]);

    // A database that does not exist is only named to a client that authenticated.
    let error = pooler.connect(APP_USER, "wrong", "no_such_db").await.expect_err("wrong password");
    assert_eq!(sqlstate(&error), "28P01", "the password is checked before the database");
    let error = pooler.connect(APP_USER, APP_PASSWORD, "no_such_db").await.expect_err("no such database");
    let message = error.as_db_error().map(|db| db.message().to_string()).unwrap_or_default();
    assert_eq!(message, "no such database: no_such_db", "{error:?}");
    assert_eq!(pools(&pooler).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unused_pool_is_freed_and_made_again_on_the_next_login() {
    let pg = Postgres::shared();
    let db = pg.create_database("lifecycle_idle");
    let databases = format!("{db} = host=127.0.0.1 port=@PORT@ dbname={db}");
    // Servers close after a second idle; the pool goes a second after its last one.
    let general = "server_idle_timeout = 1\npool_idle_timeout = 1";
    let pooler = Pooler::start(&ini(pg, &databases, general), &userlist());

    let app = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("login");
    assert_eq!(first_value(&app, "SELECT 1").await.unwrap(), "1");
    let mine = vec![(db.clone(), APP_USER.to_string())];
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pools(&pooler).await, mine, "a pool with a client stays, however idle");
    drop(app);

    let left = until_pools(&pooler, |now| now.is_empty()).await;
    assert_eq!(left, vec![], "the unused pool was never freed");
    assert!(pooler.log().contains("unused; freed"), "{}", pooler.log());
    assert_eq!(backend_count(pg, &db), 0);

    let app = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("login after the pool was freed");
    assert_eq!(first_value(&app, "SELECT 2").await.unwrap(), "2");
    assert_eq!(pools(&pooler).await, mine);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_a_database_reached_through_the_wildcard_is_freed_after_autodb_idle_timeout() {
    let pg = Postgres::shared();
    let auto = pg.create_database("lifecycle_auto");
    let listed = pg.create_database("lifecycle_listed");
    let databases = format!("{listed} = host=127.0.0.1 port=@PORT@\n* = host=127.0.0.1 port=@PORT@");
    let general = "server_idle_timeout = 1\nautodb_idle_timeout = 1";
    let pooler = Pooler::start(&ini(pg, &databases, general), &userlist());

    for db in [&auto, &listed] {
        let app = pooler.connect(APP_USER, APP_PASSWORD, db).await.expect("login");
        assert_eq!(first_value(&app, "SELECT 1").await.unwrap(), "1");
    }
    let left = until_pools(&pooler, |now| now.len() == 1).await;
    assert_eq!(left, vec![(listed.clone(), APP_USER.to_string())], "only the listed database's pool stays");
    let app = pooler.connect(APP_USER, APP_PASSWORD, &auto).await.expect("login after the pool was freed");
    assert_eq!(first_value(&app, "SELECT 3").await.unwrap(), "3");
}

/// As PgBouncer (1.24+): a database that logs in as its own user keeps `min_pool_size`
/// servers open from start-up on, with no client ever connected, and follows a reload that
/// raises it; such a pool is never freed as unused.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_forces_its_user_keeps_min_pool_size_from_start_up() {
    let pg = Postgres::shared();
    let db = pg.create_database("lifecycle_warm");
    let databases =
        format!("{db} = host=127.0.0.1 port=@PORT@ dbname={db} user={APP_USER} password={APP_PASSWORD}");
    let general = "min_pool_size = 2\npool_idle_timeout = 1";
    let pooler = Pooler::start(&ini(pg, &databases, general), &userlist());
    let servers = |n: usize| wait_until(Duration::from_secs(20), || backend_count(pg, &db) == n);
    assert!(servers(2), "min_pool_size never warmed: {} servers\n{}", backend_count(pg, &db), pooler.log());
    assert_eq!(pools(&pooler).await, vec![(db.clone(), APP_USER.to_string())]);

    let console = pooler.connect(ADMIN, ADMIN_PASSWORD, "pgbouncer").await.expect("admin login");
    console.simple_query("SET min_pool_size = 3").await.expect("SET");
    assert!(servers(3), "the reload's min_pool_size was not kept: {} servers", backend_count(pg, &db));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pools(&pooler).await.len(), 1, "a warm pool is not freed as unused");
}
