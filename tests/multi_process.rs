//! Several pgcorral processes on one host: `so_reuseport = 1` lets them share a TCP port (each
//! with its own pidfile, logfile and Unix socket directory), and the combinations that cannot
//! work are refused at start-up with a clear reason.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn ini(pg: &Postgres, general: &str) -> String {
    pool_ini(pg, APP_DB, "", "transaction", general)
}

/// How many of `user`'s clients the process behind `pooler`'s own Unix socket holds, asked
/// through that socket as the console's `pgbouncer` user (pgcorral's own OS user).
fn clients_of(pooler: &Pooler, user: &str) -> usize {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-U", "pgbouncer", "-d", "pgbouncer", "-c", "SHOW CLIENTS", "-h"])
        .arg(&pooler.dir)
        .arg("-p")
        .arg(pooler.port.to_string())
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.split('|').nth(1) == Some(user)).count()
}

/// Starts pgcorral on `port` with `ini` and expects it to refuse: returns what it said.
fn refused(ini: &str, port: u16) -> String {
    let dir = std::env::temp_dir().join(format!("pgcorral-refused-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("userlist.txt"), app_userlist()).unwrap();
    let d = dir.display();
    let config = format!(
        "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
         auth_file = {d}/userlist.txt\npidfile = {d}/pgcorral.pid\n{ini}"
    );
    std::fs::write(dir.join("pgcorral.ini"), config).unwrap();
    let mut child = Command::new(pgcorral_binary())
        .arg(dir.join("pgcorral.ini"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(exited && !out.status.success(), "a second process started where it must not");
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_so_reuseport_two_processes_share_a_port_and_the_kernel_spreads_clients() {
    let pg = Postgres::shared();
    let port = free_port();
    let first = Pooler::start_on_port(&ini(pg, "so_reuseport = 1"), &app_userlist(), port).unwrap();
    let second = Pooler::start_on_port(&ini(pg, "so_reuseport = 1"), &app_userlist(), port).unwrap();
    // The second answers on its own Unix socket once it listens (TCP answered at once: the
    // first process holds the port too).
    let socket = second.dir.join(format!(".s.PGSQL.{port}"));
    assert!(wait_until(Duration::from_secs(10), || socket.exists()), "{}", second.log());
    let mut clients = Vec::new();
    for _ in 0..20 {
        let client =
            first.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("a client on the shared port");
        assert_eq!(first_value(&client, "SELECT 1").await.unwrap(), "1");
        clients.push(client);
    }
    let (a, b) = (clients_of(&first, APP_USER), clients_of(&second, APP_USER));
    assert_eq!(a + b, 20, "every client is in one of the two processes");
    assert!(a > 0 && b > 0, "the kernel gave every client to one process: {a} and {b}");
}

#[test]
fn without_so_reuseport_a_second_process_on_the_port_is_refused() {
    let pg = Postgres::shared();
    let port = free_port();
    let _first = Pooler::start_on_port(&ini(pg, ""), &app_userlist(), port).unwrap();
    let said = refused(&ini(pg, ""), port);
    assert!(said.contains("another process listens on this port; set so_reuseport = 1"), "{said}");
}

#[test]
fn two_processes_on_one_unix_socket_are_refused() {
    let pg = Postgres::shared();
    let port = free_port();
    let first = Pooler::start_on_port(&ini(pg, "so_reuseport = 1"), &app_userlist(), port).unwrap();
    let shared_dir = format!("so_reuseport = 1\nunix_socket_dir = {}", first.dir.display());
    let said = refused(&ini(pg, &shared_dir), port);
    assert!(said.contains("another server is listening there"), "{said}");
}
