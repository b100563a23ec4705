//! Clients that misbehave, or merely do something unusual, cannot turn the data path against
//! other clients: names in pgcorral's own namespace, SQL-level statement tampering, COPY over
//! the extended protocol, clients leaving or killed while queued, and Terminate in the same
//! write as a query. Each test runs a transaction-mode pooler with one worker and one server
//! connection, so that every client shares that server with the others, through a raw protocol
//! client that sends exactly the bytes under test.

mod support;

use std::time::Duration;

use pgcorral::protocol::prepared::StatementDef;
use support::wire::*;
use support::*;

fn start(db: &str, general: &str) -> Pooler {
    let pg = Postgres::shared();
    let general = format!("workers = 1\nquery_wait_timeout = 30\nadmin_users = app_user\n{general}");
    let ini = pool_ini(pg, db, "pool_size=1", "transaction", &general)
        .replace("auth_type = md5", "auth_type = plain");
    Pooler::start(&ini, &app_userlist())
}

fn client(pooler: &Pooler, db: &str) -> RawClient {
    RawClient::connect(pooler.port, APP_USER, APP_PASSWORD, db)
}

/// The text of the only column of every DataRow in `messages`.
fn values(messages: &[Msg]) -> Vec<String> {
    messages.iter().filter(|m| m.tag == b'D').map(|m| m.columns()[0].clone().unwrap_or_default()).collect()
}

fn errors(messages: &[Msg]) -> Vec<String> {
    messages.iter().filter(|m| m.tag == b'E').map(|m| m.sqlstate().unwrap_or_default()).collect()
}

fn table(db: &str, name: &str) {
    Postgres::shared().sql_db(db, &format!("CREATE TABLE {name} (v text); GRANT ALL ON {name} TO app_user;"));
}

fn count(db: &str, sql: &str) -> i64 {
    Postgres::shared().sql_db(db, sql).trim().parse().expect("a count")
}

#[test]
fn reusing_pgcorrals_own_statement_name_gets_postgres_error_and_the_worker_lives_on() {
    let db = Postgres::shared().create_database("hostile_names");
    let pooler = start(&db, "");
    let mut c = client(&pooler, &db);
    // Exactly the name pgcorral gives this statement on servers (as a pgcorral in front of
    // this one would send it).
    let name = StatementDef::new("SELECT 1".into(), vec![]).server_name;
    c.send(&batch(&[parse(&name, "SELECT 1"), sync()]));
    assert_eq!(tags(&c.until_ready()), "1Z");
    c.send(&batch(&[parse(&name, "SELECT 1"), sync()]));
    let answer = c.until_ready();
    assert_eq!(tags(&answer), "EZ");
    assert_eq!(errors(&answer), ["42P05"]);
    let text = answer[0].field(b'M').unwrap();
    assert_eq!(text, format!("prepared statement \"{name}\" already exists"));
    // Its own statement still runs, and the worker serves another client.
    c.send(&batch(&[bind(&name, &[]), execute(), sync()]));
    assert_eq!(values(&c.until_ready()), ["1"]);
    let mut other = client(&pooler, &db);
    assert_eq!(values(&other.simple("SELECT 42")), ["42"]);
}

#[test]
fn one_client_cannot_replace_or_reach_another_clients_prepared_statement() {
    let db = Postgres::shared().create_database("hostile_forge");
    let pooler = start(&db, "");
    let mut a = client(&pooler, &db);
    let sql = "SELECT 'own:' || $1::text";
    a.send(&batch(&[parse("mine", sql), bind("mine", &["1"]), execute(), sync()]));
    assert_eq!(values(&a.until_ready()), ["own:1"]);

    // b shares a's server (pool_size = 1) and finds a's statement there.
    let mut b = client(&pooler, &db);
    let listed = values(&b.simple("SELECT name FROM pg_prepared_statements"));
    let victim = StatementDef::new(sql.into(), vec![]).server_name;
    assert_eq!(listed, std::slice::from_ref(&victim), "a's statement is on the shared server");
    // Through the protocol, b cannot bind, describe or close it: the name reaches nothing.
    b.send(&batch(&[bind(&victim, &["x"]), execute(), sync()]));
    let answer = b.until_ready();
    assert_eq!(errors(&answer), ["26000"]);
    assert!(answer[0].field(b'M').unwrap().contains(&victim), "b's own spelling in the error");
    b.send(&batch(&[close_statement(&victim), sync()]));
    assert_eq!(tags(&b.until_ready()), "3Z");
    // Through SQL, b replaces it with a statement of its own.
    let forged = format!("DEALLOCATE \"{victim}\"; PREPARE \"{victim}\"(text) AS SELECT 'forged:' || $1");
    assert_eq!(errors(&b.simple(&forged)), Vec::<String>::new());

    // a gets its own statement's result: the tampered server never served anyone else.
    a.send(&batch(&[bind("mine", &["2"]), execute(), sync()]));
    assert_eq!(values(&a.until_ready()), ["own:2"]);
    let forged_left = values(&a.simple("SELECT count(*) FROM pg_prepared_statements WHERE from_sql"));
    assert_eq!(forged_left, ["0"], "a's server holds no SQL-prepared statement");
}

#[test]
fn dynamic_sql_in_a_do_block_or_temporary_function_cannot_forge_another_clients_statement() {
    let db = Postgres::shared().create_database("hostile_dynamic");
    let pooler = start(&db, "");
    let mut a = client(&pooler, &db);
    let sql = "SELECT 'own:' || $1::text";
    a.send(&batch(&[parse("mine", sql), bind("mine", &["1"]), execute(), sync()]));
    assert_eq!(values(&a.until_ready()), ["own:1"]);
    let victim = StatementDef::new(sql.into(), vec![]).server_name;
    // No PREPARE or DEALLOCATE tag reaches pgcorral: PL/pgSQL runs them as dynamic SQL.
    let forge = format!(
        "EXECUTE format('DEALLOCATE %I', '{victim}'); \
         EXECUTE format('PREPARE %I(text) AS SELECT ''forged:'' || $1', '{victim}');"
    );
    let attacks = [
        format!("DO $$BEGIN {forge} END$$"),
        format!(
            "CREATE FUNCTION pg_temp.forge() RETURNS void LANGUAGE plpgsql AS $$BEGIN {forge} END$$; \
             SELECT pg_temp.forge()"
        ),
    ];
    for (round, attack) in attacks.iter().enumerate() {
        let mut b = client(&pooler, &db);
        assert_eq!(errors(&b.simple(attack)), Vec::<String>::new(), "{attack}");
        let n = (round + 2).to_string();
        a.send(&batch(&[bind("mine", &[&n]), execute(), sync()]));
        assert_eq!(values(&a.until_ready()), [format!("own:{n}")], "after {attack}");
    }
}

#[test]
fn the_statement_books_follow_deallocate_all_and_discard_all_whatever_their_path() {
    let db = Postgres::shared().create_database("hostile_books");
    let pooler = start(&db, "");
    let mut a = client(&pooler, &db);
    let prepare_and_run = |a: &mut RawClient, n: &str| {
        a.send(&batch(&[parse("s1", &format!("SELECT {n}")), bind("s1", &[]), execute(), sync()]));
        a.until_ready()
    };
    assert_eq!(values(&prepare_and_run(&mut a, "1")), ["1"]);

    // DEALLOCATE ALL through the extended protocol: s1 is gone, as PostgreSQL would have it,
    // and the name can be prepared again.
    a.send(&batch(&[parse("", "DEALLOCATE ALL"), bind("", &[]), execute(), sync()]));
    assert_eq!(errors(&a.until_ready()), Vec::<String>::new());
    a.send(&batch(&[bind("s1", &[]), execute(), sync()]));
    assert_eq!(errors(&a.until_ready()), ["26000"]);
    assert_eq!(values(&prepare_and_run(&mut a, "2")), ["2"]);

    // DEALLOCATE ALL inside a multi-statement query.
    assert_eq!(errors(&a.simple("SELECT 1; DEALLOCATE ALL")), Vec::<String>::new());
    assert_eq!(values(&prepare_and_run(&mut a, "3")), ["3"]);

    // A DISCARD ALL that fails (inside a transaction block) drops nothing.
    assert_eq!(errors(&a.simple("BEGIN")), Vec::<String>::new());
    assert_eq!(errors(&a.simple("DISCARD ALL")), ["25001"]);
    a.simple("ROLLBACK");
    a.send(&batch(&[bind("s1", &[]), execute(), sync()]));
    assert_eq!(values(&a.until_ready()), ["3"], "s1 survived the failed DISCARD ALL");
}

#[test]
fn copy_from_stdin_over_the_extended_protocol_gives_its_server_back() {
    let db = Postgres::shared().create_database("hostile_copy");
    table(&db, "t");
    let pooler = start(&db, "");
    let mut a = client(&pooler, &db);
    let mut b = client(&pooler, &db);
    let copy = || batch(&[parse("", "COPY t FROM STDIN"), bind("", &[]), execute(), sync()]);

    // libpq pipelines and tokio-postgres copy_in: the Sync right after the Execute is read by
    // the COPY and never answered; the one after CopyDone is.
    a.send(&copy());
    let mut head = Vec::new();
    while head.last().is_none_or(|m: &Msg| m.tag != b'G') {
        head.push(a.read());
    }
    assert_eq!(tags(&head), "12G");
    a.send(&batch(&[copy_data(b"one\n"), copy_data(b"two\n"), copy_done(), sync()]));
    assert_eq!(tags(&a.until_ready()), "CZ");
    assert_eq!(values(&b.simple("SELECT count(*) FROM t")), ["2"], "a's server came back");

    // All in one write, and a failing row in the middle.
    let mut all = copy();
    all.extend(batch(&[copy_data(b"three\n"), copy_done(), sync()]));
    a.send(&all);
    assert_eq!(tags(&a.until_ready()), "12GCZ");
    let mut bad = batch(&[parse("", "COPY t (v) FROM STDIN (FORMAT csv)"), bind("", &[]), execute(), sync()]);
    bad.extend(batch(&[
        copy_data(b"four\n"),
        copy_data(b"x,y\n"),
        copy_data(b"five\n"),
        copy_done(),
        sync(),
    ]));
    a.send(&bad);
    let answer = a.until_ready();
    assert_eq!(tags(&answer), "12GEZ");
    assert_eq!(values(&b.simple("SELECT count(*) FROM t")), ["3"]);

    // COPY TO STDOUT, extended and simple.
    a.send(&batch(&[parse("", "COPY t TO STDOUT"), bind("", &[]), execute(), sync()]));
    assert_eq!(tags(&a.until_ready()), "12HdddcCZ");
    assert_eq!(tags(&a.simple("COPY t TO STDOUT")), "HdddcCZ");
    assert_eq!(values(&b.simple("SELECT 'b runs'")), ["b runs"]);
}

#[tokio::test]
async fn tokio_postgres_copy_in_and_out_through_transaction_pooling() {
    use futures_util::{pin_mut, SinkExt, TryStreamExt};
    let db = Postgres::shared().create_database("hostile_copy_tp");
    table(&db, "t");
    let pooler = start(&db, "");
    let a = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("a connects");
    let b = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("b connects");
    for round in 0..3 {
        let sink = a.copy_in("COPY t FROM STDIN").await.expect("copy_in");
        pin_mut!(sink);
        for i in 0..100 {
            sink.send(bytes::Bytes::from(format!("{round}-{i}\n"))).await.expect("copy data");
        }
        assert_eq!(sink.finish().await.expect("copy done"), 100);
        let n: i64 = b.query_one("SELECT count(*) FROM t", &[]).await.expect("b's query").get(0);
        assert_eq!(n, 100 * (round + 1));
    }
    let stream = a.copy_out("COPY t TO STDOUT").await.expect("copy_out");
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("copy out data");
    assert_eq!(chunks.iter().map(|c| c.iter().filter(|&&b| b == b'\n').count()).sum::<usize>(), 300);
    let one: i32 = b.query_one("SELECT 1", &[]).await.expect("b's query").get(0);
    assert_eq!(one, 1);
}

/// Holds the only server inside a transaction, so that the next client queues.
fn hold_the_server(pooler: &Pooler, db: &str) -> RawClient {
    let mut holder = client(pooler, db);
    assert_eq!(errors(&holder.simple("BEGIN")), Vec::<String>::new());
    assert_eq!(values(&holder.simple("SELECT 'held'")), ["held"]);
    holder
}

/// Whether SHOW CLIENTS lists a client waiting for a server.
fn has_waiter(pooler: &Pooler) -> bool {
    let out = pooler.psql(APP_USER, APP_PASSWORD, "pgbouncer", "SHOW CLIENTS");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split('|').nth(4) == Some("waiting"))
}

/// Waits until SHOW CLIENTS lists a client waiting for a server.
fn wait_for_a_waiter(pooler: &Pooler) {
    assert!(wait_until(Duration::from_secs(10), || has_waiter(pooler)), "a client queued for the server");
}

#[test]
fn a_client_that_leaves_while_queued_has_nothing_run() {
    let db = Postgres::shared().create_database("hostile_queued");
    table(&db, "t");
    let pooler = start(&db, "");
    let mut holder = hold_the_server(&pooler, &db);
    let mut leaver = client(&pooler, &db);
    leaver.send(&query("INSERT INTO t VALUES ('left while queued')"));
    wait_for_a_waiter(&pooler);
    drop(leaver);
    // Until the queue has seen it leave, a freed server could still run its INSERT.
    let gone = wait_until(Duration::from_secs(10), || !has_waiter(&pooler));
    assert!(gone, "the client that left is no longer queued");
    holder.simple("COMMIT");
    // The freed server would serve the waiter at once: let a later client prove it is free.
    let mut later = client(&pooler, &db);
    assert_eq!(values(&later.simple("SELECT count(*) FROM t")), ["0"]);
    assert_eq!(count(&db, "SELECT count(*) FROM t"), 0, "the INSERT never reached PostgreSQL");
}

#[test]
fn a_client_killed_while_queued_has_nothing_run_after_resume() {
    let db = Postgres::shared().create_database("hostile_killed");
    table(&db, "t");
    let pooler = start(&db, "");
    let _holder = hold_the_server(&pooler, &db);
    let mut queued = client(&pooler, &db);
    queued.send(&query("INSERT INTO t VALUES ('killed while queued')"));
    wait_for_a_waiter(&pooler);
    let kill = pooler.psql(APP_USER, APP_PASSWORD, "pgbouncer", &format!("KILL {db}"));
    assert!(kill.status.success(), "KILL: {}", String::from_utf8_lossy(&kill.stderr));
    let answer = queued.read();
    assert_eq!(answer.tag, b'E', "the queued client is told it was killed");
    let resume = pooler.psql(APP_USER, APP_PASSWORD, "pgbouncer", &format!("RESUME {db}"));
    assert!(resume.status.success(), "RESUME: {}", String::from_utf8_lossy(&resume.stderr));
    let mut later = client(&pooler, &db);
    assert_eq!(values(&later.simple("SELECT count(*) FROM t")), ["0"]);
    assert_eq!(count(&db, "SELECT count(*) FROM t"), 0, "the INSERT never reached PostgreSQL");
}

#[test]
fn a_query_sent_with_terminate_in_the_same_write_runs_before_the_goodbye() {
    let db = Postgres::shared().create_database("hostile_terminate");
    table(&db, "t");
    let pooler = start(&db, "");
    let mut c = client(&pooler, &db);
    c.send(&batch(&[query("INSERT INTO t VALUES ('then terminate')"), terminate()]));
    drop(c);
    let arrived = wait_until(Duration::from_secs(10), || count(&db, "SELECT count(*) FROM t") == 1);
    assert!(arrived, "the INSERT sent before Terminate ran");

    // An open transaction at Terminate is rolled back, as PostgreSQL does, and the server
    // serves the next client.
    let mut c = client(&pooler, &db);
    c.send(&batch(&[query("BEGIN"), query("INSERT INTO t VALUES ('rolled back')"), terminate()]));
    drop(c);
    let mut later = client(&pooler, &db);
    assert_eq!(values(&later.simple("SELECT count(*) FROM t")), ["1"]);
    assert_eq!(values(&later.simple("SELECT 'server free'")), ["server free"]);
}

#[test]
fn a_client_that_stops_reading_is_ended_by_query_timeout_and_gone_soon_after() {
    let db = Postgres::shared().create_database("hostile_stalled");
    let pooler = start(&db, "query_timeout = 2");
    let mut stalled = client(&pooler, &db);
    // About 200 MB of result that the client never reads: pgcorral stops reading the server,
    // the query stalls, query_timeout ends it, and the goodbye cannot be delivered.
    stalled.send(&query("SELECT repeat('x', 1000000) FROM generate_series(1, 200)"));
    let clients = |pooler: &Pooler| {
        let out = pooler.psql(APP_USER, APP_PASSWORD, "pgbouncer", "SHOW CLIENTS");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&db)).count()
    };
    assert!(wait_until(Duration::from_secs(5), || clients(&pooler) == 1), "the stalled client is listed");
    let gone = wait_until(Duration::from_secs(20), || clients(&pooler) == 0);
    assert!(gone, "a client that reads nothing is dropped once its query timed out");
    let mut next = client(&pooler, &db);
    assert_eq!(values(&next.simple("SELECT 'served'")), ["served"]);
    drop(stalled);
}

#[test]
fn answers_pgcorral_writes_itself_stop_when_the_client_does_not_read() {
    let db = Postgres::shared().create_database("hostile_flood");
    let pooler = start(&db, "");
    let mut flooder = client(&pooler, &db);
    let pid = pooler.pid();
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        kib.split_whitespace().next().unwrap().parse::<u64>().unwrap() * 1024
    };
    let before = rss();
    // DEALLOCATE ALL with no server leased is answered by pgcorral itself. 100 MiB of them,
    // never reading an answer: pgcorral must stop reading rather than queue 130 MiB of answers.
    flooder.stream.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let block: Vec<u8> = std::iter::repeat_n(query("DEALLOCATE ALL").to_vec(), 32 * 1024).flatten().collect();
    let mut sent = 0usize;
    while sent < 100 << 20 {
        match std::io::Write::write(&mut flooder.stream, &block) {
            Ok(n) if n > 0 => sent += n,
            _ => break,
        }
    }
    assert!(sent < 100 << 20, "pgcorral kept reading a client that read nothing ({} MiB)", sent >> 20);
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "pgcorral grew by {} MiB", grown >> 20);
    let mut other = client(&pooler, &db);
    assert_eq!(values(&other.simple("SELECT 'unharmed'")), ["unharmed"]);
}

#[test]
fn a_named_parse_too_large_to_hold_ends_the_session_with_54000_and_harms_no_one() {
    let db = Postgres::shared().create_database("hostile_big_parse");
    let pooler = start(&db, "");
    let mut c = client(&pooler, &db);
    // pgcorral must hold a named Parse whole to map its name; above 4 MiB it refuses, as
    // PostgreSQL refuses what is above its own limits.
    let text = format!("SELECT '{}'", "x".repeat(5 << 20));
    // Its head says enough: pgcorral answers before the rest is sent (sending it all into a
    // closed connection would reset it before the answer could be read).
    c.send(&batch(&[parse("big", &text)])[..64]);
    let answer = c.read();
    assert_eq!(answer.tag, b'E');
    assert_eq!(answer.sqlstate().as_deref(), Some("54000"));
    assert_eq!(answer.field(b'S').as_deref(), Some("FATAL"));
    // An unnamed one of the same size streams through to PostgreSQL.
    let mut d = client(&pooler, &db);
    d.send(&batch(&[parse("", &text), bind("", &[]), execute(), sync()]));
    let answer = d.until_ready();
    assert_eq!(tags(&answer), "12DCZ");
    assert_eq!(answer[2].columns()[0].as_ref().map(String::len), Some(5 << 20));
}
