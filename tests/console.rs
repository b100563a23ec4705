//! The admin console through real clients: who may enter, every SHOW's columns, the numbers
//! under a known load, and each control command's effect on real traffic.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use support::console::show;
use support::*;

const ADMIN: &str = "admin";
const ADMIN_PASSWORD: &str = "admin-pass";
const STATS: &str = "watcher";
const STATS_PASSWORD: &str = "watcher-pass";

fn userlist() -> String {
    app_userlist()
        + &Pooler::userlist_line(ADMIN, ADMIN_PASSWORD)
        + &Pooler::userlist_line(STATS, STATS_PASSWORD)
}

fn start(pg: &Postgres, db: &str, params: &str, general: &str) -> Pooler {
    let general = format!("admin_users = {ADMIN}\nstats_users = {STATS}\n{general}");
    Pooler::start(&pool_ini(pg, db, params, "transaction", &general), &userlist())
}

async fn admin(pooler: &Pooler) -> Client {
    pooler.connect(ADMIN, ADMIN_PASSWORD, "pgbouncer").await.expect("admin login")
}

fn sql_error(result: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>) -> (String, String) {
    let error = result.expect_err("the command must fail");
    let db = error.as_db_error().unwrap_or_else(|| panic!("not a server error: {error:?}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// Starts `n` clients that each run `sql` once, concurrently; returns their tasks.
async fn clients_running(
    pooler: &Pooler,
    db: &str,
    n: usize,
    sql: &'static str,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = pooler.connect(APP_USER, APP_PASSWORD, db).await.expect("client login");
        tasks.push(tokio::spawn(async move { client.simple_query(sql).await.is_ok() }));
    }
    tasks
}

async fn poll(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..300 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn show_pools_clients_and_servers_under_fifty_clients_on_two_servers() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_load");
    let pooler = start(pg, &db, "pool_size=2", "");
    let console = admin(&pooler).await;
    // The clients queue behind an advisory lock the test holds, so the picture stays still
    // while it is looked at.
    let gate = pg.connect(SUPERUSER, "", &db).await.unwrap();
    gate.simple_query("SELECT pg_advisory_lock(42)").await.unwrap();
    let tasks = clients_running(&pooler, &db, 50, "SELECT pg_advisory_xact_lock_shared(42)").await;

    // Between its Parse round and its Bind round a client is briefly idle: wait for the still
    // picture, two clients blocked on the two servers and the rest queued.
    // The picture is read once: a second SHOW could catch a client between its two rounds.
    let mut still = None;
    let waiting = poll(async || {
        let pools = show(&console, "SHOW POOLS").await;
        // The census marks the client active a moment before its server: wait for both.
        let seen = pools.number("database", &db, "cl_waiting") == 48
            && pools.number("database", &db, "cl_active") == 2
            && pools.number("database", &db, "sv_active") == 2;
        if seen {
            still = Some(pools);
        }
        seen
    })
    .await;
    assert!(waiting, "SHOW POOLS never showed 48 waiting clients behind 2 active ones");
    let pools = still.expect("the still picture");
    let pool = pools.row("database", &db);
    assert_eq!(pool["user"], APP_USER);
    assert_eq!(pool["cl_active"], "2");
    assert_eq!(pool["sv_active"], "2");
    assert_eq!(pool["sv_idle"], "0");
    assert_eq!(pool["pool_mode"], "transaction");
    let maxwait_us =
        pool["maxwait"].parse::<i64>().unwrap() * 1_000_000 + pool["maxwait_us"].parse::<i64>().unwrap();
    assert!(maxwait_us > 0, "someone has been waiting: {pool:?}");
    // The two servers SHOW POOLS reports, and the test's own lock holder.
    assert_eq!(backend_count(pg, &db), 3, "PostgreSQL sees the two servers SHOW POOLS reports");

    let clients = show(&console, "SHOW CLIENTS").await;
    let mine: Vec<_> = clients.rows.iter().filter(|r| r["database"] == db).collect();
    assert_eq!(mine.len(), 50);
    assert_eq!(mine.iter().filter(|r| r["state"] == "waiting").count(), 48);
    let active_ids: Vec<String> =
        mine.iter().filter(|r| r["state"] == "active").map(|r| r["ptr"].clone()).collect();
    assert_eq!(active_ids.len(), 2);

    let servers = show(&console, "SHOW SERVERS").await;
    let mine: Vec<_> = servers.rows.iter().filter(|r| r["database"] == db).collect();
    assert_eq!(mine.len(), 2);
    for server in &mine {
        assert_eq!(server["type"], "S");
        assert_eq!(server["state"], "active");
        assert!(active_ids.contains(&server["link"]), "a server links to an active client: {server:?}");
        assert_eq!(server["port"], pg.port.to_string());
    }
    let pids: Vec<String> = mine.iter().map(|s| s["remote_pid"].clone()).collect();
    let backends = pg.sql(&format!(
        "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE datname = '{db}'"
    ));
    for pid in &pids {
        assert!(backends.split(',').any(|b| b == pid), "remote_pid {pid} is a real backend ({backends})");
    }

    gate.simple_query("SELECT pg_advisory_unlock(42)").await.unwrap();
    for task in tasks {
        assert!(task.await.unwrap(), "every client's query succeeded");
    }
    let stats = show(&console, "SHOW STATS").await;
    let row = stats.row("database", &db);
    let n = |c: &str| row[c].parse::<u64>().unwrap();
    assert_eq!(n("total_xact_count"), 50);
    assert_eq!(n("total_query_count"), 50);
    // One more: the pool's first login borrowed a server to learn its ParameterStatus.
    assert_eq!(n("total_server_assignment_count"), 51);
    assert!(n("total_xact_time") >= n("total_query_time") && n("total_query_time") > 0, "{row:?}");
    assert!(n("total_wait_time") > 0);
    assert!(n("total_received") > 0 && n("total_sent") > 0);
    let totals = show(&console, "SHOW STATS_TOTALS").await;
    assert_eq!(totals.row("database", &db)["xact_count"], "50");
}

#[tokio::test]
async fn every_show_answers_with_pgbouncers_columns() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_cols");
    let pooler = start(pg, &db, "", "");
    let console = admin(&pooler).await;
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&client, "SELECT 1").await.unwrap();
    let expected: &[(&str, &[&str])] = &[
        ("VERSION", &["version"]),
        ("CONFIG", &["key", "value", "default", "changeable"]),
        (
            "DATABASES",
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_size",
                "min_pool_size",
                "reserve_pool_size",
                "server_lifetime",
                "pool_mode",
                "load_balance_hosts",
                "max_connections",
                "current_connections",
                "max_client_connections",
                "current_client_connections",
                "paused",
                "disabled",
            ],
        ),
        (
            "POOLS",
            &[
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
                "pool_mode",
                "load_balance_hosts",
            ],
        ),
        (
            "USERS",
            &[
                "name",
                "pool_size",
                "reserve_pool_size",
                "pool_mode",
                "max_user_connections",
                "current_connections",
                "max_user_client_connections",
                "current_client_connections",
            ],
        ),
        ("STATE", &["key", "value"]),
        ("LISTS", &["list", "items"]),
        ("MEM", &["name", "size", "used", "free", "memtotal"]),
        ("TOTALS", &["name", "value"]),
        ("DNS_HOSTS", &["hostname", "ttl", "addrs"]),
        ("DNS_ZONES", &["zonename", "serial", "count"]),
        ("PEERS", &["peer_id", "host", "port", "pool_size"]),
        (
            "PEER_POOLS",
            &["peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"],
        ),
    ];
    for (what, columns) in expected {
        let table = show(&console, &format!("SHOW {what}")).await;
        assert_eq!(table.columns, *columns, "SHOW {what}");
    }
    let connection_columns = [
        "type",
        "user",
        "database",
        "replication",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "close_needed",
        "ptr",
        "link",
        "remote_pid",
        "tls",
        "application_name",
        "prepared_statements",
        "id",
    ];
    for what in ["CLIENTS", "SERVERS"] {
        assert_eq!(show(&console, &format!("SHOW {what}")).await.columns, connection_columns);
    }
    for what in ["SOCKETS", "ACTIVE_SOCKETS"] {
        let columns = show(&console, &format!("show {what};")).await.columns;
        assert_eq!(columns.len(), 28, "{what}");
        assert_eq!(&columns[..21], &connection_columns);
    }
    let stats = show(&console, "SHOW STATS").await;
    assert_eq!(stats.columns.len(), 23);
    assert_eq!(stats.columns[1], "total_server_assignment_count");
    assert_eq!(show(&console, "SHOW STATS_AVERAGES").await.columns.len(), 12);
    assert_eq!(show(&console, "SHOW FDS").await.columns.len(), 15);
    assert_eq!(show(&console, "SHOW client_encoding").await.rows[0]["client_encoding"], "UTF-8");

    // The numbers are the live configuration and state.
    let config = show(&console, "SHOW CONFIG").await;
    assert_eq!(config.row("key", "pool_mode")["value"], "transaction");
    assert_eq!(config.row("key", "listen_port")["changeable"], "no");
    assert_eq!(config.row("key", "default_pool_size")["default"], "20");
    let databases = show(&console, "SHOW DATABASES").await;
    assert_eq!(databases.row("name", &db)["port"], pg.port.to_string());
    assert_eq!(databases.row("name", &db)["current_connections"], "1");
    assert_eq!(databases.row("name", &db)["current_client_connections"], "1");
    assert_eq!(show(&console, "SHOW STATE").await.row("key", "paused")["value"], "no");
    assert_eq!(show(&console, "SHOW LISTS").await.row("list", "used_servers")["items"], "1");
    let users = show(&console, "SHOW USERS").await;
    assert_eq!(users.row("name", APP_USER)["current_connections"], "1");
    assert!(show(&console, "SHOW VERSION").await.rows[0]["version"].starts_with("PgBouncer "));

    // SHOW HELP is a notice; an unknown command says where to look.
    let (code, message) = sql_error(console.simple_query("SHOW NONSENSE").await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("08P01", "invalid command 'SHOW NONSENSE', use SHOW HELP;")
    );
    let help = pooler.psql(ADMIN, ADMIN_PASSWORD, "pgbouncer", "SHOW HELP");
    let stderr = String::from_utf8_lossy(&help.stderr);
    assert!(help.status.success() && stderr.contains("SHOW HELP|CONFIG|DATABASES"), "{stderr}");
}

#[tokio::test]
async fn only_admin_and_stats_users_get_in_and_stats_users_only_look() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_access");
    let pooler = start(pg, &db, "", "");
    let refused =
        pooler.connect(APP_USER, APP_PASSWORD, "pgbouncer").await.expect_err("app_user is not an admin");
    let refused = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!((refused.code().code(), refused.message()), ("08P01", "not allowed"));
    let wrong = pooler.connect(ADMIN, "wrong", "pgbouncer").await.expect_err("wrong password");
    assert_eq!(wrong.as_db_error().unwrap().code().code(), "28P01");

    let watcher = pooler.connect(STATS, STATS_PASSWORD, "pgcorral").await.expect("stats user, by the alias");
    show(&watcher, "SHOW POOLS").await;
    for command in ["PAUSE", "RELOAD", "KILL_CLIENT 1", "SET default_pool_size = 5", "SHUTDOWN"] {
        let (code, message) = sql_error(watcher.simple_query(command).await);
        assert_eq!((code.as_str(), message.as_str()), ("08P01", "admin access needed"), "{command}");
    }

    // `pgbouncer` over the Unix socket, as pgcorral's own OS user, needs no password.
    let socket =
        format!("host={} port={} user=pgbouncer dbname=pgbouncer", pooler.dir.display(), pooler.port);
    let (local, connection) =
        tokio_postgres::connect(&socket, tokio_postgres::NoTls).await.expect("peer login");
    tokio::spawn(connection);
    local.simple_query("RECONNECT").await.expect("admin rights");
    let tcp = pooler.connect("pgbouncer", "", "pgbouncer").await;
    assert!(tcp.is_err(), "over TCP the same user is an ordinary login");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_holds_new_transactions_and_resume_releases_them() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_pause");
    let pooler = start(pg, &db, "pool_size=2", "");
    let console = admin(&pooler).await;
    let client = Arc::new(pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap());
    first_value(&client, "SELECT 1").await.unwrap();
    assert_eq!(backend_count(pg, &db), 1);

    // A transaction under way finishes; PAUSE returns once its server is back and closed.
    client.batch_execute("BEGIN").await.unwrap();
    let pause = {
        let db = db.clone();
        let console = admin(&pooler).await;
        tokio::spawn(async move { console.simple_query(&format!("PAUSE {db}")).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE waits for the open transaction");
    assert_eq!(first_value(&client, "SELECT 2").await.unwrap(), "2", "the open transaction goes on");
    client.batch_execute("COMMIT").await.unwrap();
    pause.await.unwrap().expect("PAUSE completes");
    assert!(poll(async || backend_count(pg, &db) == 0).await, "paused: the server is closed");
    assert_eq!(show(&console, "SHOW DATABASES").await.row("name", &db)["paused"], "1");

    let held = {
        let client = client.clone();
        tokio::spawn(async move { first_value(&client, "SELECT 3").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a new transaction waits while paused");
    assert_eq!(show(&console, "SHOW POOLS").await.row("database", &db)["cl_waiting"], "1");
    let (_, message) = sql_error(console.simple_query("SUSPEND").await);
    assert_eq!(message, "cannot suspend with paused databases");
    assert_eq!(
        show(&console, "SHOW STATE").await.row("key", "paused")["value"],
        "no",
        "only one database is"
    );

    console.simple_query(&format!("RESUME {db}")).await.expect("RESUME");
    assert_eq!(held.await.unwrap().unwrap(), "3", "RESUME releases the held transaction");
    let (_, message) = sql_error(console.simple_query(&format!("RESUME {db}")).await);
    assert_eq!(message, format!("database {db} is not paused"));
    let (_, message) = sql_error(console.simple_query("PAUSE nosuchdb").await);
    assert_eq!(message, "no such database: nosuchdb");
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_after_suspend_serves_the_clients_that_queued_from_the_servers_it_kept() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_suspend");
    let pooler = start(pg, &db, "pool_size=1", "query_wait_timeout = 60");
    let console = admin(&pooler).await;
    let client = Arc::new(pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap());
    first_value(&client, "SELECT 1").await.unwrap();

    console.simple_query("SUSPEND").await.expect("SUSPEND");
    let held = {
        let client = client.clone();
        tokio::spawn(async move { first_value(&client, "SELECT 2").await })
    };
    assert!(
        poll(async || show(&console, "SHOW POOLS").await.row("database", &db)["cl_waiting"] == "1").await,
        "the transaction queues while suspended"
    );
    assert_eq!(backend_count(pg, &db), 1, "SUSPEND keeps the server, idle");
    console.simple_query("RESUME").await.expect("RESUME");
    // The kept server serves it at once: no other server comes back to wake the queue, and
    // the pool has no room to open one, so a lost wake-up would end in query_wait_timeout.
    assert_eq!(held.await.unwrap().unwrap(), "2");
    assert_eq!(backend_count(pg, &db), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_drops_clients_and_reconnect_replaces_servers() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_kill");
    let pooler = start(pg, &db, "pool_size=2", "");
    let console = admin(&pooler).await;

    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let before = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    console.simple_query(&format!("RECONNECT {db}")).await.expect("RECONNECT");
    let after = first_value(&client, "SELECT pg_backend_pid()").await.unwrap();
    assert_ne!(before, after, "RECONNECT: the next transaction gets a new server");
    console.simple_query(&format!("WAIT_CLOSE {db}")).await.expect("WAIT_CLOSE");
    assert_eq!(backend_count(pg, &db), 1, "the old server is gone");

    // KILL_CLIENT drops exactly the client named.
    let victim = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    first_value(&victim, "SELECT 1").await.unwrap();
    let clients = show(&console, "SHOW CLIENTS").await;
    let ids: Vec<String> =
        clients.rows.iter().filter(|r| r["database"] == db).map(|r| r["id"].clone()).collect();
    let newest = ids.iter().max_by_key(|id| id.parse::<u64>().unwrap()).unwrap();
    console.simple_query(&format!("KILL_CLIENT {newest}")).await.expect("KILL_CLIENT");
    assert!(
        poll(async || first_value(&victim, "SELECT 1").await.is_err()).await,
        "the killed client is gone"
    );
    assert_eq!(first_value(&client, "SELECT 5").await.unwrap(), "5", "the other client is untouched");
    let (_, message) = sql_error(console.simple_query("KILL_CLIENT 999999").await);
    assert_eq!(message, "client not found");

    // KILL: every client of the database goes, its servers close, and it stays paused.
    console.simple_query(&format!("KILL {db}")).await.expect("KILL");
    let error = first_value(&client, "SELECT 6").await.expect_err("killed");
    assert!(format!("{error:?}").contains("database removed") || error.is_closed(), "{error:?}");
    assert!(poll(async || backend_count(pg, &db) == 0).await, "KILL closes the servers");
    let newcomer = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    let held = tokio::spawn(async move { first_value(&newcomer, "SELECT 7").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held.is_finished(), "a killed database waits for RESUME");
    console.simple_query("RESUME").await.expect("RESUME");
    assert_eq!(held.await.unwrap().unwrap(), "7");
}

#[tokio::test]
async fn disable_refuses_new_clients_and_set_changes_reloadable_keys_only() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_disable");
    let pooler = start(pg, &db, "", "");
    let console = admin(&pooler).await;
    console.simple_query(&format!("DISABLE {db}")).await.expect("DISABLE");
    let refused = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect_err("disabled");
    let refused = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(refused.message(), format!("database \"{db}\" is disabled"));
    assert_eq!(show(&console, "SHOW DATABASES").await.row("name", &db)["disabled"], "1");
    console.simple_query(&format!("ENABLE {db}")).await.expect("ENABLE");
    pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("enabled again");
    let (_, message) = sql_error(console.simple_query("DISABLE pgbouncer").await);
    assert_eq!(message, "cannot disable admin db: pgbouncer");

    let done = console.simple_query("SET default_pool_size = 7").await.expect("SET");
    let tag = done.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(_) => Some(()),
        _ => None,
    });
    assert!(tag.is_some());
    assert_eq!(show(&console, "SHOW CONFIG").await.row("key", "default_pool_size")["value"], "7");
    assert_eq!(show(&console, "SHOW DATABASES").await.row("name", &db)["pool_size"], "7");
    let (code, message) = sql_error(console.simple_query("SET listen_port = 7777").await);
    assert_eq!(code, "08P01");
    assert!(message.contains("listen_port") && message.contains("restart"), "{message}");
    let (_, message) = sql_error(console.simple_query("SET default_pool_size = lots").await);
    assert!(message.starts_with("SET failed") && message.contains("integer"), "{message}");
}

#[tokio::test]
async fn reload_applies_a_good_config_and_reports_a_broken_one() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_reload");
    let pooler = start(pg, &db, "pool_size=3", "");
    let console = admin(&pooler).await;
    let ini = pooler.dir.join("pgcorral.ini");
    let good = std::fs::read_to_string(&ini).unwrap();

    std::fs::write(&ini, good.replace("pool_size=3", "pool_size=4")).unwrap();
    console.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(show(&console, "SHOW DATABASES").await.row("name", &db)["pool_size"], "4");

    std::fs::write(&ini, good.replace("pool_size=3", "pool_size=many")).unwrap();
    let (code, message) = sql_error(console.simple_query("RELOAD").await);
    assert_eq!(code, "F0000");
    assert!(message.contains("pool_size"), "the caller learns what is wrong: {message}");
    assert_eq!(
        show(&console, "SHOW DATABASES").await.row("name", &db)["pool_size"],
        "4",
        "the old config serves"
    );
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.unwrap();
    assert_eq!(first_value(&client, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn the_console_answers_the_extended_protocol() {
    let pg = Postgres::shared();
    let db = pg.create_database("console_ext");
    let pooler = start(pg, &db, "", "");
    let console = admin(&pooler).await;
    // tokio-postgres prepares, describes and binds with binary results.
    let rows = console.query("SHOW POOLS", &[]).await.expect("extended SHOW POOLS");
    let admin_row =
        rows.iter().find(|r| r.get::<_, &str>("database") == "pgbouncer").expect("the console's pool");
    assert_eq!(admin_row.get::<_, i32>("cl_active"), 1);
    let statement = console.prepare("SHOW LISTS").await.unwrap();
    assert_eq!(statement.columns().len(), 2);
    let lists = console.query(&statement, &[]).await.unwrap();
    assert!(lists
        .iter()
        .any(|r| r.get::<_, &str>("list") == "used_clients" && r.get::<_, i32>("items") >= 1));
    let error = console.query("PAUSE nosuchdb", &[]).await.expect_err("unknown database");
    assert_eq!(error.as_db_error().unwrap().message(), "no such database: nosuchdb");
    // The session is still in step after an error.
    assert_eq!(console.query("SHOW STATE", &[]).await.unwrap().len(), 3);
}
