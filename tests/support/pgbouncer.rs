// Debian's PgBouncer (1.18) as a test peer: a server that does not negotiate protocol 3.2.
// Started as user postgres when the tests run as root (it refuses root), with a watchdog that
// stops it if the test process dies first.

use super::{free_port, scratch_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
}

/// Where Debian puts it; not on a non-root PATH.
fn binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/pgbouncer");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("pgbouncer")
    }
}

impl PgBouncer {
    /// PgBouncer with `databases` as its `[databases]` section, `auth_type = plain` and
    /// `userlist` as its auth_file.
    pub fn start(databases: &str, userlist: &str) -> PgBouncer {
        let dir = scratch_dir("pgbouncer");
        let port = free_port();
        let d = dir.display();
        let ini = format!(
            "[databases]\n{databases}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = plain\nauth_file = {d}/userlist.txt\npool_mode = transaction\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(dir.join("userlist.txt"), userlist).unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let status = Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().unwrap();
            assert!(status.success(), "chown the PgBouncer directory");
        }
        let runas = if root { "runuser -u postgres -- " } else { "" };
        // -d: it daemonizes once listening and writes its pidfile; the loop then watches both
        // this process and PgBouncer.
        let script = format!(
            "{runas}'{bin}' -d '{d}/pgbouncer.ini' || exit 1
             ( trap '' INT HUP TERM
               while kill -0 {me} 2>/dev/null && [ -f '{d}/pgbouncer.pid' ]; do sleep 1; done
               [ -f '{d}/pgbouncer.pid' ] && kill $(cat '{d}/pgbouncer.pid') ) >/dev/null 2>&1 &",
            bin = binary().display(),
            me = std::process::id(),
        );
        let out =
            Command::new("sh").arg("-c").arg(script).stdin(Stdio::null()).output().expect("run pgbouncer");
        let bouncer = PgBouncer { port, dir };
        assert!(
            out.status.success()
                && super::wait_until(std::time::Duration::from_secs(10), || {
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                }),
            "PgBouncer did not start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            bouncer.log()
        );
        bouncer
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
