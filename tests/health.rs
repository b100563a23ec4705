//! `GET /health` for probes and load balancers, and systemd's readiness protocol.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use support::*;

/// The status code and body of `GET path` on 127.0.0.1:`port`.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics_addr");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

fn console(pooler: &Pooler, command: &str) -> String {
    let out = pooler.psql("admin", "admin-pass", "pgbouncer", command);
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn health_answers_200_while_serving_and_503_when_paused_unreachable_or_stopping() {
    let pg = Postgres::shared();
    let metrics = free_port();
    let dead = free_port();
    let ini = format!(
        "[databases]\n{APP_DB} = host=127.0.0.1 port={pg_port} dbname={APP_DB}\n\
         gone = host=127.0.0.1 port={dead} dbname=gone\n\
         [pgbouncer]\nauth_type = plain\npool_mode = transaction\nadmin_users = admin\n\
         metrics_addr = 127.0.0.1:{metrics}\nserver_login_retry = 60\n",
        pg_port = pg.port
    );
    let pooler = Pooler::start(&ini, &(app_userlist() + &Pooler::userlist_line("admin", "admin-pass")));
    let health = || get(metrics, "/health");
    assert_eq!(
        health(),
        (200, "{\"status\":\"ok\",\"databases\":{\"app\":\"untried\",\"gone\":\"untried\"}}\n".into())
    );

    assert!(pooler.psql(APP_USER, APP_PASSWORD, APP_DB, "SELECT 1").status.success());
    assert_eq!(
        health(),
        (200, "{\"status\":\"ok\",\"databases\":{\"app\":\"reachable\",\"gone\":\"untried\"}}\n".into())
    );

    console(&pooler, "PAUSE");
    let (status, body) = health();
    assert_eq!((status, body.contains("\"status\":\"paused\"")), (503, true), "{body}");
    console(&pooler, "RESUME");
    assert_eq!(health().0, 200);

    // Every host of `gone` refuses: the database is unreachable until server_login_retry passes.
    assert!(!pooler.psql(APP_USER, APP_PASSWORD, "gone", "SELECT 1").status.success());
    assert_eq!(
        health(),
        (
            503,
            "{\"status\":\"unreachable\",\"databases\":{\"app\":\"reachable\",\"gone\":\"unreachable\"}}\n"
                .into()
        )
    );

    // A graceful stop waits for its clients; meanwhile the probe says so.
    let mut held = wire::RawClient::connect(pooler.port, APP_USER, APP_PASSWORD, APP_DB);
    held.simple("SELECT 1");
    unsafe { libc::kill(pooler.pid() as i32, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(10), || health().1.contains("\"status\":\"shutting down\"")));
    assert_eq!(health().0, 503);
}

#[test]
fn systemd_hears_ready_once_listening_and_stopping_at_shutdown() {
    let pg = Postgres::shared();
    let dir = std::env::temp_dir().join(format!("pgcorral-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ini = pool_ini(pg, APP_DB, "", "transaction", "");
    let pooler = Pooler::start_with_env(&ini, &app_userlist(), &[("NOTIFY_SOCKET", path.to_str().unwrap())])
        .expect("pgcorral starts");
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1 from pgcorral");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains(&format!("STATUS=listening on port {}", pooler.port)), "{ready}");
    assert!(pooler.psql(APP_USER, APP_PASSWORD, APP_DB, "SELECT 1").status.success(), "serving when READY");

    unsafe { libc::kill(pooler.pid() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).expect("STOPPING=1 from pgcorral");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let _ = std::fs::remove_dir_all(&dir);
}
