//! `SHUTDOWN WAIT_FOR_SERVERS` and `SHUTDOWN WAIT_FOR_CLIENTS` with PgBouncer's meaning, with
//! clients that keep sending, clients held by PAUSE, and RESUME during the shutdown.
//!
//! WAIT_FOR_SERVERS stops accepting, lets transactions under way finish and exits once every
//! server is back; a client that asks for a server meanwhile is told `server shutting down`
//! at once instead of waiting for nothing. WAIT_FOR_CLIENTS stops accepting and serves the
//! clients it has until they leave. RESUME cancels either shutdown when the pooler was paused,
//! and pgcorral listens again.

mod support;

use std::time::Duration;

use support::*;

fn start(pg: &Postgres, db: &str) -> Pooler {
    let general = format!("admin_users = {APP_USER}");
    Pooler::start(&pool_ini(pg, db, "pool_size=1", "transaction", &general), &app_userlist())
}

async fn console(pooler: &Pooler) -> tokio_postgres::Client {
    pooler.connect(APP_USER, APP_PASSWORD, "pgbouncer").await.expect("console")
}

/// SQLSTATE and message of a server error.
fn server_error(error: &tokio_postgres::Error) -> (String, String) {
    let db = error.as_db_error().unwrap_or_else(|| panic!("not a server error: {error:?}"));
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_for_servers_finishes_open_transactions_and_lets_waiting_clients_go() {
    let pg = Postgres::shared();
    let db = pg.create_database("shutdown_servers");
    let mut pooler = start(pg, &db);
    let in_transaction = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let idle = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&idle, "SELECT 0").await.unwrap();
    in_transaction.batch_execute("BEGIN").await.unwrap();
    first_value(&in_transaction, "SELECT 1").await.unwrap();

    console(&pooler).await.batch_execute("SHUTDOWN WAIT_FOR_SERVERS").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pooler.has_exited(), "a transaction is open");
    assert!(pooler.connect(APP_USER, APP_PASSWORD, &db).await.is_err(), "no new clients");
    // The open transaction goes on sending.
    for n in 2..12 {
        assert_eq!(first_value(&in_transaction, &format!("SELECT {n}")).await.unwrap(), n.to_string());
    }
    // A client that needs a server now would wait for nothing: it is let go at once.
    let answer = tokio::time::timeout(Duration::from_secs(10), first_value(&idle, "SELECT 1")).await;
    let error = answer.expect("let go within 10 s, not held").expect_err("no server for a new transaction");
    assert_eq!(server_error(&error), ("57P01".into(), "server shutting down".into()));
    assert!(!pooler.has_exited());

    in_transaction.batch_execute("COMMIT").await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || pooler.has_exited()), "exits once the server is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_for_clients_serves_clients_that_keep_sending_until_they_leave() {
    let pg = Postgres::shared();
    let db = pg.create_database("shutdown_clients");
    let mut pooler = start(pg, &db);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap());
    }
    let admin = console(&pooler).await;
    admin.batch_execute("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pooler.connect(APP_USER, APP_PASSWORD, &db).await.is_err(), "no new clients");
    // Four clients share one server and go on working, round after round.
    for round in 0..10 {
        for client in &clients {
            assert_eq!(first_value(client, &format!("SELECT {round}")).await.unwrap(), round.to_string());
        }
    }
    assert!(!pooler.has_exited(), "clients are still connected");
    clients.pop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pooler.has_exited(), "three clients are still connected");
    clients.clear();
    assert!(wait_until(Duration::from_secs(5), || pooler.has_exited()), "exits once every client left");
    drop(admin);
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_cancels_a_shutdown_of_a_paused_pooler_and_it_listens_again() {
    let pg = Postgres::shared();
    let db = pg.create_database("shutdown_resume");
    let mut pooler = start(pg, &db);
    let admin = console(&pooler).await;
    let client = std::sync::Arc::new(pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap());
    first_value(&client, "SELECT 1").await.unwrap();

    // Paused, then shut down waiting for clients: the paused client waits, as under PAUSE.
    admin.batch_execute("PAUSE").await.unwrap();
    let held = {
        let client = client.clone();
        tokio::spawn(async move { first_value(&client, "SELECT 'held'").await })
    };
    admin.batch_execute("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "the paused client waits");
    assert!(pooler.connect(APP_USER, APP_PASSWORD, &db).await.is_err(), "no new clients while shutting down");
    let state = admin.simple_query("SHOW STATE").await.unwrap();
    assert!(!state.is_empty());

    admin.batch_execute("RESUME").await.unwrap();
    assert_eq!(held.await.unwrap().unwrap(), "held", "RESUME releases the paused client");
    let newcomer = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("listening again after RESUME");
    assert_eq!(first_value(&newcomer, "SELECT 2").await.unwrap(), "2");
    drop(newcomer);
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pooler.has_exited(), "the shutdown was cancelled: clients leaving does not stop it");
    assert!(pooler.log().contains("canceling shutdown"), "{}", pooler.log());

    // RESUME of WAIT_FOR_SERVERS' own pause cancels that shutdown too.
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    admin.batch_execute("SHUTDOWN WAIT_FOR_SERVERS").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin.batch_execute("RESUME").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pooler.has_exited(), "the server came back, and the cancelled shutdown did not exit");
    assert_eq!(first_value(&client, "SELECT 3").await.unwrap(), "3", "a new transaction gets a server");

    // Without a pause there is nothing to resume, and the shutdown goes on.
    admin.batch_execute("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();
    let error = admin.batch_execute("RESUME").await.expect_err("not paused");
    assert_eq!(server_error(&error).1, "pooler is not paused/suspended");
    drop(client);
    assert!(wait_until(Duration::from_secs(5), || pooler.has_exited()), "the shutdown went on");
}
