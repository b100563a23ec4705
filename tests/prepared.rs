//! Protocol-level named prepared statements in transaction mode, through real clients: many
//! clients preparing the same statements share few servers (pgbench -M prepared, asyncpg's
//! statement cache, tokio-postgres), PostgreSQL's own errors for unknown and reused names
//! (libpq through psycopg's low-level interface), DEALLOCATE keeping the books right, and the
//! console's prepared_statements columns.

mod support;

use std::process::Command;

use support::*;

fn start(pg: &Postgres, db: &str, pool_size: usize) -> Pooler {
    let params = format!("pool_size={pool_size}");
    Pooler::start(
        &pool_ini(pg, db, &params, "transaction", "admin_users = app_user\nmax_prepared_statements = 100"),
        &app_userlist(),
    )
}

/// Select-only: pgbench 15 prepares each statement when it first runs it, synchronously for
/// the whole thread, so a script whose transactions span statements (tpcb-like) deadlocks any
/// transaction pooler smaller than pgbench's client count, PgBouncer included.
#[test]
fn pgbench_prepared_shares_four_servers_among_twenty_clients() {
    let pg = Postgres::shared();
    let db = pg.create_database("prepared_pgbench");
    let pooler = start(pg, &db, 4);
    let bench = |args: &[&str]| {
        // timeout: a protocol desync would otherwise hang pgbench until query_wait_timeout.
        Command::new("timeout")
            .arg("60")
            .arg(pg_bin("pgbench"))
            .args(["-h", "127.0.0.1", "-U", APP_USER])
            .arg("-p")
            .arg(pooler.port.to_string())
            .args(args)
            .arg(&db)
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .expect("run pgbench")
    };
    let init = bench(&["-i", "-q", "-s", "1"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let out = bench(&["-n", "-M", "prepared", "-S", "-c", "20", "-j", "2", "-t", "100"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("number of transactions actually processed: 2000/2000"), "{text}");
    assert!(backend_count(pg, &db) <= 4, "twenty clients shared at most four servers");
    let servers = pooler.psql(APP_USER, APP_PASSWORD, "pgbouncer", "SHOW SERVERS");
    let table = String::from_utf8_lossy(&servers.stdout);
    let prepared: Vec<i64> =
        table.lines().filter_map(|l| l.split('|').nth(19).and_then(|v| v.trim().parse().ok())).collect();
    assert!(prepared.iter().any(|&n| n >= 1), "SHOW SERVERS counts statements: {table}");
    // SHOW STATS_TOTALS: client_parse_count, server_parse_count, bind_count (columns 9-11).
    let totals = pooler.psql(APP_USER, APP_PASSWORD, "pgbouncer", "SHOW STATS_TOTALS");
    let totals = String::from_utf8_lossy(&totals.stdout).to_string();
    let row: Vec<u64> = totals
        .lines()
        .find(|l| l.starts_with(&format!("{db}|")))
        .map(|l| l.split('|').skip(1).map(|v| v.parse().unwrap_or(0)).collect())
        .unwrap_or_default();
    assert!(row.len() >= 11, "{totals}");
    let (client_parses, server_parses, binds) = (row[8], row[9], row[10]);
    assert!(client_parses >= 20, "each client parsed its statement: {totals}");
    assert!(server_parses >= 1 && server_parses <= client_parses + 4, "{totals}");
    assert!(binds >= 2000, "one Bind per transaction: {totals}");
}

#[test]
fn asyncpg_statement_cache_works_in_transaction_mode() {
    let pg = Postgres::shared();
    let db = pg.create_database("prepared_asyncpg");
    let pooler = start(pg, &db, 3);
    let script = r#"
import asyncio, os, asyncpg
async def main():
    pool = await asyncpg.create_pool(host="127.0.0.1", port=int(os.environ["PORT"]), user="app_user",
                                     password="app-pass", database=os.environ["DB"], min_size=5, max_size=20)
    async def task(i):
        async with pool.acquire() as conn:
            a = await conn.fetchval("SELECT $1::int + 1", i)
            b = await conn.fetchrow("SELECT $1::text || 'x' AS t, $2::int * 2 AS d", str(i), i)
            async with conn.transaction():
                c = await conn.fetchval("SELECT $1::int + 1", i)
            return a == i + 1 and b["t"] == f"{i}x" and b["d"] == 2 * i and c == i + 1
    results = await asyncio.gather(*(task(i) for i in range(300)))
    print("ok", sum(results))
    await pool.close()
asyncio.run(main())
"#;
    let port = pooler.port.to_string();
    let out = run_python(script, &[("PORT", &port), ("DB", &db)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "ok 300");
    assert!(backend_count(pg, &db) <= 3);
}

#[tokio::test]
async fn tokio_postgres_prepared_statements_follow_clients_across_servers() {
    let pg = Postgres::shared();
    let db = pg.create_database("prepared_tokio");
    let pooler = start(pg, &db, 2);
    let mut tasks = Vec::new();
    for n in 0..8i32 {
        let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            let add = client.prepare("SELECT $1::int + $2::int").await.unwrap();
            let echo = client.prepare("SELECT $1::text").await.unwrap();
            for i in 0..50i32 {
                let row = client.query_one(&add, &[&n, &i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), n + i);
                let row = client.query_one(&echo, &[&format!("c{n}")]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), format!("c{n}"));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(backend_count(pg, &db) <= 2);
}

/// libpq's own prepare/exec_prepared/DEALLOCATE through psycopg's low-level interface: the
/// errors are PostgreSQL's, with the client's statement names.
#[test]
fn unknown_and_reused_names_get_postgres_errors() {
    let pg = Postgres::shared();
    let db = pg.create_database("prepared_errors");
    let pooler = start(pg, &db, 1);
    let script = r#"
import os, psycopg
from psycopg import pq
conn = psycopg.connect(f"host=127.0.0.1 port={os.environ['PORT']} user=app_user password=app-pass dbname={os.environ['DB']}")
pg = conn.pgconn
def show(res):
    if res.status == pq.ExecStatus.FATAL_ERROR:
        return res.error_field(pq.DiagnosticField.SQLSTATE).decode() + " " + res.error_message.decode().strip()
    return pq.ExecStatus(res.status).name + (" " + res.get_value(0, 0).decode() if res.ntuples else "")
print(show(pg.prepare(b"s1", b"SELECT $1::int * 10")))
print(show(pg.exec_prepared(b"s1", [b"4"])))
print(show(pg.prepare(b"s1", b"SELECT 2")))
print(show(pg.exec_prepared(b"s1", [b"5"])))
print(show(pg.exec_prepared(b"nope", [])))
print(show(pg.exec_(b"DEALLOCATE s1")))
print(show(pg.exec_prepared(b"s1", [b"6"])))
print(show(pg.prepare(b"s1", b"SELECT $1::int + 1")))
print(show(pg.exec_prepared(b"s1", [b"6"])))
"#;
    let port = pooler.port.to_string();
    let out = run_python(script, &[("PORT", &port), ("DB", &db)]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "COMMAND_OK");
    assert_eq!(lines[1], "TUPLES_OK 40");
    assert!(lines[2].starts_with("42P05") && lines[2].contains("\"s1\" already exists"), "{}", lines[2]);
    assert_eq!(lines[3], "TUPLES_OK 50", "the first definition stands");
    assert!(lines[4].starts_with("26000") && lines[4].contains("\"nope\" does not exist"), "{}", lines[4]);
    assert_eq!(lines[5], "COMMAND_OK");
    assert!(lines[6].starts_with("26000") && lines[6].contains("\"s1\" does not exist"), "{}", lines[6]);
    assert_eq!(lines[7], "COMMAND_OK", "the name is free again after DEALLOCATE");
    assert_eq!(lines[8], "TUPLES_OK 7");
}
