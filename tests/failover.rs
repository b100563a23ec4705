//! Databases with several hosts: `host=h1,h2,h3` lists, `load_balance_hosts`, a dead or
//! silent host skipped and tried again after `server_login_retry`, libpq's
//! `target_session_attrs`, and a `read-write` database following a promotion, against a real
//! primary and streaming standbys.

mod support;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// A TCP listener that accepts connections and never says a word, counting them: a host
/// that hangs rather than refuses.
fn silent_host() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            // Kept open, silent, until the test process ends.
            held.push(stream);
        }
    });
    (port, accepted)
}

/// A port nothing listens on: connections are refused at once.
fn refusing_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// What one client's query answers through `pooler`, or its error.
fn ask(pooler: &Pooler, sql: &str) -> Result<String, String> {
    let out = pooler.psql(APP_USER, APP_PASSWORD, APP_DB, sql);
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// Ends every server connection pgcorral has open to `pg`, so that the next query needs a new
/// one.
fn drop_servers(pg: &Postgres) {
    pg.sql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{APP_USER}'"
    ));
    // Gone, and their goodbye sent: pgcorral then sees them closed before lending them.
    let left = || pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP_USER}'"));
    assert!(wait_until(Duration::from_secs(10), || left() == "0"), "backends still there");
}

fn ini(hosts: &str, ports: &str, keys: &str, general: &str) -> String {
    format!(
        "[databases]\n{APP_DB} = host={hosts} port={ports} dbname={APP_DB} {keys}\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\n{general}\n"
    )
}

#[test]
fn a_dead_or_silent_host_is_skipped_within_server_connect_timeout_and_tried_again_after_backoff() {
    let pg = Postgres::shared();
    let (silent, accepted) = silent_host();
    let dead = refusing_port();
    let pooler = Pooler::start(
        &ini(
            "127.0.0.1,127.0.0.1,127.0.0.1",
            &format!("{silent},{dead},{}", pg.port),
            "",
            "server_connect_timeout = 1\nserver_login_retry = 4\ndefault_pool_size = 1",
        ),
        &app_userlist(),
    );
    // Round robin starts at the silent host: it costs one server_connect_timeout, the refusing
    // one nothing, and the client is served by the third.
    let started = Instant::now();
    assert_eq!(ask(&pooler, "SELECT 1"), Ok("1".into()));
    assert!(started.elapsed() < Duration::from_secs(10), "one timeout, not one per host");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Within server_login_retry both failed hosts go last: every new server reaches PostgreSQL
    // first, whichever host round robin starts at.
    for _ in 0..3 {
        drop_servers(pg);
        assert_eq!(ask(&pooler, "SELECT 2"), Ok("2".into()));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the silent host was skipped during its backoff");

    // After it, they are tried again in their turn.
    std::thread::sleep(Duration::from_secs(5));
    for _ in 0..3 {
        drop_servers(pg);
        assert_eq!(ask(&pooler, "SELECT 3"), Ok("3".into()));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the silent host was tried again after its backoff");
    let log = pooler.log();
    assert!(log.contains(": timed out") && log.contains("Connection refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_spreads_servers_evenly_over_two_standbys() {
    let primary = Postgres::start();
    let (first, second) = (primary.start_replica(), primary.start_replica());
    let pooler = Pooler::start(
        &ini(
            "127.0.0.1,127.0.0.1",
            &format!("{},{}", first.port, second.port),
            "load_balance_hosts=round-robin target_session_attrs=standby",
            "default_pool_size = 10\nadmin_users = admin",
        ),
        &(app_userlist() + &Pooler::userlist_line("admin", "admin-pass")),
    );
    // Ten clients each hold a transaction open: ten servers, five per standby.
    let mut clients = Vec::new();
    for _ in 0..10 {
        let client = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("connect through pgcorral");
        client.batch_execute("BEGIN").await.unwrap();
        assert_eq!(first_value(&client, "SELECT pg_is_in_recovery()::text").await.unwrap(), "true");
        clients.push(client);
    }
    let count = |pg: &Postgres| {
        pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP_USER}'"))
    };
    assert_eq!((count(&first), count(&second)), ("5".to_string(), "5".to_string()));
    assert_eq!(count(&primary), "0", "target_session_attrs=standby never reaches the primary");

    // The console names each server's host and port, and the database's whole host list.
    let console = pooler.connect("admin", "admin-pass", "pgbouncer").await.expect("console");
    let servers = console::show(&console, "SHOW SERVERS").await;
    let on = |pg: &Postgres| servers.rows.iter().filter(|r| r["port"] == pg.port.to_string()).count();
    assert_eq!((on(&first), on(&second)), (5, 5), "{:?}", servers.rows);
    assert!(servers.rows.iter().all(|r| r["addr"] == "127.0.0.1"));
    let databases = console::show(&console, "SHOW DATABASES").await;
    let row = databases.row("name", APP_DB);
    assert_eq!(row["host"], "127.0.0.1,127.0.0.1");
    assert_eq!(row["port"], first.port.to_string(), "the first port, as PgBouncer shows it");
}

#[test]
fn prefer_standby_falls_back_to_the_primary_while_the_standby_is_down() {
    let primary = Postgres::start();
    let standby = primary.start_replica();
    let pooler = Pooler::start(
        &ini(
            "127.0.0.1,127.0.0.1",
            &format!("{},{}", primary.port, standby.port),
            "target_session_attrs=prefer-standby",
            "server_login_retry = 1",
        ),
        &app_userlist(),
    );
    let in_recovery = || ask(&pooler, "SELECT pg_is_in_recovery()");
    assert_eq!(in_recovery(), Ok("t".into()), "the standby first, though the primary is listed first");
    standby.stop();
    assert_eq!(in_recovery(), Ok("f".into()), "no standby: the primary serves");
    standby.start_again();
    drop_servers(&primary);
    assert!(
        wait_until(Duration::from_secs(20), || in_recovery() == Ok("t".into())),
        "back on the standby once it is up"
    );
}

/// The failover a `read-write` database rides out: the primary stops, an HA manager promotes
/// the standby a second later, and writes through pgcorral resume on it with no restart or
/// reload. The window from the primary stopping to the first successful write is printed.
#[test]
fn a_read_write_database_follows_the_promotion_of_its_standby() {
    let primary = Postgres::start();
    let standby = primary.start_replica();
    primary.sql_db(APP_DB, &format!("CREATE TABLE writes (n int); GRANT ALL ON writes TO {APP_USER};"));
    let pooler = Pooler::start(
        &ini(
            "127.0.0.1,127.0.0.1",
            &format!("{},{}", primary.port, standby.port),
            "target_session_attrs=read-write load_balance_hosts=disable",
            "server_login_retry = 1\nserver_connect_timeout = 2\nquery_wait_timeout = 3",
        ),
        &app_userlist(),
    );
    // A writer: one INSERT every 50 ms, each through a fresh client login, counting failures.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = Arc::new(parking_lot::Mutex::new(Vec::<(Instant, bool)>::new()));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let url = pooler.url(APP_USER, APP_PASSWORD, APP_DB);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let ok = runtime.block_on(async {
                    let Ok(client) = connect_plain(&url).await else { return false };
                    client.batch_execute(&format!("INSERT INTO writes VALUES ({n})")).await.is_ok()
                });
                writes.lock().push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    primary.stop();
    // From here on, PostgreSQL's primary is gone: any write that succeeds is on the standby.
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(standby.sql("SELECT pg_promote()"), "t");
    let recovered =
        wait_until(Duration::from_secs(60), || writes.lock().iter().any(|(at, ok)| *ok && *at > stopped));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(recovered, "no write succeeded after the promotion:\n{}", pooler.log());
    let writes = writes.lock();
    let before = writes.iter().filter(|(at, ok)| *ok && *at < stopped).count();
    let failed = writes.iter().filter(|(_, ok)| !ok).count();
    let first_after = writes.iter().find(|(at, ok)| *ok && *at > stopped).unwrap().0;
    let window = first_after - stopped;
    println!(
        "failover window: {:.2} s from the primary stopping to the first write on the promoted standby \
         (promoted 1 s after the stop); {failed} of {} writes failed",
        window.as_secs_f64(),
        writes.len()
    );
    assert!(before > 0, "writes went through before the failover");
    // Every write that succeeded is on the new primary (the ones before the stop replicated).
    let rows: usize = standby.sql_db(APP_DB, "SELECT count(*) FROM writes").parse().unwrap();
    assert_eq!(rows, writes.iter().filter(|(_, ok)| *ok).count());
    // Failed writes fell inside the window, not after it.
    assert!(writes.iter().all(|(at, ok)| *ok || *at <= first_after));
}

/// A `standby` database whose only standby is promoted: its idle server learns it at its next
/// query (PostgreSQL reports `in_hot_standby = off` with that query's answer, not to an idle
/// session), is closed as it comes back, and no new server fits, so later clients are refused
/// rather than served by what is now a primary.
#[test]
fn a_standby_database_lets_go_of_a_server_whose_host_was_promoted() {
    let primary = Postgres::start();
    let standby = primary.start_replica();
    let pooler = Pooler::start(
        &ini(
            "127.0.0.1",
            &standby.port.to_string(),
            "target_session_attrs=standby",
            "server_login_retry = 1\nquery_wait_timeout = 2",
        ),
        &app_userlist(),
    );
    let in_recovery = || ask(&pooler, "SELECT pg_is_in_recovery()");
    assert_eq!(in_recovery(), Ok("t".into()));
    assert_eq!(standby.sql("SELECT pg_promote()"), "t");
    let mut answers = Vec::new();
    let let_go = wait_until(Duration::from_secs(20), || {
        let answer = in_recovery();
        answers.push(answer.clone());
        answer.is_err()
    });
    assert!(let_go, "still served by the promoted server: {answers:?}");
    let on_primary = answers.iter().filter(|a| **a == Ok("f".into())).count();
    assert!(on_primary <= 1, "only the query that brought the news ran on the promoted server: {answers:?}");
    let log = pooler.log();
    assert!(log.contains("not standby (in_hot_standby=off"), "{log}");
}
