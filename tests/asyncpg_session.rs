//! asyncpg through pgcorral in session mode: `create_pool` with its default statement cache
//! (protocol-level prepared statements), concurrent tasks, transactions and COPY.

mod support;

use support::*;

#[test]
fn asyncpg_create_pool_with_statement_cache_works_in_session_mode() {
    let pg = Postgres::shared();
    let db = pg.create_database("asyncpg");
    pg.sql_db(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY, name text); ALTER TABLE items OWNER TO app_user;",
    );
    let pooler = Pooler::start(
        &format!(
            "[databases]\n{db} = host=127.0.0.1 port={} dbname={db} pool_size=5\n\
             [pgbouncer]\nauth_type = scram-sha-256\npool_mode = session\n",
            pg.port
        ),
        &Pooler::userlist_line(APP_USER, APP_PASSWORD),
    );
    let script = r#"
import asyncio, os, asyncpg

async def main():
    dsn = os.environ["DSN"]
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=5, command_timeout=30)
    async def worker(i):
        async with pool.acquire() as conn:
            # The same queries over and over: asyncpg prepares them once per connection.
            for j in range(20):
                v = await conn.fetchval("SELECT $1::int * 2", i * 100 + j)
                assert v == (i * 100 + j) * 2, v
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES ($1, $2)", i, f"item {i}")
    await asyncio.gather(*(worker(i) for i in range(40)))
    async with pool.acquire() as conn:
        await conn.copy_records_to_table("items", records=[(1000 + k, f"copied {k}") for k in range(500)])
        rows = await conn.fetch("SELECT id, name FROM items WHERE id < 1000 ORDER BY id")
        assert [r["id"] for r in rows] == list(range(40)), rows
        assert rows[7]["name"] == "item 7"
        assert await conn.fetchval("SELECT count(*) FROM items") == 540
        settings = await conn.fetchval("SHOW client_encoding")
        assert settings == "UTF8", settings
    await pool.close()
    print("ok")

asyncio.run(main())
"#;
    let dsn = format!("postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{db}", pooler.port);
    let out = run_python(script, &[("DSN", &dsn)]);
    assert!(
        out.status.success(),
        "asyncpg failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        pooler.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(pg.sql_db(&db, "SELECT count(*) FROM items"), "540");
    let servers: usize = pg
        .sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"))
        .parse()
        .unwrap();
    assert!(servers <= 5, "{servers} server connections for pool_size 5");
}
