//! Session and statement pooling: a session-mode client owns its server until it leaves, and
//! the next client gets it reset; statement mode refuses transaction blocks.

mod support;

use support::*;

#[tokio::test]
async fn session_mode_isolates_temp_tables_and_settings() {
    let pg = Postgres::shared();
    let db = pg.create_database("session");
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=2", "session", ""), &app_userlist());
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
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=1", "session", ""), &app_userlist());
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
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=2", "statement", ""), &app_userlist());
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

#[tokio::test]
async fn notices_and_notifications_pass_through() {
    use futures_util::StreamExt;
    use tokio_postgres::AsyncMessage;
    let pg = Postgres::shared();
    let db = pg.create_database("notify");
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=2", "session", ""), &app_userlist());
    // A client whose connection task hands us its asynchronous messages.
    let (listener, mut connection) =
        tokio_postgres::connect(&pooler.url(APP_USER, APP_PASSWORD, &db), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            let _ = tx.send(message);
        }
    });
    listener
        .batch_execute("LISTEN corral; DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$;")
        .await
        .unwrap();
    let notifier = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    notifier.batch_execute("NOTIFY corral, 'payload 1'").await.unwrap();
    // Session mode: the listener's server delivers the notification when it next talks.
    listener.batch_execute("SELECT 1").await.unwrap();
    let (mut notice, mut notification) = (None, None);
    while let Ok(Some(message)) = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
        match message {
            AsyncMessage::Notice(n) => notice = Some(n.message().to_string()),
            AsyncMessage::Notification(n) => {
                notification = Some((n.channel().to_string(), n.payload().to_string()))
            }
            _ => {}
        }
        if notice.is_some() && notification.is_some() {
            break;
        }
    }
    assert_eq!(notice.as_deref(), Some("hello from plpgsql"));
    assert_eq!(notification, Some(("corral".to_string(), "payload 1".to_string())));
}

#[tokio::test]
async fn pipelined_queries_in_transaction_mode_come_back_in_order() {
    let pg = Postgres::shared();
    let db = pg.create_database("pipeline");
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=1", "transaction", ""), &app_userlist());
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    // tokio-postgres sends all of these before reading any answer: one batch of messages with
    // several Syncs, some failing, which must come back in order and leave the server clean.
    let queries: Vec<String> =
        (0..20).map(|i| if i % 7 == 3 { "SELECT 1/0".to_string() } else { format!("SELECT {i}") }).collect();
    let results = futures_util::future::join_all(queries.iter().map(|q| client.simple_query(q))).await;
    for (i, result) in results.into_iter().enumerate() {
        if i % 7 == 3 {
            assert!(result.is_err(), "query {i} should fail");
        } else {
            let rows = result.unwrap();
            let value = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            });
            assert_eq!(value, Some(i.to_string()), "answer {i} out of order");
        }
    }
    let other = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&other, "SELECT 'clean'").await.unwrap(), "clean");
}
