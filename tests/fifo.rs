//! Waiting clients are served first come, first served, and the reserve pool opens only after
//! a client has waited reserve_pool_timeout.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn peak_backends(pg: &Postgres, db: &str) -> usize {
    pg.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"
    ))
    .parse()
    .unwrap()
}

#[test]
fn three_hundred_clients_are_served_in_arrival_order_without_the_reserve() {
    let pg = Postgres::shared();
    let db = pg.create_database("fifo");
    // One worker: FIFO order is kept per worker, and this test checks the order itself.
    let pooler = Pooler::start(
        &format!(
            "[databases]\n{db} = host=127.0.0.1 port={} pool_size=5 reserve_pool_size=2\n\
             [pgbouncer]\nauth_type = md5\npool_mode = transaction\nmax_client_conn = 400\n\
             reserve_pool_timeout = 3\nworkers = 1\n",
            pg.port
        ),
        &Pooler::userlist_line(APP_USER, APP_PASSWORD),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = pooler.url(APP_USER, APP_PASSWORD, &db);
    let (ranks, peak) = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..300 {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            clients.push(client);
        }
        let finished = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for client in clients {
            let finished = finished.clone();
            tasks.push(tokio::spawn(async move {
                client.simple_query("SELECT pg_sleep(0.01)").await.expect("query");
                finished.fetch_add(1, Ordering::SeqCst)
            }));
            // Arrivals 2 ms apart define the order the pooler sees.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let peak = peak_backends(Postgres::shared(), &db);
        let mut ranks = Vec::new();
        for task in tasks {
            ranks.push(task.await.unwrap());
        }
        (ranks, peak)
    });
    assert_eq!(ranks.len(), 300, "every client finished");
    let displaced = ranks.iter().enumerate().filter(|(arrival, done)| arrival.abs_diff(**done) > 15).count();
    assert!(
        displaced <= 15,
        "{displaced} of 300 clients finished more than 15 places from their arrival order"
    );
    assert!(peak <= 5, "{peak} servers: the reserve opened although nobody waited reserve_pool_timeout");
    assert!(!pooler.log().contains("taking connection from reserve_pool"));
}

#[tokio::test]
async fn the_reserve_opens_after_reserve_pool_timeout() {
    let pg = Postgres::shared();
    let db = pg.create_database("reserve");
    let pooler = Pooler::start(
        &format!(
            "[databases]\n{db} = host=127.0.0.1 port={} pool_size=2 reserve_pool_size=1\n\
             [pgbouncer]\nauth_type = md5\npool_mode = transaction\nreserve_pool_timeout = 1\nworkers = 1\n",
            pg.port
        ),
        &Pooler::userlist_line(APP_USER, APP_PASSWORD),
    );
    let mut holders = Vec::new();
    for _ in 0..2 {
        let c = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
        c.batch_execute("BEGIN").await.unwrap();
        holders.push(c);
    }
    let waiter = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let started = std::time::Instant::now();
    waiter.simple_query("SELECT 1").await.expect("served from the reserve");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the reserve opened before reserve_pool_timeout"
    );
    assert_eq!(peak_backends(pg, &db), 3);
    assert!(pooler.log().contains("taking connection from reserve_pool"));
    for c in &holders {
        c.batch_execute("COMMIT").await.unwrap();
    }
}
