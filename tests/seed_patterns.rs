//! The seed's deployment patterns as pgcorral ships them: each `conf/examples/*.ini`, with only
//! its addresses pointed at this test's servers, in front of a PostgreSQL set up by
//! `conf/examples/initdb.sql` as it stands; `read-replica.ini` in front of a real streaming
//! replica; and the FastAPI application of `docs/deployment.md`, served by uvicorn. Each test
//! asserts what the file's comments promise: the rows the applications got back, which server
//! and role answered, and how few server connections PostgreSQL saw for how many clients.

mod support;

use std::collections::HashMap;
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/examples");
const DEPLOYMENT_GUIDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md");

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A cluster as the examples expect one: database mydb, then initdb.sql run in it unchanged
/// (the harness's own app_user and its database go first, since the script creates app_user).
fn example_cluster() -> Postgres {
    let pg = Postgres::start();
    pg.sql(&format!("DROP DATABASE {APP_DB}; DROP ROLE {APP_USER}; CREATE DATABASE mydb;"));
    pg.sql_db("mydb", &read(&format!("{EXAMPLES}/initdb.sql")));
    pg
}

/// `conf/examples/<name>` as a test can run it: the hosts `postgres` and `postgres-ro` become
/// `primary` and `replica`, and the listen and metrics addresses, which the harness chooses, are
/// left out. Every other line is the shipped file's.
fn example_ini(name: &str, primary: &Postgres, replica: Option<&Postgres>) -> String {
    let at = |pg: &Postgres| format!("host=127.0.0.1 port={}", pg.port);
    let ini: Vec<String> = read(&format!("{EXAMPLES}/{name}"))
        .lines()
        .filter(|line| {
            let key = line.split('=').next().unwrap_or_default().trim();
            !matches!(key, "listen_addr" | "listen_port" | "metrics_addr")
        })
        .map(|line| {
            let line = line.replace("host=postgres port=5432", &at(primary));
            match replica {
                Some(replica) => line.replace("host=postgres-ro port=5432", &at(replica)),
                None => line,
            }
        })
        .collect();
    let unresolved = ini.iter().find(|line| !line.starts_with(";;") && line.contains("host=postgres"));
    assert!(unresolved.is_none(), "{name} names a host this test did not provide: {unresolved:?}");
    ini.join("\n")
}

fn start_example(name: &str, primary: &Postgres, replica: Option<&Postgres>) -> Pooler {
    Pooler::start(&example_ini(name, primary, replica), &read(&format!("{EXAMPLES}/userlist.txt")))
}

/// postgresql:// URL through pgcorral with a password from the examples' userlist.txt.
fn url(pooler: &Pooler, user: &str, password: &str, db: &str) -> String {
    format!("postgresql://{user}:{password}@127.0.0.1:{}/{db}", pooler.port)
}

fn results(what: &str, out: &Output, pooler: &Pooler) -> HashMap<String, String> {
    printed_results(what, out, || pooler.log())
}

fn number(results: &HashMap<String, String>, key: &str) -> usize {
    results
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in the output: {results:?}"))
}

/// Rows of a console command, as psql prints them unaligned (`|` between columns).
fn console(pooler: &Pooler, command: &str) -> Vec<Vec<String>> {
    let out = pooler.psql("admin", "admin-pass", "pgbouncer", command);
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| line.split('|').map(str::to_string).collect())
        .collect()
}

/// Client connections pgcorral holds for `db`: SHOW POOLS's cl_active (logged in, waiting for
/// nothing: PgBouncer counts idle clients there too), cl_waiting and their cancel-request twins.
fn clients_of(pooler: &Pooler, db: &str) -> usize {
    console(pooler, "SHOW POOLS")
        .iter()
        .filter(|row| row[0] == db)
        .map(|row| row[2..6].iter().map(|n| n.parse::<usize>().unwrap()).sum::<usize>())
        .sum()
}

#[test]
fn single_service_example_shares_at_most_25_servers_among_a_hundred_clients() {
    let pg = example_cluster();
    let pooler = start_example("single-service.ini", &pg, None);
    let peak = PeakBackends::start(&pg, "mydb");
    // The seed's single_app pool (max_size 100) with its server_settings, each client running
    // transactions that hold their server a little while.
    let script = r#"
import asyncio, asyncpg, os

async def main():
    pool = await asyncpg.create_pool(os.environ["DSN"], min_size=10, max_size=100, command_timeout=30,
                                     server_settings={"application_name": "myapp", "timezone": "UTC"})
    await pool.execute("CREATE TABLE orders (id serial PRIMARY KEY, client int, n int)")
    async def client(i):
        for n in range(5):
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("INSERT INTO orders (client, n) VALUES ($1, $2)", i, n)
                    await conn.execute("SELECT pg_sleep(0.01)")
                    assert await conn.fetchval("SHOW timezone") == "UTC"
                    assert await conn.fetchval("SHOW application_name") == "myapp"
    await asyncio.gather(*(client(i) for i in range(100)))
    print("client_connections=%d" % pool.get_size())
    print("rows=%d" % await pool.fetchval("SELECT count(*) FROM orders"))
    print("writers=%d" % await pool.fetchval("SELECT count(DISTINCT client) FROM orders"))
    await pool.close()

asyncio.run(main())
"#;
    let dsn = url(&pooler, "app_user", "app-pass", "mydb");
    let out = results("asyncpg", &run_python(script, &[("DSN", &dsn)]), &pooler);
    let peak = peak.finish();
    assert_eq!(number(&out, "rows"), 500);
    assert_eq!(number(&out, "writers"), 100);
    assert_eq!(number(&out, "client_connections"), 100, "the application kept its own pool of 100");
    // default_pool_size 20 + reserve_pool_size 5, capped by max_db_connections = 25.
    assert!((1..=25).contains(&peak), "PostgreSQL saw {peak} servers for 100 clients");
}

#[test]
fn microservices_example_gives_each_service_its_own_pool_and_limits() {
    let pg = example_cluster();
    let pooler = start_example("microservices.ini", &pg, None);
    // Three services with their own roles and pools of 60 connections each, and a sampler on a
    // direct connection recording the most servers each role ever had.
    let script = r#"
import asyncio, asyncpg, os

SERVICES = [("users_svc", "users-pass", "mydb"), ("orders_svc", "orders-pass", "mydb"),
            ("reports_svc", "reports-pass", "analytics")]

async def main():
    done = asyncio.Event()
    peaks = {}
    async def sample():
        conn = await asyncpg.connect(os.environ["DIRECT"])
        while not done.is_set():
            for role, n in await conn.fetch("SELECT usename, count(*) FROM pg_stat_activity "
                                            "WHERE backend_type = 'client backend' GROUP BY usename"):
                peaks[role] = max(peaks.get(role, 0), n)
            await asyncio.sleep(0.01)
        await conn.close()
    async def service(user, password, db):
        pool = await asyncpg.create_pool(os.environ["POOLER"] % (user, password, db), min_size=60, max_size=60)
        async def request(i):
            async with pool.acquire() as conn:
                for _ in range(3):
                    who = await conn.fetchrow("SELECT current_user AS u, current_database() AS d, pg_sleep(0.05)")
                    assert (who["u"], who["d"]) == (user, db), who
        await asyncio.gather(*(request(i) for i in range(60)))
        print("%s_clients=%d" % (user, pool.get_size()))
        await pool.close()
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(service(*s) for s in SERVICES))
    done.set()
    await sampler
    for role, _, _ in SERVICES:
        print("%s_peak=%d" % (role, peaks.get(role, 0)))

asyncio.run(main())
"#;
    let pooled = format!("postgresql://%s:%s@127.0.0.1:{}/%s", pooler.port);
    let direct = format!("postgresql://postgres@127.0.0.1:{}/postgres", pg.port);
    let out = results("asyncpg", &run_python(script, &[("POOLER", &pooled), ("DIRECT", &direct)]), &pooler);
    for (role, cap) in [("users_svc", 50), ("orders_svc", 50), ("reports_svc", 15)] {
        assert_eq!(number(&out, &format!("{role}_clients")), 60);
        let peak = number(&out, &format!("{role}_peak"));
        assert!((1..=cap).contains(&peak), "{role} had {peak} servers, its cap is {cap}");
    }
    // Pools are per (database, role): the console names each service.
    let pools: Vec<(String, String)> =
        console(&pooler, "SHOW POOLS").into_iter().map(|row| (row[0].clone(), row[1].clone())).collect();
    for pool in [("mydb", "users_svc"), ("mydb", "orders_svc"), ("analytics", "reports_svc")] {
        assert!(pools.contains(&(pool.0.to_string(), pool.1.to_string())), "no pool {pool:?} in {pools:?}");
    }
}

#[test]
fn high_concurrency_example_carries_three_hundred_clients_on_its_caps() {
    let pg = example_cluster();
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "app_user", "-p"])
        .arg(pg.port.to_string())
        .arg("mydb")
        .env("PGPASSWORD", "app-pass")
        .output()
        .expect("run pgbench -i");
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    let pooler = start_example("high-concurrency.ini", &pg, None);
    let peak = PeakBackends::start(&pg, "mydb");
    let run = Command::new(pg_bin("pgbench"))
        .args(["-n", "-S", "-c", "300", "-j", "2", "-T", "4", "-h", "127.0.0.1", "-U", "app_user", "-p"])
        .arg(pooler.port.to_string())
        .arg("mydb")
        .env("PGPASSWORD", "app-pass")
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let peak = peak.finish();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "pgbench: {report}{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        pooler.log()
    );
    let processed: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{report}"));
    assert!(processed > 300, "{processed} transactions for 300 clients:\n{report}");
    assert!(report.contains("number of failed transactions: 0"), "{report}");
    // default_pool_size 100 plus the reserve, under max_user_connections = 120.
    assert!((20..=120).contains(&peak), "PostgreSQL saw {peak} servers for 300 clients");
    // log_connections = 1: every client's login is in the log, in PgBouncer's words.
    let logins = pooler.log().matches("login attempt: db=mydb user=app_user").count();
    assert!(logins >= 300, "{logins} login lines for 300 clients");
}

#[tokio::test]
async fn read_replica_example_sends_mydb_ro_to_the_standby_and_survives_its_restart() {
    let primary = example_cluster();
    let replica = primary.start_replica();
    let pooler = start_example("read-replica.ini", &primary, Some(&replica));
    let connect = |db: &'static str| {
        let url = pooler.url("app_user", "app-pass", db);
        async move { connect_plain(&url).await.unwrap_or_else(|e| panic!("login to {db}: {e}")) }
    };
    let writer = connect("mydb").await;
    let reader = connect("mydb_ro").await;
    let who = "SELECT pg_is_in_recovery()::text || ' ' || current_user";
    assert_eq!(first_value(&writer, who).await.unwrap(), "false app_user");
    assert_eq!(
        first_value(&reader, who).await.unwrap(),
        "true app_ro",
        "mydb_ro logs in to the standby as app_ro"
    );

    writer
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY); INSERT INTO notes SELECT generate_series(1, 100)",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = first_value(&reader, "SELECT count(*) FROM notes").await;
        if seen.as_deref().ok() == Some("100") {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never showed the primary's rows: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = reader.batch_execute("INSERT INTO notes VALUES (101)").await.unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("25006"), "a standby refuses writes: {refused}");

    // The replica goes down: readers get an error within the entry's query_wait_timeout of 10 s
    // (so the application can fall back to mydb), writers do not notice.
    replica.stop();
    let started = Instant::now();
    let stranded = reader.simple_query("SELECT count(*) FROM notes").await.unwrap_err();
    let waited = started.elapsed();
    let error = stranded.as_db_error().map(|e| (e.code().code().to_string(), e.message().to_string()));
    assert!(
        matches!(&error, Some((code, _)) if code == "08P01" || code == "08006"),
        "the stranded reader got {stranded:?}"
    );
    assert!(waited < Duration::from_secs(14), "the reader waited {waited:?}");
    assert_eq!(first_value(&writer, "SELECT count(*) FROM notes").await.unwrap(), "100");

    // Back up: new readers are served again without touching pgcorral.
    replica.start_again();
    let reader = connect("mydb_ro").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match first_value(&reader, "SELECT count(*) FROM notes").await {
            Ok(count) => {
                assert_eq!(count, "100");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "mydb_ro did not heal: {e}\n{}", pooler.log()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `# main.py` code block of docs/deployment.md: the application the guide tells users to
/// run, tested as it is printed there.
fn fastapi_app_from_the_guide() -> String {
    let guide = read(DEPLOYMENT_GUIDE);
    let start = guide.find("```python\n# main.py\n").expect("docs/deployment.md has a main.py block");
    let body = &guide[start + "```python\n".len()..];
    body[..body.find("```").expect("the main.py block ends")].to_string()
}

/// A uvicorn process serving the guide's application; killed if the test ends without stopping it.
struct Service {
    port: u16,
    log_path: std::path::PathBuf,
    child: Option<Child>,
}

impl Service {
    fn start(app_dir: &std::path::Path, database_url: &str) -> Service {
        let port = free_port();
        let log_path = app_dir.join(format!("uvicorn-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("create uvicorn log");
        let mut cmd = Command::new(python());
        cmd.args([
            "-m",
            "uvicorn",
            "main:app",
            "--host",
            "127.0.0.1",
            "--log-level",
            "info",
            "--no-access-log",
        ])
        // Keep-alive past the test's length: a load generator that reuses a connection
        // uvicorn has just closed gets a reset, which says nothing about the database side.
        .args(["--timeout-keep-alive", "120", "--port"])
        .arg(port.to_string())
        .arg("--app-dir")
        .arg(app_dir)
        .env("DATABASE_URL", database_url)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup uvicorn log"))
        .stderr(log);
        let mut child = spawn_supervised(cmd).expect("start uvicorn");
        let up = wait_until(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() || matches!(child.try_wait(), Ok(Some(_)))
        });
        let service = Service { port, log_path, child: Some(child) };
        if !up {
            panic!("uvicorn did not serve on {port}:\n{}", service.log());
        }
        service
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, as a process manager stops a service: uvicorn runs the lifespan's shutdown half,
    /// which closes the pool. Returns uvicorn's stderr after asserting a clean exit.
    /// uvicorn re-raises the signal once it has shut down, so SIGTERM is also a clean exit.
    fn stop(mut self) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let status = child.wait().expect("wait for uvicorn");
        let log = self.log();
        assert!(
            status.success() || status.signal() == Some(libc::SIGTERM),
            "uvicorn exited with {status}:\n{log}"
        );
        assert!(log.contains("Application shutdown complete"), "the lifespan did not finish:\n{log}");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn fastapi_lifespan_pool_from_the_guide_serves_two_processes_through_single_service() {
    let pg = example_cluster();
    pg.sql_db(
        "mydb",
        "SET ROLE app_user; CREATE TABLE users (id serial PRIMARY KEY, name text, email text);",
    );
    let pooler = start_example("single-service.ini", &pg, None);
    let app_dir = std::env::temp_dir().join(format!("pgcorral-fastapi-{}", std::process::id()));
    std::fs::create_dir_all(&app_dir).unwrap();
    std::fs::write(app_dir.join("main.py"), fastapi_app_from_the_guide()).unwrap();
    let database_url = url(&pooler, "app_user", "app-pass", "mydb");
    // Two replicas of the service, each with the guide's pool (min_size 5, max_size 20).
    let services = [Service::start(&app_dir, &database_url), Service::start(&app_dir, &database_url)];

    let peak = PeakBackends::start(&pg, "mydb");
    let script = r#"
import asyncio, httpx, os, time

PORTS = [int(p) for p in os.environ["PORTS"].split(",")]

async def main():
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=60)) as http:
        started = time.monotonic()
        async def create(i):
            port = PORTS[i % len(PORTS)]
            r = await http.post(f"http://127.0.0.1:{port}/users", params={"name": f"user{i}", "email": f"u{i}@example.com"})
            r.raise_for_status()
            return i, r.json()
        created = await asyncio.gather(*(create(i) for i in range(200)), return_exceptions=True)
        failed = [c for c in created if isinstance(c, BaseException)]
        assert not failed, "%d requests failed, first: %r" % (len(failed), failed[0])
        print("create_seconds=%.2f" % (time.monotonic() - started))
        async def check(i, user):
            port = PORTS[(i + 1) % len(PORTS)]
            r = await http.get(f"http://127.0.0.1:{port}/users/{user['id']}")
            r.raise_for_status()
            return r.json() == {"id": user["id"], "name": f"user{i}", "email": f"u{i}@example.com"}
        matched = await asyncio.gather(*(check(i, u) for i, u in created), return_exceptions=True)
        failed = [m for m in matched if isinstance(m, BaseException)]
        assert not failed, "%d reads failed, first: %r" % (len(failed), failed[0])
        missing = (await http.get(f"http://127.0.0.1:{PORTS[0]}/users/0")).json()
    print("created=%d" % len({u["id"] for _, u in created}))
    print("matched=%d" % sum(matched))
    print("total_seconds=%.2f" % (time.monotonic() - started))
    print("missing=%s" % missing)

asyncio.run(main())
"#;
    let ports = services.iter().map(|s| s.port.to_string()).collect::<Vec<_>>().join(",");
    let load = run_python(script, &[("PORTS", &ports)]);
    if !load.status.success() {
        for service in &services {
            eprintln!("--- uvicorn on {} ---\n{}", service.port, service.log());
        }
    }
    let out = results("httpx load", &load, &pooler);
    let peak = peak.finish();
    assert_eq!(number(&out, "created"), 200);
    assert_eq!(number(&out, "matched"), 200, "every user read back as written, through either process");
    assert_eq!(out["missing"], "None");
    assert_eq!(pg.sql_db("mydb", "SELECT count(*) FROM users"), "200");

    // Both processes' pools are open (at least min_size 5 each, up to 20) and share at most 25
    // servers; the application_name from server_settings reached pgcorral.
    let clients = clients_of(&pooler, "mydb");
    assert!((10..=40).contains(&clients), "{clients} client connections from two pools of 5 to 20");
    assert!((1..=25).contains(&peak), "PostgreSQL saw {peak} servers");
    let named =
        console(&pooler, "SHOW CLIENTS").iter().filter(|row| row.iter().any(|c| c == "users-api")).count();
    assert_eq!(named, clients, "every client of the service says application_name users-api");

    // The lifespan's shutdown half closes each pool: every client says goodbye (Terminate,
    // which pgcorral logs as a close request) rather than vanishing.
    for service in services {
        service.stop();
    }
    assert!(
        wait_until(Duration::from_secs(10), || clients_of(&pooler, "mydb") == 0),
        "clients left behind after both services stopped: {}",
        clients_of(&pooler, "mydb")
    );
    let log = pooler.log();
    let goodbyes =
        log.lines().filter(|l| l.contains("mydb/app_user") && l.contains("client close request")).count();
    assert!(goodbyes >= clients, "{goodbyes} clients closed their connection, of {clients}");
    assert!(!log.contains("client unexpected eof"), "a client vanished:\n{log}");
    let _ = std::fs::remove_dir_all(&app_dir);
}
