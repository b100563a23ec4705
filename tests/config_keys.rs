//! pgbouncer.ini keys as an operator sees their effect: the Unix socket, the `*` fallback
//! database, pool sizing and limits (`min_pool_size`, `max_db_connections`,
//! `max_user_connections`, `[users]` overrides, `workers`), startup-parameter policy, the
//! connection settings of a `[databases]` entry, and `server_reset_query_always`. Each test
//! checks what PostgreSQL itself reports (`pg_stat_activity`) or what a client sees through the
//! pooler, on a database of its own so that counts are not polluted by other tests.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

/// A bound far beyond what any of these workloads needs, so that only a hang trips it.
const LIVENESS: Duration = Duration::from_secs(60);

/// `[databases]` with one entry for `db`, then `[pgbouncer]` settings after the harness's own.
fn ini(pg: &Postgres, db: &str, entry_options: &str, general: &str) -> String {
    format!(
        "[databases]\n{db} = host=127.0.0.1 port={port} dbname={db} {entry_options}\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\nmax_client_conn = 400\n{general}",
        port = pg.port
    )
}

/// Plain passwords: they answer the client's md5 and whatever PostgreSQL asks for.
fn userlist() -> String {
    [Pooler::userlist_line(APP_USER, APP_PASSWORD), Pooler::userlist_line(MD5_USER, MD5_PASSWORD)].concat()
}

/// Client backends PostgreSQL has open to `db`: the pooler's servers, since the tests connect
/// only through it.
fn backends(pg: &Postgres, db: &str) -> usize {
    count(pg, &format!("datname = '{db}'"))
}

fn backends_of(pg: &Postgres, db: &str, user: &str) -> usize {
    count(pg, &format!("datname = '{db}' AND usename = '{user}'"))
}

fn count(pg: &Postgres, filter: &str) -> usize {
    pg.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND {filter}"
    ))
    .parse()
    .unwrap()
}

/// Polls `measure` every 20 ms on its own thread while a workload runs, keeping the peak.
struct Sampler {
    done: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(measure: impl Fn() -> usize + Send + 'static) -> Sampler {
        let done = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (done, peak) = (done.clone(), peak.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(measure(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Sampler { done, peak, thread }
    }

    fn peak(self) -> usize {
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler thread");
        self.peak.load(Ordering::Relaxed)
    }
}

/// `clients` concurrent logins to `url`, each running `sql` `rounds` times as separate
/// transactions; returns how many clients finished, or an error naming the hang.
fn run_clients(urls: &[String], clients: usize, rounds: usize, sql: &str) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for url in urls {
            for _ in 0..clients {
                let (url, sql) = (url.clone(), sql.to_string());
                tasks.push(tokio::spawn(async move {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    for _ in 0..rounds {
                        c.simple_query(&sql).await?;
                    }
                    Ok::<_, tokio_postgres::Error>(())
                }));
            }
        }
        let all = async {
            let mut finished = 0;
            for task in tasks {
                task.await.expect("client task").map_err(|e| format!("client failed: {e:?}"))?;
                finished += 1;
            }
            Ok(finished)
        };
        tokio::time::timeout(LIVENESS, all)
            .await
            .unwrap_or_else(|_| Err(format!("clients still waiting after {LIVENESS:?}")))
    })
}

/// The first value of the first row of a simple-protocol query (transaction mode rules out
/// tokio-postgres's prepare-then-execute).
async fn first_value(client: &tokio_postgres::Client, sql: &str) -> String {
    row_values(client, sql).await.swap_remove(0)
}

async fn row_values(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    for message in messages {
        if let SimpleQueryMessage::Row(row) = message {
            return (0..row.len()).map(|i| row.get(i).unwrap_or_default().to_string()).collect();
        }
    }
    panic!("{sql} returned no row")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn unix_socket_accepts_clients() {
    let pg = Postgres::shared();
    let db = pg.create_database("unix");
    let pooler = Pooler::start(&ini(pg, &db, "", ""), &userlist());
    // libpq takes a directory as host and finds .s.PGSQL.<port> in it, as with PgBouncer.
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-h"])
        .arg(&pooler.dir)
        .arg("-p")
        .arg(pooler.port.to_string())
        .args(["-U", APP_USER, "-d", &db, "-c", "SELECT current_user || '@' || current_database()"])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGOPTIONS")
        .output()
        .unwrap();
    assert!(out.status.success(), "psql over the Unix socket: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{APP_USER}@{db}"));
}

#[tokio::test]
async fn fallback_database_serves_any_name() {
    let pg = Postgres::shared();
    let first = pg.create_database("fallback_a");
    let second = pg.create_database("fallback_b");
    let pooler = Pooler::start(
        &format!(
            "[databases]\n* = host=127.0.0.1 port={}\n[pgbouncer]\nauth_type = md5\npool_mode = transaction\n",
            pg.port
        ),
        &userlist(),
    );
    for db in [&first, &second] {
        let client =
            pooler.connect(APP_USER, APP_PASSWORD, db).await.unwrap_or_else(|e| panic!("{db}: {e:?}"));
        assert_eq!(&first_value(&client, "SELECT current_database()").await, db);
    }
    // No `[databases]` entry can say the name is wrong; PostgreSQL does, in its own words.
    let err = match pooler.connect(APP_USER, APP_PASSWORD, "no_such_database").await {
        Ok(_) => panic!("a database PostgreSQL does not have was served"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err:?}");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("database \"no_such_database\" does not exist"), "{err:?}");
}

// Two threads: the client's connection task runs while this one waits synchronously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_servers_warm_while_the_pool_has_clients() {
    let pg = Postgres::shared();
    let db = pg.create_database("minpool");
    let pooler = Pooler::start(&ini(pg, &db, "min_pool_size=3", ""), &userlist());
    // PgBouncer's rule: a pool grows to min_pool_size while it has a client connected.
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("login");
    client.batch_execute("SELECT 1").await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || backends(pg, &db) == 3),
        "PostgreSQL shows {} connections for min_pool_size=3 with a client connected",
        backends(pg, &db)
    );
    // Servers that die are replaced while the client stays.
    pg.sql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}' AND state = 'idle'"
    ));
    assert!(
        wait_until(Duration::from_secs(10), || backends(pg, &db) == 3),
        "min_pool_size was not restored: {} connections",
        backends(pg, &db)
    );
    // With no client left, what dies is not replaced: the pool keeps what it has, no more.
    drop(client);
    std::thread::sleep(Duration::from_millis(500));
    pg.sql(&format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}'"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(backends(pg, &db), 0, "an unused pool was grown back to min_pool_size");
}

#[test]
fn max_db_connections_caps_all_pools_of_a_database() {
    let pg = Postgres::shared();
    let db = pg.create_database("maxdb");
    let pooler = Pooler::start(&ini(pg, &db, "pool_size=5 max_db_connections=2", ""), &userlist());
    let sampler = {
        let db = db.clone();
        Sampler::start(move || backends(Postgres::shared(), &db))
    };
    let app = pooler.url(APP_USER, APP_PASSWORD, &db);
    let md5 = pooler.url(MD5_USER, MD5_PASSWORD, &db);
    // One user's burst first, so that its pool holds the database's whole allowance in idle
    // servers when the other user's clients arrive: the cap is on the sum of the pools, and a
    // pool at the cap must get a server freed from another pool (PgBouncer closes an idle one)
    // rather than wait for ever.
    let alone = run_clients(std::slice::from_ref(&app), 10, 3, "SELECT pg_sleep(0.05)");
    let finished = run_clients(&[app, md5], 10, 3, "SELECT pg_sleep(0.05)");
    let peak = sampler.peak();
    let now = pg.sql(&format!(
        "SELECT string_agg(usename || ':' || state, ', ') FROM pg_stat_activity WHERE datname = '{db}'"
    ));
    assert!(peak <= 2, "PostgreSQL saw {peak} connections to {db} with max_db_connections=2");
    assert_eq!(alone, Ok(10));
    assert_eq!(finished, Ok(20), "backends of {db} at the end: {now}");
    assert!(peak >= 1, "the pools were used");
}

#[tokio::test]
async fn users_section_overrides_pool_size_and_mode() {
    let pg = Postgres::shared();
    let db = pg.create_database("users");
    // The entry would give each pool 5 servers in transaction mode; [users] takes app_user to
    // one server in session mode, and md5_user to one server, its mode still the global one.
    let config = format!(
        "{}[users]\n{APP_USER} = pool_size=1 pool_mode=session\n{MD5_USER} = pool_size=1\n",
        ini(pg, &db, "pool_size=5", "")
    );
    let pooler = Pooler::start(&config, &userlist());

    let first = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first.batch_execute("CREATE TEMP TABLE mine (v int)").await.unwrap();
    let pid = first_value(&first, "SELECT pg_backend_pid()").await;
    // Session mode: later transactions of the same client run in the same backend session.
    assert_eq!(first_value(&first, "SELECT count(*) FROM mine").await, "0");
    assert_eq!(first_value(&first, "SELECT pg_backend_pid()").await, pid);

    let second = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let waiting = tokio::spawn(async move {
        let values =
            row_values(&second, "SELECT pg_backend_pid(), to_regclass('pg_temp.mine') IS NULL").await;
        (second, values)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "a second session got a server while the only one was held");
    assert_eq!(backends_of(pg, &db, APP_USER), 1);

    drop(first);
    let (_second, values) = tokio::time::timeout(LIVENESS, waiting)
        .await
        .expect("the second session never got the server")
        .unwrap();
    assert_eq!(values[0], pid, "pool_size=1: the second session gets the first one's server");
    assert_eq!(values[1], "t", "the server was reset between sessions");

    // Transaction mode: two connected md5_user clients take turns on one server.
    let a = pooler.connect(MD5_USER, MD5_PASSWORD, &db).await.unwrap();
    let b = pooler.connect(MD5_USER, MD5_PASSWORD, &db).await.unwrap();
    let a_pid = tokio::time::timeout(LIVENESS, first_value(&a, "SELECT pg_backend_pid()")).await.unwrap();
    let b_pid = tokio::time::timeout(LIVENESS, first_value(&b, "SELECT pg_backend_pid()")).await.unwrap();
    let a_again = tokio::time::timeout(LIVENESS, first_value(&a, "SELECT pg_backend_pid()")).await.unwrap();
    assert_eq!(a_pid, b_pid);
    assert_eq!(a_again, a_pid);
    assert_eq!(backends_of(pg, &db, MD5_USER), 1);
}

#[test]
fn max_user_connections_caps_a_user() {
    let pg = Postgres::shared();
    let db = pg.create_database("maxuser");
    let config = format!("{}[users]\n{MD5_USER} = max_user_connections=1\n", ini(pg, &db, "pool_size=5", ""));
    let pooler = Pooler::start(&config, &userlist());
    let sampler = {
        let db = db.clone();
        Sampler::start(move || backends_of(Postgres::shared(), &db, MD5_USER))
    };
    let finished = run_clients(&[pooler.url(MD5_USER, MD5_PASSWORD, &db)], 5, 3, "SELECT pg_sleep(0.05)");
    let peak = sampler.peak();
    assert_eq!(finished, Ok(5));
    assert_eq!(peak, 1, "PostgreSQL saw {peak} md5_user connections with max_user_connections=1");
}

#[test]
fn ignore_startup_parameters() {
    let pg = Postgres::shared();
    let db = pg.create_database("ignore");
    // libpq turns PGOPTIONS into the `options` startup parameter.
    let psql_with_options = |pooler: &Pooler, sql: &str| {
        Command::new(pg_bin("psql"))
            .args(["-X", "-At", "-h", "127.0.0.1", "-p", &pooler.port.to_string(), "-U", APP_USER, "-d", &db])
            .args(["-c", sql])
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGOPTIONS", "-c work_mem=5MB")
            .output()
            .unwrap()
    };

    // PgBouncer 1.20+ reads `options`; pgcorral honours every `-c` in it (tests/session_params.rs).
    let followed = Pooler::start(&ini(pg, &db, "", ""), &userlist());
    let out = psql_with_options(&followed, "SELECT current_setting('work_mem')");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "5MB");

    // Listed in ignore_startup_parameters, it is dropped whole, as PgBouncer did before 1.20.
    let lenient = Pooler::start(&ini(pg, &db, "", "ignore_startup_parameters = options\n"), &userlist());
    let out = psql_with_options(&lenient, "SELECT current_setting('work_mem')");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "4MB");
}

#[tokio::test]
async fn database_entry_parameters_reach_the_server() {
    let pg = Postgres::shared();
    let db = pg.create_database("entry_params");
    let pooler = Pooler::start(
        &ini(
            pg,
            &db,
            "pool_size=1 timezone=Asia/Tokyo application_name=from_config \
             connect_query='CREATE TEMP TABLE IF NOT EXISTS warm (v int)'",
            "",
        ),
        &userlist(),
    );
    // What the server session itself reports, and the connect_query's table in that session.
    let probe = "SELECT current_setting('TimeZone'), application_name, (SELECT count(*) FROM warm) \
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()";

    // psql asks for application_name=psql: the client's own value wins over the entry's default.
    let out = pooler.psql(APP_USER, APP_PASSWORD, &db, probe);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Asia/Tokyo|psql|0");
    let out = pooler.psql(APP_USER, APP_PASSWORD, &db, "SHOW TimeZone");
    assert_eq!(stdout(&out), "Asia/Tokyo", "{}", stderr(&out));

    // tokio-postgres sends no application_name, so the entry's one applies, even on a server
    // psql left with its own.
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(row_values(&client, probe).await, ["Asia/Tokyo", "from_config", "0"]);
    assert_eq!(first_value(&client, "SHOW TimeZone").await, "Asia/Tokyo");
}

#[tokio::test]
async fn server_reset_query_always_runs_in_transaction_mode() {
    let pg = Postgres::shared();
    // Whether the temp table of the client's first transaction is still there in its second,
    // on the pool's only server.
    async fn temp_table_survives(pg: &Postgres, always: bool) -> bool {
        let db = pg.create_database(if always { "reset_always" } else { "reset_default" });
        let general =
            format!("server_reset_query = DISCARD ALL\nserver_reset_query_always = {}\n", u8::from(always));
        let pooler = Pooler::start(&ini(pg, &db, "pool_size=1", &general), &userlist());
        let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
        let pid = first_value(&client, "SELECT pg_backend_pid()").await;
        client.batch_execute("CREATE TEMP TABLE scratch (v int)").await.unwrap();
        let values =
            row_values(&client, "SELECT pg_backend_pid(), to_regclass('pg_temp.scratch') IS NOT NULL").await;
        assert_eq!(values[0], pid, "pool_size=1 lends the same server");
        values[1] == "t"
    }
    assert!(!temp_table_survives(pg, true).await, "DISCARD ALL did not run after the transaction");
    assert!(temp_table_survives(pg, false).await, "the server was reset without server_reset_query_always");
}

#[test]
fn workers_setting() {
    let pg = Postgres::shared();
    for workers in [1, 3] {
        let db = pg.create_database(&format!("workers{workers}"));
        let pooler =
            Pooler::start(&ini(pg, &db, "pool_size=4", &format!("workers = {workers}\n")), &userlist());
        let started = format!("started with {workers} workers");
        assert!(wait_until(Duration::from_secs(10), || pooler.log().contains(&started)), "{}", pooler.log());

        let sampler = {
            let db = db.clone();
            Sampler::start(move || backends(Postgres::shared(), &db))
        };
        let finished =
            run_clients(&[pooler.url(APP_USER, APP_PASSWORD, &db)], 20, 5, "SELECT pg_sleep(0.02)");
        let peak = sampler.peak();
        assert_eq!(finished, Ok(20), "workers = {workers}");
        assert!(peak <= 4, "workers = {workers}: PostgreSQL saw {peak} connections for pool_size=4");
        assert!(peak >= 1, "workers = {workers}: the pool was used");
    }
}

#[tokio::test]
async fn client_connection_limits_per_database_and_user() {
    let pg = Postgres::shared();
    let capped = pg.create_database("client_cap");
    let other = pg.create_database("client_free");
    let ini = format!(
        "[databases]\n{capped} = host=127.0.0.1 port={port} max_db_client_connections=2\n\
         {other} = host=127.0.0.1 port={port}\n\
         [users]\nmd5_user = max_user_client_connections=1\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\n",
        port = pg.port
    );
    let userlist =
        [Pooler::userlist_line(APP_USER, APP_PASSWORD), Pooler::userlist_line(MD5_USER, MD5_PASSWORD)]
            .concat();
    let pooler = Pooler::start(&ini, &userlist);
    let first = pooler.connect(APP_USER, APP_PASSWORD, &capped).await.unwrap();
    let second = pooler.connect(APP_USER, APP_PASSWORD, &capped).await.unwrap();
    let refused = match pooler.connect(APP_USER, APP_PASSWORD, &capped).await {
        Ok(_) => panic!("a third client of {capped} must be refused"),
        Err(e) => e,
    };
    assert_eq!(refused.code(), Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS));
    assert!(format!("{refused:?}").contains("max_db_client_connections"), "{refused:?}");
    // Other databases are not affected, and the slot frees when a client leaves.
    pooler.connect(APP_USER, APP_PASSWORD, &other).await.expect("another database");
    drop(second);
    let mut admitted = false;
    for _ in 0..100 {
        if pooler.connect(APP_USER, APP_PASSWORD, &capped).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(admitted, "the slot of a client that left was not given back");
    first.simple_query("SELECT 1").await.unwrap();

    let md5 = pooler.connect(MD5_USER, MD5_PASSWORD, &other).await.unwrap();
    let refused = match pooler.connect(MD5_USER, MD5_PASSWORD, &other).await {
        Ok(_) => panic!("a second md5_user client must be refused"),
        Err(e) => e,
    };
    assert!(format!("{refused:?}").contains("max_user_client_connections"), "{refused:?}");
    md5.simple_query("SELECT 1").await.unwrap();
}
