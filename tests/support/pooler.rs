// A pgcorral daemon under test: writes its ini and userlist into a temp dir,
// runs the binary Cargo built for this test, and makes sure the process dies
// with the test (SIGKILL on parent death) or when the handle is dropped.

use super::{free_port, scratch_dir};
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Pooler {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
    /// Another process took over from this one and works in the same directory.
    dir_taken_over: bool,
}

impl Pooler {
    /// Starts pgcorral and waits until it accepts TCP; panics with its
    /// output if it does not.
    pub fn start(ini: &str, userlist: &str) -> Pooler {
        Self::start_result(ini, userlist).unwrap_or_else(|e| panic!("pgcorral did not start:\n{e}"))
    }

    /// Err carries the daemon's output when it exits (or hangs) instead of
    /// listening, which is what configuration-error tests assert on.
    pub fn start_result(ini: &str, userlist: &str) -> Result<Pooler, String> {
        Self::start_with_env(ini, userlist, &[])
    }

    /// `start_result` with extra environment variables for the daemon (NOTIFY_SOCKET, say).
    pub fn start_with_env(ini: &str, userlist: &str, env: &[(&str, &str)]) -> Result<Pooler, String> {
        Self::launch(ini, userlist, env, None, free_port())
    }

    /// `start_result` on a given port (several processes sharing one, `so_reuseport`).
    pub fn start_on_port(ini: &str, userlist: &str, port: u16) -> Result<Pooler, String> {
        Self::launch(ini, userlist, &[], None, port)
    }

    /// A daemon that sees `hosts` as its /etc/hosts: it runs in a mount namespace of its own
    /// (`unshare -m`, root only) with the file bound over /etc/hosts, so that a test decides
    /// what its server host names resolve to, and can change it while it runs by rewriting the
    /// file in place.
    pub fn start_with_hosts_file(ini: &str, userlist: &str, hosts: &std::path::Path) -> Pooler {
        Self::launch(ini, userlist, &[], Some(hosts), free_port())
            .unwrap_or_else(|e| panic!("pgcorral did not start:\n{e}"))
    }

    fn launch(
        ini: &str,
        userlist: &str,
        env: &[(&str, &str)],
        hosts: Option<&std::path::Path>,
        port: u16,
    ) -> Result<Pooler, String> {
        let dir = scratch_dir("pooler");
        std::fs::write(dir.join("userlist.txt"), userlist).expect("write userlist.txt");
        let d = dir.display();
        let config = format!(
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {d}\n\
             auth_file = {d}/userlist.txt\nlogfile = {d}/pgcorral.log\npidfile = {d}/pgcorral.pid\n{ini}"
        );
        let ini_path = dir.join("pgcorral.ini");
        std::fs::write(&ini_path, config).expect("write pgcorral.ini");

        let out = File::create(dir.join("stderr.log")).expect("create stderr.log");
        let mut cmd = match hosts {
            None => Command::new(binary()),
            Some(hosts) => {
                let mut cmd = Command::new("unshare");
                cmd.args(["-m", "--", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""])
                    .arg(hosts)
                    .arg(binary());
                cmd
            }
        };
        cmd.arg("-v")
            .arg(&ini_path)
            .current_dir(&dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup stderr.log"))
            .stderr(out);
        let child = spawn_supervised(cmd).map_err(|e| format!("spawn {}: {e}", binary().display()))?;
        let mut pooler = Pooler { port, dir, child, dir_taken_over: false };

        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = pooler.child.try_wait() {
                let log = pooler.log();
                return Err(format!("pgcorral exited with {status} before listening:\n{log}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(pooler);
            }
            if Instant::now() >= deadline {
                let log = pooler.log();
                return Err(format!("pgcorral did not listen on {port} within 10 s:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `pgcorral -R` with the same configuration: a new process that takes over this one's
    /// sockets and clients (this one exits once its clients have moved). Returns once the new
    /// process holds the sockets.
    pub fn reboot(&mut self) -> Result<Pooler, String> {
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("stderr.log"))
            .expect("open stderr.log");
        let mut cmd = Command::new(binary());
        cmd.arg("-v")
            .arg("-R")
            .arg(self.dir.join("pgcorral.ini"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup stderr.log"))
            .stderr(out);
        let before = self.log().matches("took over the listening sockets").count();
        let child = spawn_supervised(cmd).map_err(|e| format!("spawn {}: {e}", binary().display()))?;
        self.dir_taken_over = true;
        let mut next = Pooler { port: self.port, dir: self.dir.clone(), child, dir_taken_over: false };
        let taken = |p: &Pooler| p.log().matches("took over the listening sockets").count() > before;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !taken(&next) {
            if let Ok(Some(status)) = next.child.try_wait() {
                return Err(format!("pgcorral -R exited with {status}:\n{}", next.log()));
            }
            if Instant::now() >= deadline {
                return Err(format!("pgcorral -R did not take over within 10 s:\n{}", next.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(next)
    }

    /// stderr.log, then the logfile named in the ini.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("--- stderr.log ---\n{}--- pgcorral.log ---\n{}", read("stderr.log"), read("pgcorral.log"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// e.g. `libc::SIGHUP` for reload tests, `libc::SIGINT` for safe shutdown.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Whether the process has exited (reaps it if so).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        super::conninfo(self.port, user, password, db)
    }

    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        super::connect_plain(&self.url(user, password, db)).await
    }

    /// psql through the pooler; the caller inspects status, stdout and stderr.
    pub fn psql(&self, user: &str, password: &str, db: &str, sql: &str) -> Output {
        Command::new(super::postgres::pg_bin("psql"))
            .args(["-X", "-At", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(user)
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// One auth_file line; a `"` inside a field is written doubled, as the
    /// auth_file format requires.
    pub fn userlist_line(user: &str, secret: &str) -> String {
        format!("\"{}\" \"{}\"\n", user.replace('"', "\"\""), secret.replace('"', "\"\""))
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "--- pgcorral on port {} (dir kept: {}) ---\n{}",
                self.port,
                self.dir.display(),
                self.log()
            );
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !panicking && !self.dir_taken_over {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// PGCORRAL_BIN at run time wins (benches, or a scratch crate testing this
/// harness); otherwise the binary Cargo built for this test target.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PGCORRAL_BIN") {
        return p.into();
    }
    match option_env!("CARGO_BIN_EXE_pgcorral") {
        Some(p) => p.into(),
        None => panic!("no pgcorral binary: set PGCORRAL_BIN"),
    }
}

/// Spawns `cmd` so that the child gets SIGKILL when this process dies.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, and test
/// threads end after each test (a `shared()` daemon would be killed with
/// them), so every fork happens on one thread that lives as long as the
/// process. Any pre_exec hooks the caller added run first; one that changes
/// uid must be among them, because a credential change clears the signal.
pub fn spawn_supervised(mut cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("support-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, reply_tx)).expect("spawner thread gone");
    reply_rx.recv().expect("spawner thread gone")
}
