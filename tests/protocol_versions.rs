//! Protocol 3.2 and its negotiation, on both sides of the pooler, against PostgreSQL 15 and 18.
//!
//! A client may ask for any minor version of protocol 3 and for `_pq_.` options: pgcorral
//! answers exactly what PostgreSQL 18 answers. A 3.2 client holds a 32-byte cancel key of
//! pgcorral's, whatever the server's key is, and its cancels reach the right server. psycopg
//! 3.3.9 (libpq 18) is the real client.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use support::wire::{read_msg, send_cancel, startup, KeyedSession, Msg};
use support::*;

/// The first message a server (or pgcorral) answers `packet` with.
fn first_answer(port: u16, packet: &[u8]) -> Msg {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(packet).unwrap();
    read_msg(&mut stream)
}

/// pgcorral with `auth_type = plain` in front of `pg`'s database `app`, logging what each
/// server login negotiated (`verbose = 1`).
fn pooler_for(pg: &Postgres) -> Pooler {
    let ini = pool_ini(pg, APP_DB, "", "transaction", "verbose = 1")
        .replace("auth_type = md5", "auth_type = plain");
    Pooler::start(&ini, &app_userlist())
}

#[test]
fn newer_versions_and_protocol_options_are_answered_as_postgresql_18_answers() {
    let pg18 = Postgres::start_version(18);
    let pooler = pooler_for(&pg18);
    let user = [("user", TRUST_USER), ("database", APP_DB)];
    let cases: [(&str, Vec<u8>); 5] = [
        ("3.5 and an option", startup(3, 5, &[user[0], user[1], ("_pq_.test_option", "x")])),
        ("3.9999", startup(3, 9999, &user)),
        ("3.0 and two options", startup(3, 0, &[("_pq_.a", "1"), user[0], ("_pq_.b", "2"), user[1]])),
        ("3.2 and an option", startup(3, 2, &[user[0], user[1], ("_pq_.x", "")])),
        ("4.0", startup(4, 0, &user)),
    ];
    for (what, packet) in &cases {
        let theirs = first_answer(pg18.port, packet);
        let ours = first_answer(pooler.port, packet);
        match theirs.tag {
            b'v' => assert_eq!((ours.tag, &ours.body), (b'v', &theirs.body), "{what}"),
            b'E' => {
                assert_eq!(ours.tag, b'E', "{what}: {ours:?}");
                assert_eq!(ours.sqlstate(), theirs.sqlstate(), "{what}");
                assert_eq!(ours.field(b'M'), theirs.field(b'M'), "{what}");
            }
            other => panic!("{what}: PostgreSQL 18 answered {}", other as char),
        }
    }
    // Nothing to negotiate: no NegotiateProtocolVersion from either.
    for minor in [0, 2] {
        let packet = startup(3, minor, &user);
        assert_eq!(first_answer(pg18.port, &packet).tag, b'R', "PostgreSQL, 3.{minor}");
        assert_eq!(first_answer(pooler.port, &packet).tag, b'R', "pgcorral, 3.{minor}");
    }
}

/// A logged-in raw client of protocol `3.minor`, with its BackendKeyData.
fn raw_login(port: u16, minor: u16) -> KeyedSession {
    KeyedSession::login(("127.0.0.1", port), minor, APP_USER, APP_PASSWORD, APP_DB)
}

fn cancel(port: u16, process_id: i32, key: &[u8]) {
    send_cancel(("127.0.0.1", port), process_id, key)
}

/// Runs `pg_sleep(seconds)` on `session` while `cancel_with` is sent after a moment; returns
/// the SQLSTATE the query ended with (None: it ran to the end) and how long it took.
fn sleep_and_cancel(
    port: u16,
    session: &mut KeyedSession,
    seconds: u32,
    key: &[u8],
) -> (Option<String>, Duration) {
    session.query_while(&format!("SELECT pg_sleep({seconds})"), |s| cancel(port, s.process_id, key))
}

/// Each client's key is as long as its protocol allows, and only the whole key cancels: over
/// PostgreSQL 15 (whose keys are 4 bytes) and 18 (32 bytes), for 3.0 and 3.2 clients alike.
#[test]
fn cancel_keys_are_as_long_as_the_clients_protocol_and_cancel_whatever_the_servers_key() {
    for major in [15, 18] {
        let pg = Postgres::start_version(major);
        let pooler = pooler_for(&pg);
        for (minor, length) in [(0u16, 4usize), (2, 32)] {
            let what = format!("PostgreSQL {major}, client 3.{minor}");
            let mut session = raw_login(pooler.port, minor);
            assert_eq!(session.key.len(), length, "{what}: BackendKeyData's key");
            let mut wrong = session.key.clone();
            wrong[length - 1] ^= 1;
            let (error, _) = sleep_and_cancel(pooler.port, &mut session, 1, &wrong);
            assert_eq!(error, None, "{what}: a key one bit off cancelled");
            let truncated = session.key[..4].to_vec();
            if length > 4 {
                let (error, _) = sleep_and_cancel(pooler.port, &mut session, 1, &truncated);
                assert_eq!(error, None, "{what}: the first 4 bytes of a long key cancelled");
            }
            let key = session.key.clone();
            let (error, took) = sleep_and_cancel(pooler.port, &mut session, 60, &key);
            assert_eq!(error.as_deref(), Some("57014"), "{what}: the right key did not cancel");
            assert!(took < Duration::from_secs(30), "{what}: cancelled only after {took:?}");
        }
        // Toward the server: 3.2 where it speaks it, 3.0 with an older one.
        let agreed = if major >= 18 { "protocol 3.2" } else { "protocol 3.0" };
        let log = pooler.log();
        assert!(log.contains(&format!("logged in with {agreed}")), "PostgreSQL {major}: {log}");
    }
}

/// psycopg 3.3.9 bundles libpq 18: with `max_protocol_version=3.2` or `latest` it speaks 3.2
/// with pgcorral, whichever PostgreSQL is behind it, and both of libpq's cancels work.
#[test]
fn psycopg_with_libpq_18_speaks_3_2_through_pgcorral_and_cancels() {
    let script = r#"
import os, threading, time, psycopg
from psycopg import errors

print(f"libpq={psycopg.pq.version()}")
for setting in ["3.0", "3.2", "latest"]:
    conn = psycopg.connect(os.environ["DSN"], max_protocol_version=setting, autocommit=True)
    print(f"{setting}_protocol={conn.pgconn.full_protocol_version}")
    print(f"{setting}_value={conn.execute('SELECT 40 + 2').fetchone()[0]}")
    for how in ["cancel_safe", "cancel"]:
        timer = threading.Timer(0.5, getattr(conn, how))
        timer.start()
        started = time.monotonic()
        try:
            conn.execute("SELECT pg_sleep(60)")
            outcome = "ran"
        except errors.QueryCanceled:
            outcome = "cancelled"
        timer.join()
        speed = "fast" if time.monotonic() - started < 30 else "slow"
        print(f"{setting}_{how}={outcome} {speed}")
    conn.close()
"#;
    for major in [15, 18] {
        let pg = Postgres::start_version(major);
        let pooler = pooler_for(&pg);
        let dsn = pooler.url(APP_USER, APP_PASSWORD, APP_DB);
        let out = run_python(script, &[("DSN", &dsn)]);
        let r = printed_results("psycopg", &out, || pooler.log());
        assert_eq!(r["libpq"], "180006", "psycopg 3.3.9's libpq 18");
        for (setting, protocol) in [("3.0", "30000"), ("3.2", "30002"), ("latest", "30002")] {
            let what = format!("PostgreSQL {major}, max_protocol_version={setting}");
            assert_eq!(r[&format!("{setting}_protocol")], protocol, "{what}");
            assert_eq!(r[&format!("{setting}_value")], "42", "{what}");
            for how in ["cancel_safe", "cancel"] {
                assert_eq!(r[&format!("{setting}_{how}")], "cancelled fast", "{what}, {how}");
            }
        }
    }
}

/// A server that does not negotiate: PgBouncer before 1.23 closes a 3.2 startup instead of
/// answering NegotiateProtocolVersion. pgcorral logs in again asking for 3.0, remembers, and
/// its clients (3.2 ones too) notice nothing.
#[test]
fn a_server_that_refuses_3_2_instead_of_negotiating_is_asked_for_3_0() {
    let pg = Postgres::shared();
    let bouncer = PgBouncer::start(
        &format!("{APP_DB} = host=127.0.0.1 port={} dbname={APP_DB}", pg.port),
        &app_userlist(),
    );
    let first = first_answer(bouncer.port, &startup(3, 2, &[("user", APP_USER), ("database", APP_DB)]));
    assert_eq!(first.tag, b'E', "PgBouncer 1.18 refuses 3.2 (it would negotiate from 1.23): {first:?}");

    let ini = format!(
        "[databases]\n{APP_DB} = host=127.0.0.1 port={} dbname={APP_DB}\n[pgbouncer]\nauth_type = plain\n\
         pool_mode = transaction\ndefault_pool_size = 2\nserver_reset_query =\n",
        bouncer.port
    );
    let pooler = Pooler::start(&ini, &app_userlist());
    for minor in [2, 0, 2] {
        let mut session = raw_login(pooler.port, minor);
        let answer = session_query(&mut session, "SELECT current_user");
        assert_eq!(answer, APP_USER, "client 3.{minor}");
    }
    let log = pooler.log();
    let logfile = log.split("--- pgcorral.log ---").nth(1).unwrap_or_default();
    assert_eq!(logfile.matches("refused protocol 3.2").count(), 1, "refused once, then remembered: {log}");
}

/// The first column of the first row `sql` returns on a raw session.
fn session_query(session: &mut KeyedSession, sql: &str) -> String {
    session.stream.write_all(&wire::query(sql)).unwrap();
    let mut value = None;
    loop {
        let m = read_msg(&mut session.stream);
        match m.tag {
            b'D' => value = value.or_else(|| m.columns().into_iter().next().flatten()),
            b'E' => panic!("{sql}: {:?}", m.field(b'M')),
            b'Z' => return value.unwrap_or_default(),
            _ => {}
        }
    }
}
