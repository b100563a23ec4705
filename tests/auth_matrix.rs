//! The authentication matrix beyond auth_file passwords: `auth_type = hba` with
//! hostssl/hostnossl rules, `cert`, `any`, SCRAM pass-through with no plaintext password in any
//! file, and SCRAM-SHA-256-PLUS channel binding with psql. SQLSTATEs are read with asyncpg,
//! which reports them for refused logins.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::*;

fn psql(conninfo: &str, sql: &str) -> Output {
    Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-d", conninfo, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn tls_lines(certs: &Certs) -> String {
    format!(
        "client_tls_sslmode = prefer\nclient_tls_key_file = {}\nclient_tls_cert_file = {}\nclient_tls_ca_file = {}\n",
        certs.server_key.display(),
        certs.server_cert.display(),
        certs.ca_cert.display()
    )
}

fn conn(pooler: &Pooler, user: &str, password: &str, extra: &str) -> String {
    let password = if password.is_empty() { String::new() } else { format!("password={password}") };
    format!("host=127.0.0.1 port={} user={user} {password} dbname=app {extra}", pooler.port)
}

/// What asyncpg says about a login: `ok <user>` or the SQLSTATE of the refusal.
fn asyncpg_login(pooler: &Pooler, user: &str, password: &str, ssl: bool) -> String {
    let script = r#"
import asyncio, os, ssl, asyncpg
async def main():
    ctx = None
    if os.environ["SSL"] == "1":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=int(os.environ["PORT"]), user=os.environ["U"],
                                     password=os.environ["P"], database="app", ssl=ctx if ctx else False)
        print("ok", await conn.fetchval("SELECT current_user"))
        await conn.close()
    except asyncpg.PostgresError as e:
        print(e.sqlstate, e)
asyncio.run(main())
"#;
    let port = pooler.port.to_string();
    let out = run_python(
        script,
        &[("PORT", &port), ("U", user), ("P", password), ("SSL", if ssl { "1" } else { "0" })],
    );
    ok(out, "asyncpg login")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `auth_type = hba`: app_user only over TLS (hostnossl reject), md5_user with md5 over
/// plain TCP, everyone trusted on the Unix socket, no line for anyone else.
#[test]
fn hba_rules_decide_per_connection() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let hba_dir = certs.dir.clone();
    let hba = write(
        &hba_dir,
        "hba.conf",
        "local all all trust\n\
         hostnossl all app_user 127.0.0.1/32 reject\n\
         hostssl all app_user 127.0.0.1/32 scram-sha-256\n\
         host all md5_user 127.0.0.1/32 md5\n",
    );
    let general = format!("{}auth_hba_file = {hba}\n", tls_lines(&certs));
    let ini = pool_ini(pg, "app", "", "transaction", &general).replace("auth_type = md5", "auth_type = hba");
    let userlist =
        [Pooler::userlist_line(APP_USER, APP_PASSWORD), Pooler::userlist_line(MD5_USER, MD5_PASSWORD)]
            .concat();
    let pooler = Pooler::start(&ini, &userlist);

    assert_eq!(asyncpg_login(&pooler, APP_USER, APP_PASSWORD, true), "ok app_user");
    let plain = asyncpg_login(&pooler, APP_USER, APP_PASSWORD, false);
    assert!(plain.starts_with("28000") && plain.contains("pg_hba.conf rejects connection"), "{plain}");
    assert!(asyncpg_login(&pooler, APP_USER, "wrong", true).starts_with("28P01"));
    assert_eq!(asyncpg_login(&pooler, MD5_USER, MD5_PASSWORD, false), "ok md5_user");
    assert!(asyncpg_login(&pooler, MD5_USER, "wrong", false).starts_with("28P01"));
    let nobody = asyncpg_login(&pooler, TRUST_USER, "x", false);
    assert!(nobody.starts_with("28000") && nobody.contains("no pg_hba.conf entry"), "{nobody}");

    let unix = format!("host={} port={} user={APP_USER} dbname=app", pooler.dir.display(), pooler.port);
    assert_eq!(ok(psql(&unix, "SELECT current_user"), "local trust"), "app_user");
    assert_eq!(
        ok(psql(&conn(&pooler, APP_USER, APP_PASSWORD, "sslmode=require"), "SELECT 1"), "psql hostssl"),
        "1"
    );
}

/// `auth_type = cert`: the client certificate's common name is the user name.
#[test]
fn cert_auth_takes_the_user_from_the_certificate() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let (cert, key) = certs.client(APP_USER);
    let ini = pool_ini(pg, "app", "", "transaction", &tls_lines(&certs))
        .replace("auth_type = md5", "auth_type = cert");
    let pooler = Pooler::start(&ini, &app_userlist());
    let with_cert = format!("sslmode=require sslcert={} sslkey={}", cert.display(), key.display());

    assert_eq!(ok(psql(&conn(&pooler, APP_USER, "", &with_cert), "SELECT current_user"), "cert"), "app_user");
    let other_user = psql(&conn(&pooler, MD5_USER, "", &with_cert), "SELECT 1");
    assert!(stderr(&other_user).contains("certificate authentication failed"), "{}", stderr(&other_user));
    let no_cert = psql(
        &conn(&pooler, APP_USER, APP_PASSWORD, "sslmode=require sslcert=/none sslkey=/none"),
        "SELECT 1",
    );
    assert!(stderr(&no_cert).contains("certificate authentication failed"), "{}", stderr(&no_cert));
}

/// SCRAM pass-through: auth_file holds PostgreSQL's own SCRAM verifier for app_user and the
/// database entry no password, so no file has the plaintext; pgcorral logs in to PostgreSQL
/// with the keys the client proved.
#[test]
fn scram_pass_through_needs_no_plaintext_password() {
    let pg = Postgres::shared();
    let verifier = pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_user'");
    assert!(verifier.starts_with("SCRAM-SHA-256$"));
    let ini =
        pool_ini(pg, "app", "", "transaction", "").replace("auth_type = md5", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &Pooler::userlist_line(APP_USER, &verifier));
    for file in ["pgcorral.ini", "userlist.txt"] {
        let text = std::fs::read_to_string(pooler.dir.join(file)).unwrap();
        assert!(!text.contains(APP_PASSWORD), "{file} holds no plaintext password");
    }
    for _ in 0..3 {
        assert_eq!(
            ok(psql(&conn(&pooler, APP_USER, APP_PASSWORD, ""), "SELECT current_user"), "pass-through"),
            "app_user"
        );
    }
    assert!(asyncpg_login(&pooler, APP_USER, "wrong", false).starts_with("28P01"));
}

/// SCRAM-SHA-256-PLUS with tls-server-end-point: psql's channel_binding=require succeeds over
/// TLS; over plaintext it cannot, and psql refuses.
#[test]
fn channel_binding_with_psql() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let ini = pool_ini(pg, "app", "", "transaction", &tls_lines(&certs))
        .replace("auth_type = md5", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &app_userlist());
    let bound = conn(&pooler, APP_USER, APP_PASSWORD, "sslmode=require channel_binding=require");
    assert_eq!(ok(psql(&bound, "SELECT current_user"), "channel binding"), "app_user");
    let wrong =
        psql(&conn(&pooler, APP_USER, "wrong", "sslmode=require channel_binding=require"), "SELECT 1");
    assert!(stderr(&wrong).contains("SASL authentication failed"), "{}", stderr(&wrong));
    let plain =
        psql(&conn(&pooler, APP_USER, APP_PASSWORD, "sslmode=disable channel_binding=require"), "SELECT 1");
    assert!(!plain.status.success(), "no channel binding without TLS");
}

/// `auth_type = any`: whatever user name the client gives, the database's configured user
/// logs in to PostgreSQL.
#[test]
fn any_logs_in_as_the_databases_user() {
    let pg = Postgres::shared();
    let ini =
        pool_ini(pg, "app", "user=app_user", "transaction", "").replace("auth_type = md5", "auth_type = any");
    let ini = ini.replace("[pgbouncer]", "[pgbouncer]\nadmin_users = app_user");
    let pooler = Pooler::start(&ini, &app_userlist());
    assert_eq!(ok(psql(&conn(&pooler, "whoever", "", ""), "SELECT current_user"), "any"), "app_user");
    // The console has no user of its own: a name alone does not open it.
    let console = psql(&conn(&pooler, "app_user", "", "dbname=pgbouncer"), "SHOW POOLS");
    assert!(!console.status.success(), "any lets nobody into the console by name");
    assert!(String::from_utf8_lossy(&console.stderr).contains("auth_type = any"), "{console:?}");

    // A database with no user of its own cannot be served so: PgBouncer refuses such logins,
    // pgcorral the configuration.
    let open = ini.replace("[pgbouncer]", &format!("open = host=127.0.0.1 port={}\n[pgbouncer]", pg.port));
    let refused = Pooler::start_result(&open, &app_userlist()).err().expect("the configuration is refused");
    assert!(refused.contains("auth_type = any requires a forced user: database \"open\""), "{refused}");
}

/// `auth_user` + `auth_query` (per database here): a role created after pgcorral started logs
/// in with its PostgreSQL password, which no file holds; a wrong password, an unknown role and
/// an expired one (`VALID UNTIL` in the past) are refused alike.
#[test]
fn auth_query_finds_users_created_after_start() {
    let pg = Postgres::shared();
    let ini = pool_ini(pg, "app", "auth_user=postgres", "transaction", "")
        .replace("auth_type = md5", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &app_userlist());
    pg.sql(
        "CREATE ROLE late_user LOGIN PASSWORD 'late-pass';
         CREATE ROLE expired_user LOGIN PASSWORD 'old-pass' VALID UNTIL '2001-01-01';
         GRANT CONNECT ON DATABASE app TO late_user;",
    );
    assert_eq!(asyncpg_login(&pooler, "late_user", "late-pass", false), "ok late_user");
    assert_eq!(
        ok(psql(&conn(&pooler, "late_user", "late-pass", ""), "SELECT current_user"), "psql"),
        "late_user"
    );
    for (user, password) in [("late_user", "wrong"), ("nobody_here", "x"), ("expired_user", "old-pass")] {
        let answer = asyncpg_login(&pooler, user, password, false);
        assert!(answer.starts_with("28P01"), "{user}: {answer}");
    }
    for file in ["pgcorral.ini", "userlist.txt"] {
        assert!(!std::fs::read_to_string(pooler.dir.join(file)).unwrap().contains("late-pass"));
    }
}

/// The global `auth_user` serves every database without its own.
#[test]
fn global_auth_user_serves_databases_without_their_own() {
    let pg = Postgres::shared();
    let ini = pool_ini(pg, "app", "", "transaction", "auth_user = postgres\nauth_dbname = postgres");
    let pooler = Pooler::start(&ini, &app_userlist());
    pg.sql("CREATE ROLE global_late LOGIN PASSWORD 'global-pass'");
    assert_eq!(asyncpg_login(&pooler, "global_late", "global-pass", false), "ok global_late");
    assert!(asyncpg_login(&pooler, "global_late", "nope", false).starts_with("28P01"));
}

/// Secrets stay out of the log (at debug verbosity), every SHOW and the reload diff, whether
/// logins succeed or fail.
#[test]
fn secrets_never_reach_logs_or_show_output() {
    let pg = Postgres::shared();
    let db_password = "db-secret-7731";
    let ini = pool_ini(
        pg,
        "app",
        &format!("user=app_user password={db_password}"),
        "transaction",
        "admin_users = admin",
    )
    .replace("dbname=app user", "dbname=app  user");
    let userlist =
        [Pooler::userlist_line(APP_USER, APP_PASSWORD), Pooler::userlist_line("admin", "admin-secret-99")]
            .concat();
    let pooler = Pooler::start(&ini, &userlist);
    let _ = psql(&conn(&pooler, APP_USER, APP_PASSWORD, ""), "SELECT 1");
    let _ = psql(&conn(&pooler, APP_USER, "typo-secret-123", ""), "SELECT 1");
    let ini_path = pooler.dir.join("pgcorral.ini");
    let text = std::fs::read_to_string(&ini_path).unwrap();
    std::fs::write(&ini_path, text.replace(db_password, "db-secret-8842")).unwrap();
    pooler.signal(libc::SIGHUP);
    assert!(wait_until(std::time::Duration::from_secs(5), || pooler.log().contains("database app changed")));
    let mut shown = String::new();
    for show in ["CONFIG", "DATABASES", "USERS", "POOLS", "CLIENTS", "SERVERS", "STATS", "STATE"] {
        let out = pooler.psql("admin", "admin-secret-99", "pgbouncer", &format!("SHOW {show}"));
        assert!(out.status.success(), "SHOW {show}: {}", stderr(&out));
        shown.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let log = pooler.log();
    for secret in [db_password, "db-secret-8842", APP_PASSWORD, "typo-secret-123", "admin-secret-99"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        assert!(!shown.contains(secret), "{secret} in SHOW output:\n{shown}");
    }
}

/// A password that SASLprep rewrites (a no-break space, full-width letters): PostgreSQL and
/// libpq salt its prepared form, and so must pgcorral, both when it checks a client against
/// the plaintext in `auth_file` and when it logs in to PostgreSQL with it.
#[tokio::test]
async fn passwords_that_saslprep_rewrites_work_both_ways() {
    let pg = Postgres::shared();
    // U+00A0 maps to a space, U+FF50.. (full-width) fold to ASCII under NFKC.
    let password = "ｐａｓｓ\u{a0}word";
    pg.sql(&format!(
        "DROP ROLE IF EXISTS saslprep_user; CREATE ROLE saslprep_user LOGIN PASSWORD '{password}';
         GRANT CONNECT ON DATABASE app TO saslprep_user;"
    ));
    let stored = pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'saslprep_user'");
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    let ini =
        pool_ini(pg, "app", "", "transaction", "").replace("auth_type = md5", "auth_type = scram-sha-256");
    let pooler = Pooler::start(&ini, &(app_userlist() + &Pooler::userlist_line("saslprep_user", password)));
    let client = pooler.connect("saslprep_user", password, "app").await.expect("login through pgcorral");
    assert_eq!(first_value(&client, "SELECT current_user").await.unwrap(), "saslprep_user");
    // Its prepared form is the same password, as PostgreSQL sees it; one character off is not.
    pooler.connect("saslprep_user", "pass word", "app").await.expect("the SASLprep'd spelling");
    let error = pooler.connect("saslprep_user", "password", "app").await.expect_err("another password");
    assert_eq!(error.as_db_error().map(|e| e.code().code()), Some("28P01"), "{error:?}");
}
