//! TLS on both sides, through real clients: psql with each sslmode against pgcorral's
//! `client_tls_*`, client certificates, PostgreSQL 17's direct TLS, asyncpg and psycopg over
//! TLS, a reload that turns TLS on, and pgcorral reaching a PostgreSQL that only accepts TLS
//! with each `server_tls_sslmode`.

mod support;

use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{
    pg_bin, pool_ini, run_python, wait_until, Certs, Pooler, Postgres, APP_PASSWORD, APP_USER, MD5_PASSWORD,
    MD5_USER,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// psql with a full conninfo; `PGSSL*` from the environment is kept out.
fn psql(conninfo: &str, sql: &str) -> Output {
    Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-d", conninfo, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", stderr(&out));
    stdout(&out)
}

fn tls_lines(certs: &Certs, mode: &str, key: &Path) -> String {
    format!(
        "client_tls_sslmode = {mode}\nclient_tls_key_file = {}\nclient_tls_cert_file = {}\nclient_tls_ca_file = {}\n",
        key.display(),
        certs.server_cert.display(),
        certs.ca_cert.display()
    )
}

fn base(pooler: &Pooler, host: &str) -> String {
    format!("host={host} port={} user={APP_USER} password={APP_PASSWORD} dbname=app", pooler.port)
}

/// `require`: TLS clients get in, plaintext TCP is refused with PgBouncer's words, the Unix
/// socket needs no TLS; verify-full from psql checks pgcorral's certificate and host name.
/// The key is a traditional `BEGIN RSA PRIVATE KEY` file.
#[test]
fn client_tls_require_with_psql_sslmodes() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let general = tls_lines(&certs, "require", &certs.server_key_rsa);
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", &general), &support::app_userlist());
    let tcp = base(&pooler, "127.0.0.1");

    let info = ok(psql(&format!("{tcp} sslmode=require"), "\\conninfo"), "sslmode=require");
    assert!(info.contains("SSL connection (protocol: TLSv1."), "{info}");
    assert_eq!(ok(psql(&format!("{tcp} sslmode=prefer"), "SELECT 40 + 2"), "prefer"), "42");
    // allow tries plaintext first, is refused, and retries with TLS.
    let allow = ok(psql(&format!("{tcp} sslmode=allow"), "\\conninfo"), "sslmode=allow");
    assert!(allow.contains("SSL connection"), "{allow}");

    let refused = psql(&format!("{tcp} sslmode=disable"), "SELECT 1");
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("SSL required"), "{}", stderr(&refused));

    let unix = format!(
        "host={} port={} user={APP_USER} password={APP_PASSWORD} dbname=app",
        pooler.dir.display(),
        pooler.port
    );
    assert_eq!(ok(psql(&format!("{unix} sslmode=disable"), "SELECT 1"), "unix socket"), "1");

    let ca = certs.ca_cert.display();
    let localhost = base(&pooler, "localhost");
    assert_eq!(
        ok(psql(&format!("{localhost} sslmode=verify-full sslrootcert={ca}"), "SELECT 1"), "verify-full"),
        "1"
    );
    assert_eq!(ok(psql(&format!("{tcp} sslmode=verify-ca sslrootcert={ca}"), "SELECT 1"), "verify-ca"), "1");
    let wrong_host = psql(&format!("{tcp} sslmode=verify-full sslrootcert={ca}"), "SELECT 1");
    assert!(!wrong_host.status.success(), "127.0.0.1 is not the certificate's name");
    assert!(stderr(&wrong_host).contains("does not match host name"), "{}", stderr(&wrong_host));

    let log = pooler.log();
    assert!(log.contains("tls=TLSv1."), "log_connections names the TLS version:\n{log}");
}

/// `verify-ca` on the client side: a client must present a certificate signed by
/// client_tls_ca_file.
#[test]
fn client_certificates_are_required_by_verify_ca() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let (cert, key) = certs.client(APP_USER);
    let general = tls_lines(&certs, "verify-ca", &certs.server_key);
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", &general), &support::app_userlist());
    let tcp = base(&pooler, "127.0.0.1");
    let with_cert = format!("{tcp} sslmode=require sslcert={} sslkey={}", cert.display(), key.display());
    assert_eq!(ok(psql(&with_cert, "SELECT 1"), "with a client certificate"), "1");
    let without =
        psql(&format!("{tcp} sslmode=require sslcert=/nonexistent sslkey=/nonexistent"), "SELECT 1");
    assert!(!without.status.success(), "a client without a certificate is refused");
}

/// PostgreSQL 17's direct TLS: the handshake comes first, with ALPN `postgresql`; a startup
/// packet follows inside. Without ALPN the client is refused, as PostgreSQL does.
#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let general = tls_lines(&certs, "prefer", &certs.server_key);
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", &general), &support::app_userlist());

    async fn first_message(port: u16, alpn: bool) -> u8 {
        let mut builder = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).unwrap();
        builder.set_verify(openssl::ssl::SslVerifyMode::NONE);
        if alpn {
            builder.set_alpn_protos(b"\x0apostgresql").unwrap();
        }
        let ssl = builder.build().configure().unwrap().into_ssl("localhost").unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut stream = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        Pin::new(&mut stream).connect().await.unwrap();
        let mut startup = Vec::new();
        startup.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [("user", APP_USER), ("database", "app")] {
            startup.extend_from_slice(k.as_bytes());
            startup.push(0);
            startup.extend_from_slice(v.as_bytes());
            startup.push(0);
        }
        startup.push(0);
        let mut packet = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend(startup);
        let _ = stream.write_all(&packet).await;
        let mut tag = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut tag)).await {
            Ok(Ok(_)) => tag[0],
            _ => 0,
        }
    }
    assert_eq!(first_message(pooler.port, true).await, b'R', "an authentication request comes back");
    assert_eq!(first_message(pooler.port, false).await, b'E', "refused without ALPN");
}

/// asyncpg and psycopg 3 over TLS, as applications connect.
#[test]
fn asyncpg_and_psycopg_over_tls() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let general = tls_lines(&certs, "require", &certs.server_key);
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", &general), &support::app_userlist());
    let script = r#"
import asyncio, os, ssl, asyncpg, psycopg
port = int(os.environ["PORT"])
async def main():
    ctx = ssl.create_default_context(cafile=os.environ["CA"])
    conn = await asyncpg.connect(host="localhost", port=port, user="app_user", password="app-pass", database="app", ssl=ctx)
    print("asyncpg", await conn.fetchval("SELECT $1::int * 2", 21))
    await conn.close()
asyncio.run(main())
with psycopg.connect(f"host=127.0.0.1 port={port} user=app_user password=app-pass dbname=app sslmode=require") as conn:
    print("psycopg", conn.execute("SELECT 6 * 7").fetchone()[0], conn.info.pgconn.ssl_in_use)
"#;
    let port = pooler.port.to_string();
    let ca = certs.ca_cert.display().to_string();
    let out = run_python(script, &[("PORT", &port), ("CA", &ca)]);
    let text = ok(out, "python over TLS");
    assert!(text.contains("asyncpg 42"), "{text}");
    assert!(text.contains("psycopg 42 True"), "{text}");
}

/// A reload that turns `client_tls_sslmode` from disable to require applies to new clients.
#[test]
fn reload_turns_client_tls_on() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let general = tls_lines(&certs, "disable", &certs.server_key);
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", &general), &support::app_userlist());
    let tcp = base(&pooler, "127.0.0.1");
    assert!(ok(psql(&format!("{tcp} sslmode=prefer"), "\\conninfo"), "before").contains("127.0.0.1"));
    assert!(!ok(psql(&format!("{tcp} sslmode=prefer"), "\\conninfo"), "before").contains("SSL connection"));

    let ini = pooler.dir.join("pgcorral.ini");
    let text = std::fs::read_to_string(&ini).unwrap();
    std::fs::write(&ini, text.replace("client_tls_sslmode = disable", "client_tls_sslmode = require"))
        .unwrap();
    pooler.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || !psql(&format!("{tcp} sslmode=disable"), "SELECT 1")
            .status
            .success()),
        "plaintext is refused after the reload:\n{}",
        pooler.log()
    );
    assert!(ok(psql(&format!("{tcp} sslmode=prefer"), "\\conninfo"), "after").contains("SSL connection"));
}

/// A PostgreSQL that rejects plaintext TCP (`hostnossl ... reject`): pgcorral's default
/// `prefer` reaches it over TLS (pg_stat_ssl says so), `disable` is refused by it,
/// verify-full checks the certificate against the CA and the host name.
#[test]
fn server_tls_modes_against_a_tls_only_postgres() {
    let certs = Certs::make();
    let hba = "local all all trust\n\
               hostnossl all all 127.0.0.1/32 reject\n\
               hostssl all postgres 127.0.0.1/32 trust\n\
               hostssl all md5_user 127.0.0.1/32 md5\n\
               hostssl all all 127.0.0.1/32 scram-sha-256\n";
    let pg = Postgres::start_tls(&certs, hba);
    let ca = certs.ca_cert.display();
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let try_mode = |host: &str, general: &str| {
        let ini = format!(
            "[databases]\napp = host={host} port={} dbname=app\n[pgbouncer]\nauth_type = md5\npool_mode = transaction\n{general}\n",
            pg.port
        );
        let userlist = [support::app_userlist(), Pooler::userlist_line(MD5_USER, MD5_PASSWORD)].concat();
        let pooler = Pooler::start(&ini, &userlist);
        let out = pooler.psql(APP_USER, APP_PASSWORD, "app", sql);
        (out, pooler)
    };

    let (out, pooler) = try_mode("127.0.0.1", "");
    assert_eq!(ok(out, "default prefer"), "t", "the server connection is encrypted");
    // PostgreSQL asks md5_user for md5 over TLS, app_user for SCRAM.
    assert_eq!(ok(pooler.psql(MD5_USER, MD5_PASSWORD, "app", sql), "md5 user over TLS"), "t");

    let (out, pooler) = try_mode("127.0.0.1", "server_tls_sslmode = disable\nserver_connect_timeout = 1");
    assert!(!out.status.success(), "PostgreSQL refuses plaintext");
    let error = stderr(&out);
    assert!(error.contains("no encryption") || error.contains("pg_hba.conf"), "{error}\n{}", pooler.log());

    let verify =
        format!("server_tls_sslmode = verify-full\nserver_tls_ca_file = {ca}\nserver_connect_timeout = 1");
    let (out, _pooler) = try_mode("localhost", &verify);
    assert_eq!(ok(out, "verify-full against localhost"), "t");

    let (out, pooler) = try_mode("127.0.0.1", &verify);
    assert!(!out.status.success(), "the certificate does not name 127.0.0.1");
    assert!(pooler.log().contains("TLS handshake failed"), "{}", pooler.log());

    let (out, _pooler) =
        try_mode("127.0.0.1", &format!("server_tls_sslmode = verify-ca\nserver_tls_ca_file = {ca}"));
    assert_eq!(ok(out, "verify-ca ignores the host name"), "t");

    // Many clients on two workers: TLS server connections are lent, returned and handed
    // between workers without losing a transaction.
    let (_, pooler) = try_mode("127.0.0.1", "workers = 2\ndefault_pool_size = 4");
    let script = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();\n";
    let file = pooler.dir.join("ssl.sql");
    std::fs::write(&file, script).unwrap();
    let out = Command::new(pg_bin("pgbench"))
        .args(["-n", "-c", "16", "-j", "2", "-t", "50", "-h", "127.0.0.1", "-U", APP_USER, "-f"])
        .arg(&file)
        .arg("-p")
        .arg(pooler.port.to_string())
        .arg("app")
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .unwrap();
    let text = ok(out, "pgbench over TLS servers");
    assert!(text.contains("number of failed transactions: 0") || !text.contains("failed"), "{text}");
    assert!(text.contains("number of transactions actually processed: 800/800"), "{text}");
}

/// A reload that changes `server_tls_*` applies to the next server connections: a pool whose
/// verify-full cannot succeed (wrong host name) works once the reload relaxes it to require.
#[test]
fn reload_changes_server_tls() {
    let certs = Certs::make();
    let hba = "local all all trust\nhostnossl all all 127.0.0.1/32 reject\nhostssl all postgres 127.0.0.1/32 trust\n\
               hostssl all all 127.0.0.1/32 scram-sha-256\n";
    let pg = Postgres::start_tls(&certs, hba);
    let ini = format!(
        "[databases]\napp = host=127.0.0.1 port={} dbname=app\n[pgbouncer]\nauth_type = md5\npool_mode = transaction\n\
         server_connect_timeout = 1\nserver_tls_sslmode = verify-full\nserver_tls_ca_file = {}\n",
        pg.port,
        certs.ca_cert.display()
    );
    let pooler = Pooler::start(&ini, &support::app_userlist());
    assert!(!pooler.psql(APP_USER, APP_PASSWORD, "app", "SELECT 1").status.success());
    let path = pooler.dir.join("pgcorral.ini");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("server_tls_sslmode = verify-full", "server_tls_sslmode = require"))
        .unwrap();
    pooler.signal(libc::SIGHUP);
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert!(
        wait_until(Duration::from_secs(20), || stdout(&pooler.psql(APP_USER, APP_PASSWORD, "app", sql))
            == "t"),
        "{}",
        pooler.log()
    );
}

/// client_login_timeout also bounds a client that asks for TLS and then stalls mid-handshake.
#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_by_client_login_timeout() {
    let pg = Postgres::shared();
    let certs = Certs::make();
    let general = format!("{}client_login_timeout = 1\n", tls_lines(&certs, "prefer", &certs.server_key));
    let pooler = Pooler::start(&pool_ini(pg, "app", "", "transaction", &general), &support::app_userlist());
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", pooler.port)).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    // No ClientHello follows: pgcorral must hang up by itself.
    let mut rest = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the connection is closed after client_login_timeout");
}

/// `server_tls_key_file`/`server_tls_cert_file`: pgcorral presents a client certificate (its
/// key a traditional RSA file) to a PostgreSQL that authenticates app_user by certificate.
#[test]
fn pgcorral_logs_in_to_postgres_with_a_client_certificate() {
    let certs = Certs::make();
    let (cert, key) = certs.client(APP_USER);
    let rsa_key = certs.traditional(&key);
    assert!(std::fs::read_to_string(&rsa_key).unwrap().contains("BEGIN RSA PRIVATE KEY"));
    let hba =
        "local all all trust\nhostssl all postgres 127.0.0.1/32 trust\nhostssl all all 127.0.0.1/32 cert\n";
    let pg = Postgres::start_tls(&certs, hba);
    let ini = format!(
        "[databases]\napp = host=127.0.0.1 port={} dbname=app\n[pgbouncer]\nauth_type = md5\npool_mode = transaction\n\
         server_tls_sslmode = verify-ca\nserver_tls_ca_file = {}\nserver_tls_key_file = {}\nserver_tls_cert_file = {}\n",
        pg.port,
        certs.ca_cert.display(),
        rsa_key.display(),
        cert.display()
    );
    let pooler = Pooler::start(&ini, &support::app_userlist());
    let out = pooler.psql(
        APP_USER,
        APP_PASSWORD,
        "app",
        "SELECT current_user || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert_eq!(ok(out, "certificate login to PostgreSQL"), "app_user /CN=app_user");
}
