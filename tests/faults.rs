//! Faults production brings: backends terminated under a client or while idle, a thousand
//! clients that vanish mid-transaction without a Terminate, a postmaster that stops answering
//! cancel requests. Each must fail only whom it must, and leave no server, slot or permit behind.

mod support;

use std::time::Duration;

use support::*;

fn count(pg: &Postgres, sql: &str) -> usize {
    pg.sql(sql).parse().unwrap()
}

#[tokio::test]
async fn terminated_backends_fail_only_the_client_holding_them() {
    let pg = Postgres::shared();
    let db = pg.create_database("terminate");
    let pooler = Pooler::start(&pool_ini(pg, &db, "pool_size=2", "transaction", ""), &app_userlist());
    let holder = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let bystander = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let held_pid = first_value(&holder, "SELECT pg_backend_pid()").await.unwrap();
    assert_eq!(first_value(&bystander, "SELECT 1").await.unwrap(), "1");

    pg.sql(&format!("SELECT pg_terminate_backend({held_pid})"));
    let err = first_value(&holder, "SELECT 1").await.expect_err("the holder's server is gone");
    let code = err.code().cloned();
    assert!(
        code == Some(tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)
            || code == Some(tokio_postgres::error::SqlState::CONNECTION_FAILURE)
            || err.is_closed(),
        "{err:?}"
    );
    assert_eq!(first_value(&bystander, "SELECT 2").await.unwrap(), "2", "the bystander was disturbed");

    // An idle server terminated: nobody notices, it is replaced before being lent.
    let idle_pid = first_value(&bystander, "SELECT pg_backend_pid()").await.unwrap();
    pg.sql(&format!("SELECT pg_terminate_backend({idle_pid})"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        assert_eq!(first_value(&bystander, &format!("SELECT {i}")).await.unwrap(), i.to_string());
    }
    let fresh = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&fresh, "SELECT 3").await.unwrap(), "3");
}

#[tokio::test]
async fn a_thousand_vanishing_clients_leak_nothing() {
    let pg = Postgres::shared();
    let db = pg.create_database("vanish");
    pg.sql_db(&db, "CREATE TABLE t (v int); ALTER TABLE t OWNER TO app_user;");
    // query_wait_timeout turns a leaked permit into an error instead of a hang.
    let pooler = Pooler::start(
        &pool_ini(pg, &db, "pool_size=5", "transaction", "max_client_conn = 120\nquery_wait_timeout = 20"),
        &app_userlist(),
    );
    let url = pooler.url(APP_USER, APP_PASSWORD, &db);
    for batch in 0..20 {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                let connection = tokio::spawn(connection);
                // Inside a transaction, with an uncommitted row...
                client.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({});", batch * 50 + i)).await?;
                // ...the socket just goes away: no ROLLBACK, no Terminate.
                connection.abort();
                let _ = connection.await;
                Ok::<_, tokio_postgres::Error>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().expect("client transaction");
        }
    }
    // PostgreSQL: no uncommitted row survived, nothing idle in transaction, at most the pool.
    let in_txn =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in%'");
    let mut settled = false;
    for _ in 0..200 {
        if count(pg, &in_txn) == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled, "backends stayed idle in transaction");
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM t"), "0");
    let backends = count(pg, &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"));
    assert!(backends <= 5, "{backends} backends for pool_size 5");

    // pgcorral's accounting: all client slots and all five server permits are free again.
    let mut holders = Vec::new();
    for _ in 0..5 {
        let c = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("client slot");
        c.batch_execute("BEGIN").await.expect("a server permit for each of 5 transactions");
        holders.push(c);
    }
    let mut others = Vec::new();
    for _ in 0..110 {
        others.push(
            pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("max_client_conn slots were leaked"),
        );
    }
    for c in &holders {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(first_value(&others[109], "SELECT 'ok'").await.unwrap(), "ok");
}

/// Stops (SIGSTOP) or resumes (SIGCONT) the postmaster: TCP connections to it still complete
/// in the kernel's backlog, but nothing reads them, so a cancel request goes nowhere.
fn signal_postmaster(pg: &Postgres, signal: i32) {
    let pidfile = std::fs::read_to_string(pg.data_dir.join("postmaster.pid")).expect("postmaster.pid");
    let pid: i32 = pidfile.lines().next().and_then(|l| l.trim().parse().ok()).expect("pid in postmaster.pid");
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to the postmaster");
}

// Two threads: the query runs in a spawned task while this one waits synchronously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_cancel_ends_its_client_after_cancel_wait_timeout() {
    let pg = Postgres::start();
    let pooler = Pooler::start(
        &pool_ini(&pg, APP_DB, "pool_size=2", "transaction", "cancel_wait_timeout = 1\nadmin_users = admin"),
        &(app_userlist() + &Pooler::userlist_line("admin", "admin-pass")),
    );
    let console = pooler.connect("admin", "admin-pass", "pgbouncer").await.unwrap();
    let victim = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.unwrap();
    let token = victim.cancel_token();
    let running =
        tokio::spawn(async move { victim.batch_execute("SELECT pg_sleep(4) /* stuck_cancel */").await });
    let on_server =
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%stuck_cancel%' AND pid <> pg_backend_pid()";
    assert!(wait_until(Duration::from_secs(10), || count(&pg, on_server) == 1), "the query never started");

    signal_postmaster(&pg, libc::SIGSTOP);
    token.cancel_query(tokio_postgres::NoTls).await.expect("the pooler takes the cancel request");
    // While it hangs, the console counts it as PgBouncer would.
    let mut cancels = None;
    for _ in 0..40 {
        let pools = console.simple_query("SHOW POOLS").await.unwrap();
        cancels = pools.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some(APP_DB) => Some((
                r.get("cl_active_cancel_req").unwrap().to_string(),
                r.get("sv_active_cancel").unwrap().to_string(),
            )),
            _ => None,
        });
        if cancels == Some(("1".into(), "1".into())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cancels, Some(("1".into(), "1".into())), "the cancel in flight shows in SHOW POOLS");
    let outcome = running.await.unwrap();
    signal_postmaster(&pg, libc::SIGCONT);

    // The client is told, rather than left with a server that a late cancel could still hit.
    let err = outcome.expect_err("the client of an undeliverable cancel is disconnected");
    assert!(format!("{err:?}").contains("cancel_wait_timeout"), "{err:?}");
    // That server was closed, never lent to the next client; the pool serves on.
    let next = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.unwrap();
    assert_eq!(first_value(&next, "SELECT 5").await.unwrap(), "5");
    assert!(
        wait_until(Duration::from_secs(10), || count(&pg, on_server) == 0),
        "the cancelled server lingers"
    );
}
