//! Client compatibility: the drivers applications actually use (asyncpg, SQLAlchemy's async
//! engine, psycopg 3, node-postgres, pgjdbc, tokio-postgres, pgbench), each through pgcorral
//! in front of a real PostgreSQL, each doing what those drivers do by default that a pooler
//! can break: named prepared statements reused many times, pipelines, COPY, cancels, batches,
//! many client connections at once. Every test asserts the values and row counts it got back,
//! and that PostgreSQL never saw more server connections than the pool allows.

mod support;

use std::collections::HashMap;
use std::process::{Command, Output};

use support::*;

// Transaction mode: the pooling mode the seed recommends, where prepared statements are hardest.
const POOL_MODE: &str = "transaction";

/// How many servers the clients share in transaction mode: fewer than any test's clients, so
/// the pool really multiplexes.
const SHARED_SERVERS: usize = 4;

/// pool_size for a test whose clients keep up to `clients` connections open at once. A session
/// holds its server until the client disconnects, so in session mode the pool must be as large
/// as the clients or the surplus would queue for good; in transaction mode they share
/// [`SHARED_SERVERS`].
fn pool_size_for(clients: usize) -> usize {
    if POOL_MODE == "session" {
        clients
    } else {
        clients.min(SHARED_SERVERS)
    }
}

/// A fresh database with `schema` created by app_user (so the drivers, logged in as app_user,
/// own their tables), and pgcorral in [`POOL_MODE`] in front of it.
struct Setup {
    pg: &'static Postgres,
    db: String,
    pool_size: usize,
    pooler: Pooler,
}

impl Setup {
    fn new(prefix: &str, clients: usize, schema: &str) -> Setup {
        Self::with_settings(prefix, clients, schema, "")
    }

    /// Like `new`, with extra `[pgbouncer]` lines.
    fn with_settings(prefix: &str, clients: usize, schema: &str, settings: &str) -> Setup {
        let pg = Postgres::shared();
        let db = pg.create_database(prefix);
        if !schema.is_empty() {
            pg.sql_db(&db, &format!("SET ROLE {APP_USER};\n{schema}"));
        }
        let pool_size = pool_size_for(clients);
        let pooler = Pooler::start(
            &pool_ini(
                pg,
                &db,
                &format!("pool_size={pool_size}"),
                POOL_MODE,
                &format!("max_client_conn = 200\n{settings}"),
            ),
            &app_userlist(),
        );
        Setup { pg, db, pool_size, pooler }
    }

    /// postgresql:// URL through pgcorral, with `scheme` (e.g. "postgresql+asyncpg").
    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{}", self.pooler.port, self.db)
    }

    /// Runs a query as the superuser directly on the test database; trimmed psql output.
    fn sql(&self, sql: &str) -> String {
        self.pg.sql_db(&self.db, sql)
    }

    /// The `key=value` lines a driver program printed, after asserting that it succeeded.
    fn results(&self, what: &str, out: &Output) -> HashMap<String, String> {
        printed_results(what, out, || self.pooler.log())
    }

    /// PostgreSQL never had more server connections to the database than the pool allows, and
    /// pgcorral still keeps at least one for later clients.
    fn assert_pool_held(&self, peak: usize) {
        let (size, now) = (self.pool_size, backend_count(self.pg, &self.db));
        assert!(peak <= size, "PostgreSQL saw {peak} server connections for pool_size {size}");
        assert!((1..=size).contains(&now), "{now} server connections left for pool_size {size}");
    }
}

/// `results[key]`, with the whole map in the failure message.
fn value<'a>(results: &'a HashMap<String, String>, key: &str) -> &'a str {
    results.get(key).unwrap_or_else(|| panic!("no {key}= in the driver's output: {results:?}"))
}

#[test]
fn asyncpg_pool_with_statement_cache_copy_transactions_and_command_timeout() {
    // max_size: asyncpg opens up to this many connections for the 100 tasks.
    let s = Setup::new(
        "drv_asyncpg",
        20,
        "CREATE TABLE items (task int, k int, label text);
         CREATE TABLE copied (task int, k int);",
    );
    let script = r#"
import asyncio, os, asyncpg

DSN = os.environ["DSN"]
ROW = "SELECT $1::int AS n, $1::int * 2 AS doubled, current_setting('application_name') AS app"

async def task(pool, i):
    async with pool.acquire() as conn:
        # The same statements on every task: asyncpg prepares each once per connection, by name,
        # and reuses it from its statement cache.
        row = await conn.fetchrow(ROW, i)
        assert (row["n"], row["doubled"]) == (i, 2 * i), row
        rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) g", i % 10 + 1)
        assert [r["g"] for r in rows] == list(range(1, i % 10 + 2)), rows
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO items VALUES ($1, $2, $3)", [(i, k, f"t{i}k{k}") for k in range(3)]
            )
            n = await conn.fetchval("SELECT count(*) FROM items WHERE task = $1", i)
            assert n == 3, n
        if i % 10 == 0:
            done = await conn.copy_records_to_table("copied", records=[(i, k) for k in range(50)])
            assert done == "COPY 50", done

async def main():
    pool = await asyncpg.create_pool(
        DSN, min_size=5, max_size=20, command_timeout=30,
        server_settings={"application_name": "drivers", "jit": "off", "search_path": "public, extra"},
    )
    # server_settings reach the server: asked on connections fresh from the pool (all of
    # them at this point), and again after every connection went back to the pool: asyncpg's
    # release runs RESET ALL, which on a direct connection returns to the startup values. (Through
    # PgBouncer it returns to the server connection's own, its issue 1260; pgcorral restores the
    # client's.)
    async with pool.acquire() as conn:
        print("app_fresh=", (await conn.fetchrow(ROW, 0))["app"])
    await asyncio.gather(*(task(pool, i) for i in range(100)))
    async with pool.acquire() as conn:
        print("settings_reused=", await conn.fetchval(
            "SELECT current_setting('application_name') || '/' || current_setting('jit')"
            " || '/' || current_setting('search_path')"))
    print("items=", await pool.fetchval("SELECT count(*) FROM items"))
    print("item_sum=", await pool.fetchval("SELECT sum(task * 10 + k) FROM items"))
    print("labels=", await pool.fetchval("SELECT count(DISTINCT label) FROM items"))
    print("copied=", await pool.fetchval("SELECT count(*) FROM copied"))
    async with pool.acquire() as conn:
        # A transaction that fails is rolled back, and the connection goes on.
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (-1, 0, 'rolled back')")
                await conn.execute("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
        print("rolled_back_rows=", await conn.fetchval("SELECT count(*) FROM items WHERE task = -1"))
        # Inside a transaction (one server in either pool mode): the cached statement, run
        # again, exists on that server as a protocol-level prepared statement.
        async with conn.transaction():
            await conn.fetchrow(ROW, 7)
            print("prepared=", await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1 AND NOT from_sql", ROW))
    await pool.close()

    # command_timeout: asyncpg gives up on the query, sends a CancelRequest (through pgcorral)
    # and raises TimeoutError; the connection, the pool's only one, then works again.
    slow = await asyncpg.create_pool(DSN, min_size=1, max_size=1, command_timeout=0.5)
    try:
        await slow.fetchval("SELECT pg_sleep(60)")
        print("timeout=not raised")
    except asyncio.TimeoutError:
        print("timeout=raised")
    print("after_timeout=", await slow.fetchval("SELECT $1::int + 1", 41))
    await slow.close()

asyncio.run(main())
"#;
    let peak = PeakBackends::start(s.pg, &s.db);
    let out = run_python(script, &[("DSN", &s.url("postgresql"))]);
    let peak = peak.finish();
    let r = s.results("asyncpg", &out);

    assert_eq!(value(&r, "app_fresh"), "drivers", "server_settings' application_name");
    assert_eq!(value(&r, "settings_reused"), "drivers/off/public, extra", "server_settings after RESET ALL");
    assert_eq!(value(&r, "items"), "300", "3 rows from each of 100 tasks' executemany");
    let item_sum: i64 = (0..100).flat_map(|i| (0..3).map(move |k| i * 10 + k)).sum();
    assert_eq!(value(&r, "item_sum"), item_sum.to_string());
    assert_eq!(value(&r, "labels"), "300");
    assert_eq!(value(&r, "copied"), "500", "50 rows from each of 10 copy_records_to_table");
    assert_eq!(value(&r, "rolled_back_rows"), "0");
    assert_eq!(value(&r, "prepared"), "1", "asyncpg's cached statement is server-prepared");
    assert_eq!(value(&r, "timeout"), "raised");
    assert_eq!(value(&r, "after_timeout"), "42");
    // The cancel reached the server: the sleep is not still running behind pgcorral.
    let sleeping = s.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
    );
    assert_eq!(sleeping, "0", "pg_sleep was not cancelled");
    assert_eq!(s.sql("SELECT count(*) FROM items"), "300");
    s.assert_pool_held(peak);
}

#[test]
fn sqlalchemy_async_engine_orm_with_pre_ping() {
    // pool_size + max_overflow below.
    let s = Setup::new("drv_sqlalchemy", 10, "");
    let script = r#"
import asyncio, os
import asyncpg
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase):
    pass

class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(40))
    amount: Mapped[int]

async def customer(Session, w):
    async with Session() as session:
        for k in range(5):
            session.add(Order(id=w * 100 + k, customer=f"c{w}", amount=k + 1))
        await session.commit()
        total = await session.scalar(select(func.sum(Order.amount)).where(Order.customer == f"c{w}"))
        assert total == 15, total
        # The same ORM query repeatedly: the asyncpg dialect's statement cache prepares it once
        # per connection.
        for _ in range(5):
            orders = (await session.scalars(
                select(Order).where(Order.customer == f"c{w}").order_by(Order.id))).all()
            assert [o.id for o in orders] == [w * 100 + k for k in range(5)], orders

async def main():
    engine = create_async_engine(
        os.environ["URL"], pool_size=5, max_overflow=5, pool_pre_ping=True, pool_recycle=300
    )
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    Session = async_sessionmaker(engine, expire_on_commit=False)
    await asyncio.gather(*(customer(Session, w) for w in range(30)))
    async with Session() as session:
        order = await session.get(Order, 1203)
        order.amount = 99
        await session.commit()

    # PostgreSQL drops every server connection of the database behind the engine's pooled,
    # idle connections; pool_pre_ping must notice on checkout and reconnect.
    admin = await asyncpg.connect(os.environ["ADMIN_DSN"])
    kill = ("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND backend_type = 'client backend'")
    print("terminated=", await admin.fetchval(kill, os.environ["DB"]))
    left = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'"
    while await admin.fetchval(left, os.environ["DB"]) > 0:
        await asyncio.sleep(0.02)
    await admin.close()

    await asyncio.gather(*(customer(Session, w) for w in range(30, 40)))
    async with Session() as session:
        print("orders=", await session.scalar(select(func.count()).select_from(Order)))
        print("amount=", await session.scalar(select(func.sum(Order.amount))))
        print("order_1203=", (await session.get(Order, 1203)).amount)
        print("customers=", await session.scalar(select(func.count(func.distinct(Order.customer)))))
    await engine.dispose()

asyncio.run(main())
"#;
    let admin = format!("postgresql://{SUPERUSER}@127.0.0.1:{}/postgres", s.pg.port);
    let peak = PeakBackends::start(s.pg, &s.db);
    let out =
        run_python(script, &[("URL", &s.url("postgresql+asyncpg")), ("ADMIN_DSN", &admin), ("DB", &s.db)]);
    let peak = peak.finish();
    let r = s.results("SQLAlchemy", &out);

    let terminated: usize = value(&r, "terminated").parse().unwrap();
    assert!(terminated >= 1, "no server connection to terminate: {r:?}");
    assert_eq!(value(&r, "orders"), "200", "5 orders from each of 40 sessions");
    // 40 customers with amounts 1..=5, one of them raised from 4 to 99.
    assert_eq!(value(&r, "amount"), (40 * 15 - 4 + 99).to_string());
    assert_eq!(value(&r, "order_1203"), "99");
    assert_eq!(value(&r, "customers"), "40");
    assert_eq!(s.sql("SELECT count(*) FROM orders"), "200");
    s.assert_pool_held(peak);
}

#[test]
fn psycopg3_prepare_threshold_pipeline_copy_sync_and_async() {
    // The async part's concurrent connections; the sync part uses one at a time.
    const ASYNC_CLIENTS: usize = 8;
    let s = Setup::new(
        "drv_psycopg",
        ASYNC_CLIENTS,
        "CREATE TABLE pipelined (id int PRIMARY KEY, v int);
         CREATE TABLE copied (id int, name text);
         CREATE TABLE async_rows (client int, n int);",
    );
    let script = r#"
import asyncio, os, psycopg

DSN = os.environ["DSN"]
CLIENTS = int(os.environ["CLIENTS"])
TRIPLE = "SELECT %s::int * 3 AS tripled"
# The text psycopg sends for TRIPLE, as pg_prepared_statements shows it.
PREPARED = ("SELECT count(*) FROM pg_prepared_statements "
            "WHERE statement = 'SELECT $1::int * 3 AS tripled' AND NOT from_sql")

def sync_part():
    # prepare_threshold default (5): psycopg prepares a query on the server once it has run
    # that often. Ten runs, each its own transaction, then one more inside a transaction (one
    # server in either pool mode) to look at the server it ran on.
    with psycopg.connect(DSN, autocommit=True) as conn:
        print("default_threshold=", conn.prepare_threshold)
        print("default_sum=", sum(conn.execute(TRIPLE, (i,)).fetchone()[0] for i in range(10)))
        with conn.transaction():
            print("default_last=", conn.execute(TRIPLE, (10,)).fetchone()[0])
            print("default_prepared=", conn.execute(PREPARED, prepare=False).fetchone()[0])

    # prepare_threshold=0: every query is prepared on its first run.
    with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
        with conn.transaction():
            print("zero_first=", conn.execute(TRIPLE, (5,)).fetchone()[0])
            print("zero_prepared=", conn.execute(PREPARED, prepare=False).fetchone()[0])
        print("zero_sum=", sum(conn.execute(TRIPLE, (i,)).fetchone()[0] for i in range(10)))

    # Pipeline mode: 100 inserts (prepared after the fifth) and 5 queries sent without waiting
    # for their results, which arrive after the pipeline's sync.
    with psycopg.connect(DSN, autocommit=True) as conn:
        with conn.pipeline():
            cur = conn.cursor()
            for i in range(100):
                cur.execute("INSERT INTO pipelined VALUES (%s, %s)", (i, i * i))
            queries = [conn.execute(TRIPLE, (i,)) for i in range(5)]
        print("pipeline_results=", ",".join(str(q.fetchone()[0]) for q in queries))
        print("pipelined=", conn.execute("SELECT count(*), sum(v) FROM pipelined").fetchone())

    # COPY FROM STDIN, then the same rows back with COPY TO STDOUT.
    with psycopg.connect(DSN) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY copied (id, name) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, f"row {i}"))
            print("copy_rowcount=", cur.rowcount)
        conn.commit()
        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT id, name FROM copied ORDER BY id) TO STDOUT") as copy:
                rows = list(copy.rows())
        assert rows[999] == ("999", "row 999"), rows[999]
        print("copied_back=", len(rows))

async def async_client(c):
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        total = 0
        for i in range(10):
            cur = await conn.execute(TRIPLE, (c * 10 + i,))
            total += (await cur.fetchone())[0]
        async with conn.transaction():
            for n in range(5):
                await conn.execute("INSERT INTO async_rows VALUES (%s, %s)", (c, n))
            cur = await conn.execute(TRIPLE, (c,))
            assert (await cur.fetchone())[0] == 3 * c
            cur = await conn.execute(PREPARED, prepare=False)
            prepared = (await cur.fetchone())[0]
        async with conn.pipeline():
            curs = [await conn.execute(TRIPLE, (n,)) for n in range(3)]
        piped = [(await cur.fetchone())[0] for cur in curs]
        assert piped == [0, 3, 6], piped
        return total, prepared

async def async_part():
    results = await asyncio.gather(*(async_client(c) for c in range(CLIENTS)))
    print("async_sum=", sum(total for total, _ in results))
    print("async_prepared_clients=", sum(1 for _, p in results if p == 1))
    async with await psycopg.AsyncConnection.connect(DSN) as conn:
        cur = await conn.execute("SELECT count(*) FROM async_rows")
        print("async_rows=", (await cur.fetchone())[0])

sync_part()
asyncio.run(async_part())
"#;
    let peak = PeakBackends::start(s.pg, &s.db);
    let out = run_python(script, &[("DSN", &s.url("postgresql")), ("CLIENTS", &ASYNC_CLIENTS.to_string())]);
    let peak = peak.finish();
    let r = s.results("psycopg", &out);

    let triple_sum = |range: std::ops::Range<i64>| range.map(|i| i * 3).sum::<i64>().to_string();
    assert_eq!(value(&r, "default_threshold"), "5");
    assert_eq!(value(&r, "default_sum"), triple_sum(0..10));
    assert_eq!(value(&r, "default_last"), "30");
    assert_eq!(value(&r, "default_prepared"), "1", "prepared after prepare_threshold runs");
    assert_eq!(value(&r, "zero_first"), "15");
    assert_eq!(value(&r, "zero_prepared"), "1", "prepare_threshold=0 prepares at once");
    assert_eq!(value(&r, "zero_sum"), triple_sum(0..10));
    assert_eq!(value(&r, "pipeline_results"), "0,3,6,9,12");
    let squares: i64 = (0..100).map(|i| i * i).sum();
    assert_eq!(value(&r, "pipelined"), format!("(100, {squares})"));
    assert_eq!(value(&r, "copy_rowcount"), "1000");
    assert_eq!(value(&r, "copied_back"), "1000");
    assert_eq!(value(&r, "async_sum"), triple_sum(0..10 * ASYNC_CLIENTS as i64));
    assert_eq!(value(&r, "async_prepared_clients"), ASYNC_CLIENTS.to_string());
    assert_eq!(value(&r, "async_rows"), (ASYNC_CLIENTS * 5).to_string());
    assert_eq!(s.sql("SELECT count(*) FROM copied"), "1000");
    s.assert_pool_held(peak);
}

#[test]
fn node_postgres_named_queries_from_a_pool() {
    // pg.Pool's max below.
    const CLIENTS: usize = 10;
    let s = Setup::new("drv_node", CLIENTS, "CREATE TABLE node_items (id int PRIMARY KEY, name text);");
    let script = r#"
const { Pool } = require('pg');

// Named queries: node-postgres parses each name once per connection and afterwards sends only
// Bind/Execute for it.
const double = (v) => ({ name: 'double', text: 'SELECT $1::int * 2 AS v', values: [v] });
const insert = (id) => ({ name: 'insert', text: 'INSERT INTO node_items VALUES ($1, $2)', values: [id, `item ${id}`] });

async function main() {
  const pool = new Pool({ connectionString: process.env.DSN, max: Number(process.env.CLIENTS) });
  const tasks = [];
  for (let t = 0; t < 40; t++) {
    tasks.push((async () => {
      let sum = 0;
      for (let i = 0; i < 10; i++) {
        sum += (await pool.query(double(t * 100 + i))).rows[0].v;
      }
      const inserted = (await pool.query(insert(t))).rowCount;
      return { sum, inserted };
    })());
  }
  const results = await Promise.all(tasks);
  console.log(`sum=${results.reduce((a, r) => a + r.sum, 0)}`);
  console.log(`inserted=${results.reduce((a, r) => a + r.inserted, 0)}`);

  // Inside a transaction (one server in either pool mode): the named query, run again, exists
  // there as a protocol-level prepared statement.
  const client = await pool.connect();
  await client.query('BEGIN');
  console.log(`in_transaction=${(await client.query(double(21))).rows[0].v}`);
  const prepared = await client.query(
    "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement = 'SELECT $1::int * 2 AS v' AND NOT from_sql");
  console.log(`prepared=${prepared.rows[0].n}`);
  await client.query('COMMIT');
  client.release();

  const rows = await pool.query('SELECT count(*)::int AS n, sum(id)::int AS s FROM node_items');
  console.log(`rows=${rows.rows[0].n}`);
  console.log(`id_sum=${rows.rows[0].s}`);
  await pool.end();
}

main().catch((e) => { console.error(e); process.exit(1); });
"#;
    let peak = PeakBackends::start(s.pg, &s.db);
    let out = run_node(script, &[("DSN", &s.url("postgresql")), ("CLIENTS", &CLIENTS.to_string())]);
    let peak = peak.finish();
    let r = s.results("node-postgres", &out);

    let sum: i64 = (0..40).flat_map(|t| (0..10).map(move |i| (t * 100 + i) * 2)).sum();
    assert_eq!(value(&r, "sum"), sum.to_string());
    assert_eq!(value(&r, "inserted"), "40");
    assert_eq!(value(&r, "in_transaction"), "42");
    assert_eq!(value(&r, "prepared"), "1", "the named query is server-prepared");
    assert_eq!(value(&r, "rows"), "40");
    assert_eq!(value(&r, "id_sum"), (0..40).sum::<i32>().to_string());
    s.assert_pool_held(peak);
}

#[test]
fn pgjdbc_prepared_statements_and_batch_insert() {
    // Threads of the Java program, one connection each.
    const THREADS: usize = 6;
    // pgjdbc sends extra_float_digits in its startup packet. PgBouncer refuses it unless
    // `ignore_startup_parameters` lists it; pgcorral needs no such line: it sets the value on
    // whichever server the client is lent (tests/session_params.rs).
    let s = Setup::with_settings(
        "drv_jdbc",
        THREADS,
        "CREATE TABLE jdbc_items (id int PRIMARY KEY, name text);",
        "",
    );
    let source = r#"
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class Drivers {
    // The text pgjdbc sends for the query below, as pg_prepared_statements shows it.
    static final String PREPARED = "SELECT count(*) FROM pg_prepared_statements "
        + "WHERE statement = 'SELECT $1::int * 2, $2::text || ''!''' AND NOT from_sql";

    // One connection: a PreparedStatement run 20 times (server-prepared from the first run with
    // prepareThreshold=1), then a batch insert, then whether the query is prepared on the server
    // it runs on inside the transaction.
    static long[] work(String url, int thread) throws SQLException {
        try (Connection c = DriverManager.getConnection(url)) {
            long sum = 0, inserted = 0, prepared = 0;
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2, ?::text || '!'")) {
                for (int i = 0; i < 20; i++) {
                    ps.setInt(1, thread * 100 + i);
                    ps.setString(2, "t" + thread);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        sum += rs.getInt(1);
                        if (!rs.getString(2).equals("t" + thread + "!")) throw new IllegalStateException(rs.getString(2));
                    }
                }
                c.setAutoCommit(false);
                try (PreparedStatement ins = c.prepareStatement("INSERT INTO jdbc_items VALUES (?, ?)")) {
                    for (int i = 0; i < 50; i++) {
                        ins.setInt(1, thread * 1000 + i);
                        ins.setString(2, "thread " + thread + " row " + i);
                        ins.addBatch();
                    }
                    for (int n : ins.executeBatch()) inserted += n;
                }
                ps.setInt(1, 0);
                ps.setString(2, "");
                ps.executeQuery().close();
                try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(PREPARED)) {
                    rs.next();
                    prepared = rs.getLong(1);
                }
                c.commit();
            }
            return new long[] {sum, inserted, prepared};
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        int threads = Integer.parseInt(args[1]);
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        long sum = 0, inserted = 0, preparedThreads = 0;
        // Its threads would keep the JVM alive after a failure in main.
        try {
            List<Future<long[]>> futures = new ArrayList<>();
            for (int t = 0; t < threads; t++) {
                final int thread = t;
                futures.add(pool.submit(() -> work(url, thread)));
            }
            for (Future<long[]> f : futures) {
                long[] r = f.get();
                sum += r[0];
                inserted += r[1];
                if (r[2] == 1) preparedThreads++;
            }
        } finally {
            pool.shutdownNow();
        }
        System.out.println("sum=" + sum);
        System.out.println("inserted=" + inserted);
        System.out.println("prepared_threads=" + preparedThreads);
        try (Connection c = DriverManager.getConnection(url);
             Statement st = c.createStatement();
             ResultSet rs = st.executeQuery("SELECT count(*), sum(id) FROM jdbc_items")) {
            rs.next();
            System.out.println("rows=" + rs.getLong(1));
            System.out.println("id_sum=" + rs.getLong(2));
        }
    }
}
"#;
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/{}?user={APP_USER}&password={APP_PASSWORD}&prepareThreshold=1",
        s.pooler.port, s.db
    );
    let peak = PeakBackends::start(s.pg, &s.db);
    let out = run_java("Drivers", source, &[&url, &THREADS.to_string()]);
    let peak = peak.finish();
    let r = s.results("pgjdbc", &out);

    let threads = THREADS as i64;
    let sum: i64 = (0..threads).flat_map(|t| (0..20).map(move |i| (t * 100 + i) * 2)).sum();
    assert_eq!(value(&r, "sum"), sum.to_string());
    assert_eq!(value(&r, "inserted"), (threads * 50).to_string(), "executeBatch counted every row");
    assert_eq!(value(&r, "prepared_threads"), THREADS.to_string(), "server-prepared on every connection");
    assert_eq!(value(&r, "rows"), (threads * 50).to_string());
    let id_sum: i64 = (0..threads).flat_map(|t| (0..50).map(move |i| t * 1000 + i)).sum();
    assert_eq!(value(&r, "id_sum"), id_sum.to_string());
    s.assert_pool_held(peak);
}

#[test]
fn tokio_postgres_statements_prepared_once_and_reused() {
    const CLIENTS: usize = 8;
    let s = Setup::new("drv_tokio", CLIENTS, "CREATE TABLE events (client int, n int, label text);");
    let url = s.pooler.url(APP_USER, APP_PASSWORD, &s.db);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let peak = PeakBackends::start(s.pg, &s.db);
    let results: Vec<(i64, i64, i64)> = runtime.block_on(async {
        let tasks: Vec<_> = (0..CLIENTS as i32)
            .map(|c| {
                let url = url.clone();
                tokio::spawn(async move {
                    let mut client = connect_plain(&url).await.expect("login through pgcorral");
                    // Prepared once (a named statement), executed 50 times one by one and 20
                    // more pipelined on the connection, then used again inside a transaction.
                    let double = client.prepare("SELECT $1::int4 * 2").await.expect("prepare");
                    let insert =
                        client.prepare("INSERT INTO events VALUES ($1, $2, $3)").await.expect("prepare");
                    let mut sum = 0i64;
                    for n in 0..50 {
                        let row = client.query_one(&double, &[&(c * 100 + n)]).await.expect("query");
                        sum += i64::from(row.get::<_, i32>(0));
                    }
                    let args: Vec<i32> = (0..20).collect();
                    let pipelined = futures_util::future::try_join_all(args.iter().map(|&n| {
                        let (client, double) = (&client, &double);
                        async move { client.query_one(double, &[&n]).await }
                    }))
                    .await
                    .expect("pipelined queries");
                    let piped: i64 = pipelined.iter().map(|row| i64::from(row.get::<_, i32>(0))).sum();
                    let tx = client.transaction().await.expect("begin");
                    for n in 0..10 {
                        tx.execute(&insert, &[&c, &n, &format!("c{c}n{n}")]).await.expect("insert");
                    }
                    tx.query_one(&double, &[&1]).await.expect("query in transaction");
                    let prepared: i64 = tx
                        .query_one(
                            "SELECT count(*) FROM pg_prepared_statements \
                             WHERE statement = 'SELECT $1::int4 * 2' AND NOT from_sql",
                            &[],
                        )
                        .await
                        .expect("pg_prepared_statements")
                        .get(0);
                    tx.commit().await.expect("commit");
                    (sum, piped, prepared)
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("client task"));
        }
        results
    });
    let peak = peak.finish();

    for (c, &(sum, piped, prepared)) in results.iter().enumerate() {
        let c = c as i64;
        assert_eq!(sum, (0..50).map(|n| (c * 100 + n) * 2).sum::<i64>(), "client {c}");
        assert_eq!(piped, (0..20).map(|n| n * 2).sum::<i64>(), "client {c}");
        assert_eq!(prepared, 1, "client {c}: the statement is server-prepared");
    }
    assert_eq!(s.sql("SELECT count(*) FROM events"), (CLIENTS * 10).to_string());
    assert_eq!(s.sql("SELECT count(DISTINCT label) FROM events"), (CLIENTS * 10).to_string());
    s.assert_pool_held(peak);
}

#[test]
fn pgbench_prepared_and_extended_protocol() {
    const CLIENTS: usize = 8;
    const TRANSACTIONS: usize = 50;
    let s = Setup::new("drv_pgbench", CLIENTS, "");
    // Tables made directly on PostgreSQL: the test is about the runs, not the load.
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", &s.pg.port.to_string(), "-U", APP_USER])
        .arg(&s.db)
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .expect("run pgbench -i");
    assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));

    let peak = PeakBackends::start(s.pg, &s.db);
    // -M prepared runs select-only: pgbench 15 prepares each statement the first time it runs
    // it, blocking its whole thread, so a TPC-B transaction (several statements) deadlocks any
    // transaction pooler with fewer servers than pgbench clients, PgBouncer included.
    for (mode, script) in [("prepared", "-S"), ("extended", "-N")] {
        let out = Command::new(pg_bin("pgbench"))
            .args([
                "-n",
                script,
                "-M",
                mode,
                "-c",
                &CLIENTS.to_string(),
                "-j",
                "2",
                "-t",
                &TRANSACTIONS.to_string(),
            ])
            .args(["-h", "127.0.0.1", "-p", &s.pooler.port.to_string(), "-U", APP_USER])
            .arg(&s.db)
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .expect("run pgbench");
        let report =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pgbench -M {mode}:\n{report}\n{}", s.pooler.log());
        assert!(report.contains(&format!("query mode: {mode}")), "{report}");
        let all = CLIENTS * TRANSACTIONS;
        let processed = format!("number of transactions actually processed: {all}/{all}");
        assert!(report.contains(&processed), "pgbench -M {mode}:\n{report}");
        assert!(report.contains("number of failed transactions: 0"), "pgbench -M {mode}:\n{report}");
    }
    let peak = peak.finish();
    // The simple-update script (-N) logs one history row per transaction; select-only none.
    assert_eq!(s.sql("SELECT count(*) FROM pgbench_history"), (CLIENTS * TRANSACTIONS).to_string());
    s.assert_pool_held(peak);
}
