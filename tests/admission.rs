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
