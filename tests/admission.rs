//! What a client learns before it has authenticated: nothing about who exists. Unknown users
//! meet a SCRAM salt of their own, are asked the question most users are asked, and fail with
//! the same words as a real user with a wrong password.

mod support;

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use support::wire::RawClient;
use support::*;

/// A verifier as PostgreSQL 15 stores it (`CREATE ROLE .. PASSWORD 'pencil'`).
const SCRAM_VERIFIER: &str = "SCRAM-SHA-256$4096:Qu4lWJWlYv65whAr632IHQ==$1mAOiZyjrdwY4d7yIBpmSZjyOqSJ4xLO42yIhzgiUec=:1gxad9pgpktwG6KijZI8BjLmUbBDwug9mPsnytIqJhA=";

/// What pgcorral first asks of `user`: the authentication request code (5 md5, 10 SASL) and,
/// for SASL, the salt its server-first message offers.
fn first_question(pooler: &Pooler, user: &str) -> (i32, Option<String>) {
    let mut client = RawClient::start(pooler.port, user, "app");
    let request = client.read();
    assert_eq!(request.tag, b'R', "{request:?}");
    let code = i32::from_be_bytes(request.body[..4].try_into().unwrap());
    if code != 10 {
        return (code, None);
    }
    let mut buf = BytesMut::new();
    frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO", &mut buf).unwrap();
    client.send(&buf);
    let server_first = client.read();
    assert_eq!(&server_first.body[..4], &11i32.to_be_bytes(), "{server_first:?}");
    let text = String::from_utf8(server_first.body[4..].to_vec()).unwrap();
    let salt = text.split(',').find_map(|part| part.strip_prefix("s=")).map(str::to_string);
    (code, salt)
}

fn refusal(pooler: &Pooler, user: &str, password: &str) -> (String, String) {
    let out = pooler.psql(user, password, "app", "SELECT 1");
    assert!(!out.status.success(), "{user} got in");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let message =
        stderr.lines().find_map(|l| l.split("FATAL:  ").nth(1)).unwrap_or(&stderr).trim().to_string();
    (message, stderr)
}

#[test]
fn unknown_users_meet_salts_of_their_own_and_fail_like_real_ones() {
    let pg = Postgres::shared();
    let ini =
        pool_ini(pg, "app", "", "transaction", "").replace("auth_type = md5", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &app_userlist());

    let (code, ghost) = first_question(&pooler, "ghost");
    assert_eq!(code, 10);
    let ghost = ghost.expect("a salt");
    assert_eq!(
        first_question(&pooler, "ghost").1.as_ref(),
        Some(&ghost),
        "one name, one salt, like a real user"
    );
    let phantom = first_question(&pooler, "phantom").1.expect("a salt");
    let real = first_question(&pooler, APP_USER).1.expect("a salt");
    assert_ne!(ghost, phantom, "two unknown names, two salts");
    assert_ne!(ghost, real);
    assert_eq!(first_question(&pooler, APP_USER).1, Some(real), "a real user's salt is stable too");

    // The same words whether or not the user exists.
    let (unknown, _) = refusal(&pooler, "ghost", "guess");
    let (known, stderr) = refusal(&pooler, APP_USER, "guess");
    assert_eq!(unknown, "SASL authentication failed", "{stderr}");
    assert_eq!(known, unknown);
}

#[test]
fn in_md5_mode_an_unknown_user_is_asked_what_most_users_are_asked() {
    let pg = Postgres::shared();
    let ini = pool_ini(pg, "app", "", "transaction", "");
    // Mostly plain secrets: md5 for everyone but the user whose secret is SCRAM.
    let userlist = app_userlist()
        + &Pooler::userlist_line("plain_two", "pw")
        + &Pooler::userlist_line("s1", SCRAM_VERIFIER);
    let pooler = Pooler::start(&ini, &userlist);
    assert_eq!(first_question(&pooler, APP_USER).0, 5);
    assert_eq!(first_question(&pooler, "nobody").0, 5, "like most users");
    assert_eq!(first_question(&pooler, "s1").0, 10, "a SCRAM secret can only be checked with SCRAM");

    // Mostly SCRAM verifiers: an unknown user is asked for SCRAM, as they are.
    let userlist = app_userlist()
        + &Pooler::userlist_line("s1", SCRAM_VERIFIER)
        + &Pooler::userlist_line("s2", SCRAM_VERIFIER);
    let pooler = Pooler::start(&ini, &userlist);
    assert_eq!(first_question(&pooler, "s2").0, 10);
    assert_eq!(first_question(&pooler, "nobody").0, 10, "like most users");
    assert_eq!(first_question(&pooler, APP_USER).0, 5);
}

#[test]
fn trust_refuses_an_unknown_user_in_pgbouncers_words() {
    let pg = Postgres::shared();
    let ini = pool_ini(pg, "app", "", "transaction", "").replace("auth_type = md5", "auth_type = trust");
    let pooler = Pooler::start(&ini, &app_userlist());
    assert!(pooler.psql(APP_USER, "", "app", "SELECT 1").status.success());
    let (message, stderr) = refusal(&pooler, "ghost", "");
    assert_eq!(message, "\"trust\" authentication failed", "{stderr}");
}

/// A flood of logins with guessed names, each a cache miss for `auth_query`: the lookups queue
/// for a few connections instead of opening one each, so PostgreSQL's `max_connections`
/// stays free for real work, and every guess is refused like a wrong password.
#[tokio::test(flavor = "multi_thread")]
async fn an_auth_query_flood_opens_only_a_few_connections() {
    let pg = Postgres::shared();
    let lookups = pg.create_database("admission_auth_query");
    let general = format!("auth_user = postgres\nauth_dbname = {lookups}\nmax_client_conn = 200");
    let ini = pool_ini(pg, "app", "", "transaction", &general)
        .replace("auth_type = md5", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &app_userlist());
    let peak = PeakBackends::start(pg, &lookups);
    let mut attempts = Vec::new();
    for i in 0..150 {
        let url = pooler.url(&format!("guess_{i}"), "wrong", "app");
        attempts.push(tokio::spawn(async move { connect_plain(&url).await.map(|_| ()) }));
    }
    for attempt in attempts {
        let error = attempt.await.unwrap().expect_err("a guessed name must be refused");
        let code = error.as_db_error().map(|db| db.code().code().to_string());
        assert_eq!(code.as_deref(), Some("28P01"), "{error:?}");
    }
    let peak = peak.finish();
    assert!((1..=4).contains(&peak), "auth_query used {peak} connections at once");
    // A real login is unaffected.
    let app = pooler.connect(APP_USER, APP_PASSWORD, "app").await.expect("login");
    assert_eq!(first_value(&app, "SELECT 1").await.unwrap(), "1");
}

/// Connections that start a login and never finish it (the startup packet, then silence at the
/// password question) cannot lock anyone out: at most `max_client_conn` of them are kept, the
/// oldest giving way to newer ones, and a client that completes its login gets in at once
/// instead of after `client_login_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_half_logins_cannot_lock_out_clients_that_finish_theirs() {
    let pg = Postgres::shared();
    let general = "max_client_conn = 20\nclient_login_timeout = 300";
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", general), &app_userlist());
    let mut stalled = Vec::new();
    for i in 0..60 {
        let mut half = RawClient::start(pooler.port, &format!("stall_{i}"), "app");
        assert_eq!(half.read().tag, b'R', "asked for a password, which never comes");
        stalled.push(half);
    }
    let mut clients = Vec::new();
    for _ in 0..10 {
        let app = pooler.connect(APP_USER, APP_PASSWORD, "app").await.expect("a real login gets in");
        assert_eq!(first_value(&app, "SELECT 1").await.unwrap(), "1");
        clients.push(app);
    }
    // The oldest half-logins were closed to make room; at most max_client_conn remain open.
    let closed = stalled.iter_mut().map(|half| is_closed(&mut half.stream)).filter(|&c| c).count();
    assert!(closed >= 40, "only {closed} of 60 stalled logins were closed");
    assert!(pooler.log().contains("evicted"), "{}", pooler.log());
}

/// True when pgcorral closed the socket; false while it is open and silent.
fn is_closed(stream: &mut std::net::TcpStream) -> bool {
    use std::io::{ErrorKind, Read};
    stream.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("a stalled login was sent something"),
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// `max_user_client_connections` and `max_db_client_connections` count a client exactly
/// once, and give the slot back however its login ends: clients that vanish right after
/// sending their password (some before, some after pgcorral counted them), and users found
/// through `auth_query`, leave nothing counted behind.
#[tokio::test(flavor = "multi_thread")]
async fn client_connection_limits_stay_exact_when_logins_end_half_way() {
    let pg = Postgres::shared();
    // md5_user is found through auth_query (it is not in auth_file); its md5 secret lets
    // pgcorral check a cleartext password and log in to PostgreSQL with it.
    let general = "auth_user = postgres\nmax_user_client_connections = 2\nmax_db_client_connections = 3";
    let ini = pool_ini(pg, "app", "", "transaction", general).replace("auth_type = md5", "auth_type = plain");
    let pooler = Pooler::start(&ini, &app_userlist());
    for round in 0..20 {
        for (user, password) in [(APP_USER, APP_PASSWORD), (MD5_USER, MD5_PASSWORD)] {
            let mut half = RawClient::start(pooler.port, user, "app");
            assert_eq!(half.read().body[..4], 3i32.to_be_bytes(), "asked for a cleartext password");
            let mut buf = BytesMut::new();
            frontend::password_message(password.as_bytes(), &mut buf).unwrap();
            half.send(&buf);
            if round % 2 == 0 {
                // Gone before the answer; on odd rounds after AuthenticationOk.
                drop(half);
            } else {
                assert_eq!(half.read().body[..4], 0i32.to_be_bytes(), "AuthenticationOk");
            }
        }
    }
    // Every slot came back (as each vanished session is noticed): app_user gets exactly its
    // two, and the database its three.
    let mut held = Vec::new();
    for _ in 0..100 {
        held = vec![
            pooler.connect(APP_USER, APP_PASSWORD, "app").await,
            pooler.connect(APP_USER, APP_PASSWORD, "app").await,
        ];
        if held.iter().all(Result::is_ok) {
            break;
        }
        held.clear();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(held.iter().all(Result::is_ok), "slots were leaked: {held:?}");
    let over = pooler.connect(APP_USER, APP_PASSWORD, "app").await.expect_err("a third for app_user");
    assert!(format!("{over:?}").contains("max_user_client_connections"), "{over:?}");
    let md5 = pooler.connect(MD5_USER, MD5_PASSWORD, "app").await.expect("the database's third");
    assert_eq!(first_value(&md5, "SELECT current_user").await.unwrap(), MD5_USER);
    let over = pooler.connect(MD5_USER, MD5_PASSWORD, "app").await.expect_err("a fourth for the database");
    assert!(format!("{over:?}").contains("max_db_client_connections"), "{over:?}");
}

/// The process ID in BackendKeyData is random, as the secret key is: a sequence would tell
/// every client how many connections came before it.
#[test]
fn backend_key_process_ids_are_not_a_sequence() {
    let pg = Postgres::shared();
    let ini = pool_ini(pg, "app", "", "transaction", "").replace("auth_type = md5", "auth_type = plain");
    let pooler = Pooler::start(&ini, &app_userlist());
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = RawClient::start(pooler.port, APP_USER, "app");
        assert_eq!(client.read().body[..4], 3i32.to_be_bytes());
        let mut buf = BytesMut::new();
        frontend::password_message(APP_PASSWORD.as_bytes(), &mut buf).unwrap();
        client.send(&buf);
        let key = client.until_ready().into_iter().find(|m| m.tag == b'K').expect("BackendKeyData");
        ids.push(i32::from_be_bytes(key.body[..4].try_into().unwrap()));
        clients.push(client);
    }
    let steps: Vec<i64> = ids.windows(2).map(|w| w[1] as i64 - w[0] as i64).collect();
    assert!(steps.iter().any(|step| step.abs() > 1_000), "process IDs in sequence: {ids:?}");
    assert!(ids.iter().all(|id| *id > 0), "{ids:?}");
}

/// One failed login over a raw socket, timed from connect to the ErrorResponse: a wrong
/// cleartext password, or a SCRAM exchange whose proof is wrong (the client computes no key,
/// so only the pooler's work is timed). Returns the elapsed time and the error's message, with
/// the iteration count a SCRAM server-first message offered.
fn failed_login(pooler: &Pooler, user: &str, db: &str) -> (std::time::Duration, String) {
    let started = std::time::Instant::now();
    let mut iterations = String::new();
    let mut client = RawClient::start(pooler.port, user, db);
    loop {
        let m = client.read();
        let mut buf = BytesMut::new();
        match (m.tag, m.body.get(..4).map(|code| i32::from_be_bytes(code.try_into().unwrap()))) {
            (b'R', Some(3)) => frontend::password_message(b"not the password", &mut buf).unwrap(),
            (b'R', Some(10)) => {
                frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO", &mut buf)
                    .unwrap()
            }
            (b'R', Some(11)) => {
                let server_first = String::from_utf8(m.body[4..].to_vec()).unwrap();
                let nonce = server_first.split(',').find_map(|p| p.strip_prefix("r=")).unwrap();
                iterations = server_first.split(',').find_map(|p| p.strip_prefix("i=")).unwrap().to_string();
                // 32 bytes of proof, base64: well formed and wrong.
                let client_final = format!("c=biws,r={nonce},p=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
                frontend::sasl_response(client_final.as_bytes(), &mut buf).unwrap();
            }
            (b'E', _) => {
                let message = m.field(b'M').unwrap_or_default();
                return (started.elapsed(), format!("{message}{iterations}"));
            }
            other => panic!("unexpected {other:?} for {user}@{db}"),
        }
        client.send(&buf);
    }
}

/// Times failed logins of each `(user, database)` case, interleaved round by round so that
/// noise falls on all of them alike, and returns each case's median with its message.
fn median_failures(pooler: &Pooler, cases: &[(&str, &str)]) -> Vec<(std::time::Duration, String)> {
    const ROUNDS: usize = 15;
    let mut times = vec![Vec::new(); cases.len()];
    let mut messages = vec![String::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (user, db)) in cases.iter().enumerate() {
            let (elapsed, message) = failed_login(pooler, user, db);
            times[i].push(elapsed);
            messages[i] = message;
        }
    }
    times
        .into_iter()
        .zip(messages)
        .map(|(mut t, m)| {
            t.sort();
            (t[ROUNDS / 2], m)
        })
        .collect()
}

/// Whether the slowest case's median is within `bound` times the fastest's.
fn within(medians: &[(std::time::Duration, String)], bound: f64) -> bool {
    let slowest = medians.iter().map(|m| m.0).max().unwrap().as_secs_f64();
    let fastest = medians.iter().map(|m| m.0).min().unwrap().as_secs_f64();
    slowest <= fastest * bound
}

/// A failed login costs the same whether the user exists, the database exists, or neither: an
/// attacker timing refusals learns nothing. Cleartext passwords checked against SCRAM verifiers
/// cost a key derivation, so an unknown user pays one too; a SCRAM exchange runs in full. The
/// bound compares medians of one run with each other, never with a clock: a key derivation
/// skipped for unknown users makes them several times faster, noise does not.
#[test]
fn a_failed_login_takes_as_long_whether_or_not_the_user_or_the_database_exists() {
    let pg = Postgres::shared();
    let cases = [("s1", "app"), ("nobody", "app"), ("s1", "no_such_db"), ("nobody", "no_such_db")];
    // Far more iterations than the default, as a careful operator stores them: a skipped
    // derivation would stand out from any noise.
    let verifier = SCRAM_VERIFIER.replace("$4096:", "$40000:");
    let userlist =
        app_userlist() + &Pooler::userlist_line("s1", &verifier) + &Pooler::userlist_line("s2", &verifier);

    // scram_iterations stays at its default: the unknown users' mock verifiers follow what
    // most users have.
    let ini = pool_ini(pg, "app", "", "transaction", "").replace("auth_type = md5", "auth_type = plain");
    let pooler = Pooler::start(&ini, &userlist);
    let medians = median_failures(&pooler, &cases);
    let refused = |user: &str| format!("password authentication failed for user \"{user}\"");
    let words: Vec<_> = medians.iter().map(|m| m.1.clone()).collect();
    assert_eq!(words, [refused("s1"), refused("nobody"), refused("s1"), refused("nobody")]);
    assert!(within(&medians, 2.0), "cleartext refusals, medians per case {cases:?}: {medians:?}");

    let ini = ini.replace("auth_type = plain", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &userlist);
    let medians = median_failures(&pooler, &cases);
    assert!(
        medians.iter().all(|m| m.1 == "SASL authentication failed40000"),
        "the same words, and the same i= in server-first: {medians:?}"
    );
    assert!(within(&medians, 2.0), "SCRAM refusals, medians per case {cases:?}: {medians:?}");
}
