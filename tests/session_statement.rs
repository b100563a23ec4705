//! Session and statement pooling: a session-mode client owns its server until it leaves, and
//! the next client gets it reset; statement mode refuses transaction blocks.

mod support;

use support::*;
use tokio_postgres::{Client, SimpleQueryMessage};

fn ini(pg: &Postgres, db: &str, mode: &str, pool_size: usize) -> String {
    format!(
        "[databases]\n{db} = host=127.0.0.1 port={port} dbname={db} pool_size={pool_size}\n\
         [pgbouncer]\nauth_type = md5\npool_mode = {mode}\n",
        port = pg.port
    )
}

fn userlist() -> String {
    Pooler::userlist_line(APP_USER, APP_PASSWORD)
}

async fn first_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    for message in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            return Ok(row.get(0).unwrap_or_default().to_string());
        }
    }
    Ok(String::new())
}

#[tokio::test]
async fn session_mode_isolates_temp_tables_and_settings() {
    let pg = Postgres::shared();
    let db = pg.create_database("session");
    let pooler = Pooler::start(&ini(pg, &db, "session", 2), &userlist());
    let a = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let b = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();

    a.batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1); SET work_mem = '7MB';")
        .await
        .unwrap();
    // Session state survives across transactions for its owner (prepared statements too).
    let stmt = a.prepare("SELECT count(*) FROM mine").await.unwrap();
    let n: i64 = a.query_one(&stmt, &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    assert_eq!(first_value(&a, "SHOW work_mem").await.unwrap(), "7MB");
    // ... and is invisible to the other session.
    assert!(first_value(&b, "SELECT count(*) FROM mine").await.is_err(), "b sees a's temp table");
    assert_ne!(first_value(&b, "SHOW work_mem").await.unwrap(), "7MB");

    // When a leaves, its server is reset before c gets it.
    let a_pid = first_value(&a, "SELECT pg_backend_pid()").await.unwrap();
    let b_pid = first_value(&b, "SELECT pg_backend_pid()").await.unwrap();
    drop(a);
    drop(b);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut reused = false;
    // Clients land on either worker; enough of them certainly meet a's old server.
    for _ in 0..12 {
        let c = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
        let pid = first_value(&c, "SELECT pg_backend_pid()").await.unwrap();
        assert!(first_value(&c, "SELECT count(*) FROM mine").await.is_err(), "temp table survived the reset");
        assert_ne!(first_value(&c, "SHOW work_mem").await.unwrap(), "7MB", "SET survived the reset");
        assert!(pid == a_pid || pid == b_pid, "a new server was opened instead of reusing one");
        reused |= pid == a_pid;
    }
    assert!(reused, "the pool never reused the first session's server");
}

#[tokio::test]
async fn session_mode_client_leaving_mid_transaction_is_rolled_back() {
    let pg = Postgres::shared();
    let db = pg.create_database("session_tx");
    pg.sql_db(&db, "CREATE TABLE t (v int); ALTER TABLE t OWNER TO app_user;");
    let pooler = Pooler::start(&ini(pg, &db, "session", 1), &userlist());
    let a = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1);").await.unwrap();
    drop(a);
    let b = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&b, "SELECT count(*) FROM t").await.unwrap(), "0");
    // b is not inside a's transaction: its commit is its own.
    b.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t"), "1");
}

#[tokio::test]
async fn statement_mode_refuses_transaction_blocks() {
    let pg = Postgres::shared();
    let db = pg.create_database("statement");
    pg.sql_db(&db, "CREATE TABLE t (v int); ALTER TABLE t OWNER TO app_user;");
    let pooler = Pooler::start(&ini(pg, &db, "statement", 2), &userlist());
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();

    let err = client.batch_execute("BEGIN").await.expect_err("BEGIN must be refused");
    assert!(
        format!("{err:?}").contains("transaction blocks not allowed in statement pooling mode"),
        "{err:?}"
    );
    // Nothing was left open on the server, and the client goes on with single statements.
    client.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    assert_eq!(first_value(&client, "SELECT count(*) FROM t").await.unwrap(), "1");
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t"), "1", "the insert was committed on its own");
    let in_txn = pg.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in transaction%'"
    ));
    assert_eq!(in_txn, "0");
    // psql shows the refusal as an error too.
    let out = pooler.psql(APP_USER, APP_PASSWORD, &db, "BEGIN");
    assert!(String::from_utf8_lossy(&out.stderr).contains("transaction blocks not allowed"));
}
