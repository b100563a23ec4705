//! Bad input from clients never takes pgcorral down or disturbs other clients: malformed
//! startup packets, CancelRequests with wrong keys, an oversized message after login, random
//! byte streams, half-sent startup packets, and connections dropped at every stage of the login.
//!
//! Each test runs its own transaction-mode pooler with a witness client that sits inside an
//! open transaction while the bad input arrives; afterwards the witness must still be in that
//! transaction and commit, a fresh psql login must work and the daemon must be alive and must not
//! have panicked (a panicking worker thread leaves the process up but strands its clients).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Once;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use support::*;
use tokio_postgres::error::SqlState;

/// Liveness bound for every answer the daemon owes a client.
const DEADLINE: Duration = Duration::from_secs(10);

const PROTOCOL_3_0: u32 = 196_608;
const PROTOCOL_2_0: u32 = 0x0002_0000;
const CANCEL_REQUEST: u32 = 80_877_102;

fn ini(pg: &Postgres) -> String {
    format!(
        "[databases]\napp = host=127.0.0.1 port={} dbname=app\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\nmax_packet_size = 1048576\n\
         max_client_conn = 50\n",
        pg.port
    )
}

/// One table for every test; each test's rows carry its name.
fn create_witness_table(pg: &Postgres) {
    static CREATED: Once = Once::new();
    CREATED.call_once(|| {
        pg.sql_db(
            APP_DB,
            "CREATE TABLE IF NOT EXISTS robustness_witness (test text NOT NULL, step int NOT NULL);
             GRANT ALL ON robustness_witness TO app_user;",
        );
    });
}

/// A pooler and a client that is inside an open transaction whenever bad input arrives.
struct Fixture {
    pooler: Pooler,
    witness: tokio_postgres::Client,
    test: &'static str,
    step: i32,
    xid: String,
}

impl Fixture {
    async fn start(test: &'static str) -> Fixture {
        let pg = Postgres::shared();
        create_witness_table(pg);
        let pooler = Pooler::start(&ini(pg), &Pooler::userlist_line(APP_USER, APP_PASSWORD));
        let witness = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("witness login");
        let mut fixture = Fixture { pooler, witness, test, step: 0, xid: String::new() };
        fixture.open_transaction().await;
        fixture
    }

    async fn open_transaction(&mut self) {
        self.witness.batch_execute("BEGIN").await.expect("witness BEGIN");
        self.insert("before the bad input").await;
        self.xid = self.current_xid().await;
    }

    async fn insert(&self, when: &str) {
        self.witness
            .execute("INSERT INTO robustness_witness VALUES ($1, $2)", &[&self.test, &self.step])
            .await
            .unwrap_or_else(|e| panic!("{}: witness INSERT {when} failed: {e:?}", self.test));
    }

    async fn current_xid(&self) -> String {
        let row = self.witness.query_one("SELECT txid_current()::text", &[]).await.expect("txid_current");
        row.get(0)
    }

    /// The checks every bad input is followed by; `what` names the input in failure messages.
    async fn assert_unharmed(&mut self, what: &str) {
        let test = self.test;
        assert!(!self.pooler.has_exited(), "{test}: pgcorral exited after {what}");
        self.insert(&format!("after {what}")).await;
        // Same transaction id: the witness kept its server connection and its transaction.
        assert_eq!(
            self.current_xid().await,
            self.xid,
            "{test}: the witness's transaction changed after {what}"
        );
        self.witness
            .batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{test}: witness COMMIT after {what} failed: {e:?}"));

        let sql =
            format!("SELECT count(*) FROM robustness_witness WHERE test = '{test}' AND step = {}", self.step);
        let out = self.pooler.psql(APP_USER, APP_PASSWORD, APP_DB, &sql);
        assert!(
            out.status.success(),
            "{test}: a fresh psql login failed after {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Both inserts, from before and after the bad input, committed together.
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2", "{test}: witness rows after {what}");

        assert!(!self.pooler.has_exited(), "{test}: pgcorral exited after {what}");
        let log = self.pooler.log();
        assert!(!log.contains("panicked"), "{test}: pgcorral panicked after {what}:\n{log}");

        self.step += 1;
        self.open_transaction().await;
    }
}

fn raw_connect(pooler: &Pooler) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", pooler.port)).expect("connect to pgcorral");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    stream
}

fn startup_packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut packet = ((body.len() + 8) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&code.to_be_bytes());
    packet.extend_from_slice(body);
    packet
}

/// `name\0value\0...` with the list's terminating NUL.
fn startup_params(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

fn app_login_params() -> Vec<u8> {
    startup_params(&[("user", APP_USER), ("database", APP_DB)])
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

fn cancel_request(process_id: i32, secret_key: i32) -> Vec<u8> {
    startup_packet(CANCEL_REQUEST, &[process_id.to_be_bytes(), secret_key.to_be_bytes()].concat())
}

/// Fills `buf`; false when the daemon closed the connection. A reset counts as closed: a
/// daemon that closes with unread input makes the kernel answer with RST.
fn read_exact_or_closed(stream: &mut TcpStream, buf: &mut [u8]) -> bool {
    match stream.read_exact(buf) {
        Ok(()) => true,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("pgcorral neither answered nor closed the connection within {DEADLINE:?}")
        }
        Err(_) => false,
    }
}

/// The next backend message, or None once the daemon has closed the connection.
fn read_message(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    if !read_exact_or_closed(stream, &mut head) {
        return None;
    }
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    assert!((4..1 << 20).contains(&len), "pgcorral sent a message {:?} with length {len}", head[0] as char);
    let mut body = vec![0u8; len as usize - 4];
    if !read_exact_or_closed(stream, &mut body) {
        return None;
    }
    Some((head[0], body))
}

fn read_until_closed(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    while let Some(msg) = read_message(stream) {
        messages.push(msg);
        assert!(messages.len() < 100, "pgcorral keeps talking to a broken client: {}", describe(&messages));
    }
    messages
}

/// Reads up to and including ReadyForQuery.
fn read_until_ready(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    loop {
        let msg = read_message(stream)
            .unwrap_or_else(|| panic!("connection closed before ReadyForQuery: {}", describe(&messages)));
        let ready = msg.0 == b'Z';
        messages.push(msg);
        if ready {
            return messages;
        }
    }
}

/// An ErrorResponse or NoticeResponse field, e.g. b'C' for the SQLSTATE.
fn field(body: &[u8], code: u8) -> Option<String> {
    body.split(|&b| b == 0)
        .take_while(|f| !f.is_empty())
        .find(|f| f[0] == code)
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

fn describe(messages: &[(u8, Vec<u8>)]) -> String {
    let shown: Vec<String> = messages
        .iter()
        .map(|(tag, body)| match tag {
            b'E' | b'N' => format!(
                "{}({} {} {})",
                *tag as char,
                field(body, b'S').unwrap_or_default(),
                field(body, b'C').unwrap_or_default(),
                field(body, b'M').unwrap_or_default()
            ),
            _ => format!("{}", *tag as char),
        })
        .collect();
    format!("[{}]", shown.join(", "))
}

/// Asserts that the daemon sent at most ErrorResponses and then closed.
fn assert_refused(stream: &mut TcpStream, what: &str) -> Vec<(u8, Vec<u8>)> {
    let answer = read_until_closed(stream);
    assert!(
        answer.iter().all(|(tag, _)| *tag == b'E'),
        "{what}: expected at most an ErrorResponse before the close, got {}",
        describe(&answer)
    );
    answer
}

fn assert_single_fatal(answer: &[(u8, Vec<u8>)], sqlstate: &str, what: &str) {
    assert!(
        answer.len() == 1
            && field(&answer[0].1, b'S').as_deref() == Some("FATAL")
            && field(&answer[0].1, b'C').as_deref() == Some(sqlstate),
        "{what}: expected one FATAL {sqlstate} ErrorResponse and the close, got {}",
        describe(answer)
    );
}

/// A client logged in over a raw socket, answering the md5 challenge itself.
struct RawSession {
    stream: TcpStream,
    process_id: i32,
    secret_key: i32,
}

fn raw_login(pooler: &Pooler) -> RawSession {
    let mut stream = raw_connect(pooler);
    stream.write_all(&startup_packet(PROTOCOL_3_0, &app_login_params())).unwrap();
    let salt = md5_challenge(&mut stream);
    let hash =
        postgres_protocol::authentication::md5_hash(APP_USER.as_bytes(), APP_PASSWORD.as_bytes(), salt);
    stream.write_all(&message(b'p', &[hash.as_bytes(), b"\0"].concat())).unwrap();
    let welcome = read_until_ready(&mut stream);
    assert!(welcome.iter().all(|(tag, _)| *tag != b'E'), "raw login refused: {}", describe(&welcome));
    let (_, key) = welcome
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .unwrap_or_else(|| panic!("no BackendKeyData in {}", describe(&welcome)));
    RawSession {
        stream,
        process_id: i32::from_be_bytes(key[0..4].try_into().unwrap()),
        secret_key: i32::from_be_bytes(key[4..8].try_into().unwrap()),
    }
}

fn md5_challenge(stream: &mut TcpStream) -> [u8; 4] {
    let (tag, body) = read_message(stream).expect("closed instead of asking for a password");
    assert!(
        tag == b'R' && body.len() == 8 && body[..4] == 5i32.to_be_bytes(),
        "expected AuthenticationMD5Password, got {}",
        describe(&[(tag, body.clone())])
    );
    body[4..8].try_into().unwrap()
}

/// Waits until PostgreSQL has started the statement containing `marker`, so that a cancel
/// sent next meets it rather than arriving before it. True if it was seen running; false if it
/// had already ended when first seen (the caller's later assertions tell why).
fn wait_until_started(pg: &Postgres, pooler: &Pooler, marker: &str) -> bool {
    let sql = format!(
        "SELECT coalesce(string_agg(state || ' after ' || (now() - query_start)::text, ','), '') \
         FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    let mut seen = String::new();
    if !wait_until(DEADLINE, || {
        seen = pg.sql(&sql);
        !seen.is_empty()
    }) {
        let activity = pg.sql(
            "SELECT string_agg(pid || ' ' || coalesce(state, '-') || ' ' || left(query, 60), E'\\n') \
             FROM pg_stat_activity WHERE datname = 'app'",
        );
        panic!("query {marker} never started on the server; pg_stat_activity:\n{activity}\n{}", pooler.log());
    }
    if !seen.starts_with("active") {
        eprintln!("query {marker} had ended when first seen: {seen}");
    }
    seen.starts_with("active")
}

/// The end of PostgreSQL's log, for failure messages.
fn pg_log_tail(pg: &Postgres) -> String {
    let log = pg.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[tokio::test]
async fn malformed_startup_packets_are_refused() {
    let mut fixture = Fixture::start("malformed_startup").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a startup length of 4", vec![0, 0, 0, 4, 0, 3, 0, 0]),
        ("a negative startup length", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        // The daemon must not wait for (or allocate) 2 GB before refusing.
        (
            "a startup length of 0x7fffffff",
            [&[0x7f, 0xff, 0xff, 0xff][..], &PROTOCOL_3_0.to_be_bytes()].concat(),
        ),
        ("a parameter value without its NUL", startup_packet(PROTOCOL_3_0, b"user\0app_user\0database\0app")),
        ("a parameter name without a value", startup_packet(PROTOCOL_3_0, b"user\0app_user\0database\0")),
        ("bytes after the parameter list", startup_packet(PROTOCOL_3_0, b"user\0app_user\0\0junk")),
        ("a CancelRequest of the wrong length", startup_packet(CANCEL_REQUEST, &[0, 0, 0, 1])),
        ("parameters that are not UTF-8", startup_packet(PROTOCOL_3_0, b"user\0\xff\xfe\0\0")),
    ];
    for (what, bytes) in cases {
        let mut stream = raw_connect(&fixture.pooler);
        stream.write_all(&bytes).unwrap();
        let answer = assert_refused(&mut stream, what);
        if let Some((_, body)) = answer.first() {
            let code = field(body, b'C').unwrap_or_default();
            assert!(
                code == "08P01" || code == "54000",
                "{what}: a malformed startup packet is a protocol violation (or too large), got {}",
                describe(&answer)
            );
        }
        fixture.assert_unharmed(what).await;
    }

    // PostgreSQL's own answer to an old client: 0A000, then the close.
    let what = "protocol version 2.0";
    let mut stream = raw_connect(&fixture.pooler);
    stream.write_all(&startup_packet(PROTOCOL_2_0, b"")).unwrap();
    let answer = assert_refused(&mut stream, what);
    assert_single_fatal(&answer, "0A000", what);
    fixture.assert_unharmed(what).await;

    // The list terminator missing after complete pairs: PostgreSQL refuses this packet,
    // PgBouncer reads it as complete. Either is fine, as long as the client gets an answer.
    let what = "parameters without the list's terminating NUL";
    let mut stream = raw_connect(&fixture.pooler);
    stream.write_all(&startup_packet(PROTOCOL_3_0, b"user\0app_user\0database\0app\0")).unwrap();
    let (tag, body) = read_message(&mut stream).expect("closed without an answer");
    assert!(
        tag == b'E' || (tag == b'R' && body.len() == 8 && body[..4] == 5i32.to_be_bytes()),
        "{what}: expected an ErrorResponse or the md5 challenge, got {}",
        describe(&[(tag, body)])
    );
    drop(stream);
    fixture.assert_unharmed(what).await;
}

#[tokio::test]
async fn cancel_requests_with_wrong_keys_are_closed_and_cancel_nothing() {
    let pg = Postgres::shared();
    let mut fixture = Fixture::start("wrong_cancel_keys").await;

    // Control: the right key does cancel, so the checks below can tell a cancel when they see one.
    let mut victim = raw_login(&fixture.pooler);
    victim.stream.write_all(&message(b'Q', b"SELECT pg_sleep(30) /* right_key_victim */\0")).unwrap();
    assert!(
        wait_until_started(pg, &fixture.pooler, "right_key_victim"),
        "a 30 s sleep ended before it was cancelled:\n{}",
        pg_log_tail(pg)
    );
    let mut canceller = raw_connect(&fixture.pooler);
    canceller.write_all(&cancel_request(victim.process_id, victim.secret_key)).unwrap();
    assert_refused(&mut canceller, "a CancelRequest with the right key");
    let reply = read_until_ready(&mut victim.stream);
    assert!(
        reply.iter().any(|(tag, body)| *tag == b'E' && field(body, b'C').as_deref() == Some("57014")),
        "the right key did not cancel the query: {}",
        describe(&reply)
    );

    // Long enough to be seen running, and to outlast the three cancels below.
    victim.stream.write_all(&message(b'Q', b"SELECT pg_sleep(5) /* wrong_key_victim */\0")).unwrap();
    wait_until_started(pg, &fixture.pooler, "wrong_key_victim");
    let wrong_keys = [
        ("the victim's process id with a wrong secret", victim.process_id, victim.secret_key.wrapping_add(1)),
        ("an unknown process id", victim.process_id.wrapping_add(1000), victim.secret_key),
        ("process id 0", 0, 0),
    ];
    for (what, process_id, secret_key) in wrong_keys {
        let mut canceller = raw_connect(&fixture.pooler);
        canceller.write_all(&cancel_request(process_id, secret_key)).unwrap();
        let answer = read_until_closed(&mut canceller);
        // PostgreSQL answers no CancelRequest, whatever the key.
        assert!(
            answer.is_empty(),
            "CancelRequest with {what}: expected a silent close, got {}",
            describe(&answer)
        );
    }
    let reply = read_until_ready(&mut victim.stream);
    assert!(
        reply.iter().all(|(tag, _)| *tag != b'E') && reply.iter().any(|(tag, _)| *tag == b'D'),
        "a CancelRequest with a wrong key cancelled the query: {}\nPostgreSQL's log:\n{}",
        describe(&reply),
        pg_log_tail(pg)
    );
    fixture.assert_unharmed("CancelRequests with wrong keys").await;
}

#[tokio::test]
async fn oversized_message_after_login_is_refused_without_buffering_it() {
    let mut fixture = Fixture::start("oversized_message").await;
    let declared: i32 = 100 * 1024 * 1024 + 4;

    let mut session = raw_login(&fixture.pooler);
    session.stream.write_all(&[&[b'Q'][..], &declared.to_be_bytes()].concat()).unwrap();
    let answer = assert_refused(&mut session.stream, "a 100 MB Query header");
    assert_single_fatal(&answer, "54000", "a 100 MB Query header");
    fixture.assert_unharmed("a 100 MB Query header").await;

    // Now the body too, streamed: the daemon must close instead of reading it all in.
    let session = raw_login(&fixture.pooler);
    let mut writer_stream = session.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || -> (usize, std::io::Result<()>) {
        let mut written = 0;
        let header = [&[b'Q'][..], &declared.to_be_bytes()].concat();
        let chunk = vec![b'x'; 1 << 20];
        let result = writer_stream.write_all(&header).and_then(|()| {
            while written < declared as usize {
                writer_stream.write_all(&chunk)?;
                written += chunk.len();
            }
            Ok(())
        });
        (written, result)
    });
    let pid = fixture.pooler.pid();
    let baseline = vm_rss_kib(pid);
    let mut peak = baseline;
    while !writer.is_finished() {
        peak = peak.max(vm_rss_kib(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (written, result) = writer.join().unwrap();
    match result {
        Ok(()) => panic!("pgcorral read the whole {declared}-byte message instead of closing the connection"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("pgcorral neither read nor closed within {DEADLINE:?} (after {written} bytes of body)")
        }
        Err(_) => {}
    }
    assert!(
        peak < 200 * 1024,
        "pgcorral's VmRSS reached {peak} kB (from {baseline} kB) while a client streamed {written} bytes \
         of an oversized message"
    );
    drop(session);
    fixture.assert_unharmed("a streamed 100 MB Query").await;
}

#[tokio::test]
async fn random_byte_streams_are_refused() {
    let mut fixture = Fixture::start("random_bytes").await;
    for seed in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut noise = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut noise);

        // Before login: from the first byte, and behind a plausible startup header so that
        // parameter parsing sees the noise.
        let mut behind_header = startup_packet(PROTOCOL_3_0, &noise[..rng.random_range(16..4000)]);
        behind_header.extend_from_slice(&noise);
        for (what, bytes) in
            [("random bytes", &noise), ("a startup header then random bytes", &behind_header)]
        {
            let what = format!("{what} (seed {seed})");
            let mut stream = raw_connect(&fixture.pooler);
            let writer = spawn_writer(&stream, bytes.clone());
            assert_refused(&mut stream, &what);
            let _ = stream.shutdown(Shutdown::Both);
            writer.join().unwrap();
            fixture.assert_unharmed(&what).await;
        }

        // After login: noise framed as messages with random tags, so that some of it passes
        // the framing and reaches PostgreSQL.
        let mut framed = Vec::new();
        let mut offset = 0;
        while offset + 300 < noise.len() {
            let len = rng.random_range(0..300);
            framed.extend_from_slice(&message(rng.random_range(b'A'..=b'z'), &noise[offset..offset + len]));
            offset += len;
        }
        for (what, bytes) in
            [("random bytes after login", noise.clone()), ("random messages after login", framed)]
        {
            let what = format!("{what} (seed {seed})");
            let mut session = raw_login(&fixture.pooler);
            let writer = spawn_writer(&session.stream, bytes);
            // The daemon may keep a client whose junk PostgreSQL merely rejected, but it must
            // answer: an error or the close.
            let mut answer = Vec::new();
            while let Some(msg) = read_message(&mut session.stream) {
                let error = msg.0 == b'E';
                answer.push(msg);
                if error {
                    break;
                }
                assert!(answer.len() < 10_000, "{what}: no error after {}", describe(&answer[..20]));
            }
            let _ = session.stream.shutdown(Shutdown::Both);
            writer.join().unwrap();
            fixture.assert_unharmed(&what).await;
        }
    }
}

/// Writes `bytes` from a thread until done or the connection breaks, so that the test can read
/// the daemon's answer meanwhile.
fn spawn_writer(stream: &TcpStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut stream = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = stream.write_all(&bytes);
    })
}

#[tokio::test]
async fn half_sent_startup_packets_do_not_block_anyone() {
    let mut fixture = Fixture::start("half_startup").await;
    let packet = startup_packet(PROTOCOL_3_0, &app_login_params());
    // Held open through the checks, which must not wait for the 60 s login timeout.
    let mut silent = Vec::new();
    for cut in [1, 3, 4, 6, packet.len() / 2, packet.len() - 1] {
        let mut stream = raw_connect(&fixture.pooler);
        stream.write_all(&packet[..cut]).unwrap();
        silent.push(stream);
    }
    let started = Instant::now();
    fixture.assert_unharmed("half-sent startup packets").await;
    assert!(started.elapsed() < DEADLINE, "other clients waited {:?} behind silent ones", started.elapsed());
    // Still waiting for the rest of the packet: not refused, not closed.
    for stream in &mut silent {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert!(
            matches!(stream.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "a client in the middle of its startup packet was answered or closed"
        );
    }
}

#[tokio::test]
async fn dropped_connections_give_back_their_client_slots() {
    let mut fixture = Fixture::start("dropped_connections").await;
    let pooler = &fixture.pooler;
    for _ in 0..200 {
        drop(raw_connect(pooler));
    }
    // Gone at every later stage of a login, after max_client_conn counted them.
    for _ in 0..20 {
        let mut stream = raw_connect(pooler);
        stream.write_all(&startup_packet(PROTOCOL_3_0, &app_login_params())).unwrap();
        md5_challenge(&mut stream);
    }
    for _ in 0..20 {
        let mut stream = raw_connect(pooler);
        stream.write_all(&startup_packet(PROTOCOL_3_0, &app_login_params())).unwrap();
        md5_challenge(&mut stream);
        stream.write_all(&message(b'p', b"md5not-the-answer\0")).unwrap();
        assert_refused(&mut stream, "a wrong md5 answer");
    }
    for _ in 0..20 {
        drop(raw_login(pooler));
    }

    // 40 at once next to the witness, under max_client_conn = 50. Closes are noticed
    // asynchronously, so refusals are retried for a while before they count as leaks.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let attempts = join_all((0..40).map(|_| pooler.connect(APP_USER, APP_PASSWORD, APP_DB))).await;
        let mut clients = Vec::new();
        let mut refused = 0;
        for attempt in attempts {
            match attempt {
                Ok(client) => clients.push(client),
                Err(e) if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) => refused += 1,
                Err(e) => panic!("login after the dropped connections failed: {e:?}"),
            }
        }
        if refused == 0 {
            for result in join_all(clients.iter().map(|c| c.simple_query("SELECT 1"))).await {
                result.expect("query on one of the 40 clients");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} of 40 logins still refused (max_client_conn = 50) {DEADLINE:?} after the dropped \
             connections: their slots leaked"
        );
        drop(clients);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fixture.assert_unharmed("connections dropped at every stage of the login").await;
}

/// A bug that panics in one client's task while it holds the registry's and the census's
/// locks (injected by a startup parameter only debug builds know) ends that client alone: the
/// locks cannot poison, so clients already connected keep working, new ones log in, and the
/// console still answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_task_that_panics_holding_shared_locks_leaves_everyone_else_working() {
    let pg = Postgres::shared();
    let ini = format!("{}workers = 1\nadmin_users = {APP_USER}\n", ini(pg));
    let pooler = Pooler::start(&ini, &app_userlist());
    let mut before = Vec::new();
    for _ in 0..5 {
        before.push(pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("login"));
    }

    let mut doomed = raw_connect(&pooler);
    let params = [("user", APP_USER), ("database", APP_DB), ("pgcorral.test_panic", "1")];
    doomed.write_all(&startup_packet(PROTOCOL_3_0, &startup_params(&params))).unwrap();
    let mut answer = Vec::new();
    let ended = doomed.read_to_end(&mut answer);
    assert!(ended.is_ok() || ended.is_err_and(|e| e.kind() == ErrorKind::ConnectionReset));
    assert!(answer.is_empty(), "the connection ended without a word: {answer:?}");
    assert!(pooler.log().contains("a client's task panicked while holding shared locks"), "{}", pooler.log());

    for (i, client) in before.iter().enumerate() {
        assert_eq!(first_value(client, &format!("SELECT {i}")).await.unwrap(), i.to_string());
    }
    let after = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("a login after the panic");
    assert_eq!(first_value(&after, "SELECT 'after'").await.unwrap(), "after");
    let console = pooler.connect(APP_USER, APP_PASSWORD, "pgbouncer").await.expect("console");
    assert!(!console.simple_query("SHOW CLIENTS").await.unwrap().is_empty());
}
