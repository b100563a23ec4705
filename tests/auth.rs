//! Client authentication (trust, plain, md5, scram-sha-256 against userlist.txt secrets) and
//! server-side login (PostgreSQL asking for SCRAM, md5 or nothing), through real clients.

mod support;

use support::*;
use tokio_postgres::error::SqlState;

/// The SCRAM secret PostgreSQL stores for app_user: a userlist entry that holds no password.
fn stored_scram_secret(pg: &Postgres) -> String {
    pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_user'")
}

fn ini(pg: &Postgres, auth_type: &str) -> String {
    format!(
        "[databases]\n\
         app = host=127.0.0.1 port={port} dbname=app\n\
         ; a client authenticated with a stored SCRAM secret needs a server password from here\n\
         app_direct = host=127.0.0.1 port={port} dbname=app user=app_user password=app-pass\n\
         [pgbouncer]\nauth_type = {auth_type}\npool_mode = transaction\n",
        port = pg.port
    )
}

fn userlist(pg: &Postgres) -> String {
    [
        Pooler::userlist_line(APP_USER, APP_PASSWORD),
        Pooler::userlist_line(MD5_USER, &md5_secret(MD5_USER, MD5_PASSWORD)),
        Pooler::userlist_line(TRUST_USER, "trust-pass"),
        Pooler::userlist_line("scram_client", &stored_scram_secret(pg)),
    ]
    .concat()
}

fn md5_secret(user: &str, password: &str) -> String {
    pgcorral::auth::md5_secret(user, password)
}

async fn login_error(pooler: &Pooler, user: &str, password: &str, db: &str) -> Option<SqlState> {
    match pooler.connect(user, password, db).await {
        Ok(client) => {
            let row = client.query_one("SELECT current_user::text", &[]).await.expect("query after login");
            let who: String = row.get(0);
            assert!(!who.is_empty());
            None
        }
        Err(e) => Some(e.code().cloned().unwrap_or_else(|| panic!("login failed without SQLSTATE: {e}"))),
    }
}

fn refused(
    result: Result<tokio_postgres::Client, tokio_postgres::Error>,
    what: &str,
) -> tokio_postgres::Error {
    match result {
        Ok(_) => panic!("{what}: login should have been refused"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn each_auth_type_accepts_the_right_password_and_refuses_a_wrong_one() {
    let pg = Postgres::shared();
    for auth_type in ["plain", "md5", "scram-sha-256"] {
        let pooler = Pooler::start(&ini(pg, auth_type), &userlist(pg));
        assert_eq!(
            login_error(&pooler, APP_USER, APP_PASSWORD, APP_DB).await,
            None,
            "{auth_type}: right password"
        );
        assert_eq!(
            login_error(&pooler, APP_USER, "wrong", APP_DB).await,
            Some(SqlState::INVALID_PASSWORD),
            "{auth_type}: wrong password"
        );
        assert_eq!(
            login_error(&pooler, "nobody", "whatever", APP_DB).await,
            Some(SqlState::INVALID_PASSWORD),
            "{auth_type}: unknown user fails like a wrong password"
        );
    }
}

#[tokio::test]
async fn trust_admits_users_of_the_auth_file_only() {
    let pg = Postgres::shared();
    let pooler = Pooler::start(&ini(pg, "trust"), &userlist(pg));
    assert_eq!(login_error(&pooler, APP_USER, "", APP_DB).await, None);
    // `"trust" authentication failed`, with PostgreSQL's SQLSTATE for a refused trust login.
    assert_eq!(
        login_error(&pooler, "nobody", "", APP_DB).await,
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
}

#[tokio::test]
async fn md5_secrets_work_on_both_sides() {
    // The client proves md5 against the stored md5 hash, and pgcorral answers PostgreSQL's md5
    // challenge with that same hash: no plaintext anywhere.
    let pg = Postgres::shared();
    let pooler = Pooler::start(&ini(pg, "md5"), &userlist(pg));
    assert_eq!(login_error(&pooler, MD5_USER, MD5_PASSWORD, APP_DB).await, None);
    assert_eq!(login_error(&pooler, MD5_USER, "wrong", APP_DB).await, Some(SqlState::INVALID_PASSWORD));
}

#[tokio::test]
async fn scram_against_a_stored_scram_secret() {
    let pg = Postgres::shared();
    let pooler = Pooler::start(&ini(pg, "scram-sha-256"), &userlist(pg));
    // scram_client's secret is app_user's SCRAM secret, so app-pass is its password.
    assert_eq!(login_error(&pooler, "scram_client", APP_PASSWORD, "app_direct").await, None);
    assert_eq!(
        login_error(&pooler, "scram_client", "wrong", "app_direct").await,
        Some(SqlState::INVALID_PASSWORD)
    );
    // md5 auth_type with a SCRAM secret switches to SCRAM, as PgBouncer does.
    let pooler = Pooler::start(&ini(pg, "md5"), &userlist(pg));
    assert_eq!(login_error(&pooler, "scram_client", APP_PASSWORD, "app_direct").await, None);
}

#[tokio::test]
async fn server_side_login_follows_what_postgres_asks() {
    let pg = Postgres::shared();
    let pooler = Pooler::start(&ini(pg, "md5"), &userlist(pg));
    // PostgreSQL asks app_user for SCRAM, md5_user for md5 and trusts trust_user.
    for (user, password) in [(APP_USER, APP_PASSWORD), (MD5_USER, MD5_PASSWORD), (TRUST_USER, "trust-pass")] {
        let out = pooler.psql(user, password, APP_DB, "SELECT current_user");
        assert!(out.status.success(), "{user}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), user);
    }
}

#[tokio::test]
async fn unknown_database_and_max_client_conn_are_refused_with_pgbouncer_errors() {
    let pg = Postgres::shared();
    let pooler = Pooler::start(&format!("{}max_client_conn = 2\n", ini(pg, "md5")), &userlist(pg));
    let err = refused(pooler.connect(APP_USER, APP_PASSWORD, "no_such_db").await, "unknown database");
    assert_eq!(err.code(), Some(&SqlState::PROTOCOL_VIOLATION), "{err:?}");
    assert!(format!("{err:?}").contains("no such database: no_such_db"), "{err:?}");

    let first = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("first client");
    let second = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("second client");
    let err = refused(pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await, "third client");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    assert!(format!("{err:?}").contains("max_client_conn"), "{err:?}");
    // The refused client took nothing from the others, and its slot frees when one leaves.
    first.simple_query("SELECT 1").await.expect("first still works");
    drop(second);
    // Async waiting: the dropped client's connection task must run to say goodbye.
    let mut freed = false;
    for _ in 0..100 {
        if pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(freed, "a slot frees when a client leaves");
}
