//! The command line and configuration errors as an operator meets them: `--version`, `--help`,
//! `--check` on good, broken and partly-supported configs, refusing to start on a bad config,
//! the pidfile and SIGTERM, SIGHUP reloads (applied when valid, rejected whole when not), and
//! `-d` detaching.

mod support;

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use pgcorral::version::VERSION;
use support::*;
use tokio_postgres::error::SqlState;

/// Liveness bound for the daemon starting, stopping or picking up a reload.
const DEADLINE: Duration = Duration::from_secs(10);

fn pgcorral() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcorral"));
    cmd.stdin(Stdio::null()).env_remove("RUST_LOG");
    cmd
}

fn run(args: &[&str]) -> Output {
    pgcorral().args(args).output().expect("run pgcorral")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A config file in a directory of its own: a `[pgbouncer]` header listening on a fresh port
/// with pidfile, logfile and auth_file in that directory, then `extra`.
struct Setup {
    dir: PathBuf,
    port: u16,
    ini: PathBuf,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        let dir = scratch_dir("cli");
        let port = free_port();
        std::fs::write(dir.join("userlist.txt"), Pooler::userlist_line(APP_USER, APP_PASSWORD))
            .expect("write userlist.txt");
        let ini = dir.join("pgcorral.ini");
        let setup = Setup { dir, port, ini };
        setup.write(extra);
        setup
    }

    /// Rewrites the config file with the same header and a new `extra`.
    fn write(&self, extra: &str) {
        let d = self.dir.display();
        let text = format!(
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir = {d}\n\
             auth_file = {d}/userlist.txt\nlogfile = {d}/pgcorral.log\npidfile = {d}/pgcorral.pid\n{extra}",
            self.port
        );
        std::fs::write(&self.ini, text).expect("write pgcorral.ini");
    }

    fn ini_arg(&self) -> &str {
        self.ini.to_str().expect("UTF-8 temp path")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("pgcorral.pid")
    }

    /// 1-based line of the config file that starts with `prefix`.
    fn line_of(&self, prefix: &str) -> usize {
        let text = std::fs::read_to_string(&self.ini).expect("read pgcorral.ini");
        text.lines().position(|l| l.starts_with(prefix)).expect("line in pgcorral.ini") + 1
    }

    fn check(&self) -> Output {
        run(&["--check", self.ini_arg()])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgcorral.log")).unwrap_or_default()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- pgcorral.log ({}) ---\n{}", self.dir.display(), self.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn app_database(pg: &Postgres) -> String {
    format!("[databases]\napp = host=127.0.0.1 port={} dbname=app\n[pgbouncer]\nauth_type = md5\n", pg.port)
}

/// A foreground daemon started by a test, killed on drop if the test did not stop it.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(setup: &Setup) -> Daemon {
        let out = File::create(setup.dir.join("stderr.log")).expect("create stderr.log");
        let mut cmd = pgcorral();
        cmd.arg(&setup.ini).stdout(out.try_clone().unwrap()).stderr(out);
        let mut daemon = Daemon { child: spawn_supervised(cmd).expect("spawn pgcorral") };
        let listening = wait_until(DEADLINE, || {
            TcpStream::connect(("127.0.0.1", setup.port)).is_ok() || daemon.exited().is_some()
        });
        assert!(
            listening && daemon.exited().is_none(),
            "pgcorral did not start: {}",
            std::fs::read_to_string(setup.dir.join("stderr.log")).unwrap_or_default()
        );
        daemon
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.exited();
            status.is_some()
        });
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs pgcorral with `args` to completion, bounded by DEADLINE: a config it should refuse
/// must not leave it running.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let dir = scratch_dir("cliout");
    let err_path = dir.join("stderr");
    let mut cmd = pgcorral();
    cmd.args(args).stdout(Stdio::null()).stderr(File::create(&err_path).unwrap());
    let mut daemon = Daemon { child: spawn_supervised(cmd).expect("spawn pgcorral") };
    let status = daemon.wait(DEADLINE).expect("pgcorral kept running on a config it should refuse");
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status, err)
}

fn alive(pid: i32) -> bool {
    // A zombie nobody has reaped yet is not running.
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => !status.lines().any(|l| l.starts_with("State:") && l.contains('Z')),
        Err(_) => false,
    }
}

fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

#[test]
fn version_flags_print_the_version_and_exit_0() {
    for flag in ["--version", "-V"] {
        let out = run(&[flag]);
        assert!(out.status.success(), "{flag}: {}\n{}", out.status, stderr(&out));
        assert_eq!(stdout(&out).trim_end(), VERSION, "{flag}");
        assert_eq!(stderr(&out), "", "{flag}");
    }
}

#[test]
fn help_names_every_option() {
    let out = run(&["--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    let words: Vec<&str> = help.split_whitespace().map(|w| w.trim_end_matches(',')).collect();
    for option in ["-d", "-q", "-v", "-u", "--check"] {
        assert!(words.contains(&option), "--help does not mention {option}:\n{help}");
    }
}

#[test]
fn check_accepts_a_valid_config_without_starting() {
    let setup = Setup::new("[databases]\napp = host=127.0.0.1 port=5432 dbname=app\n");
    let out = setup.check();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "a valid config gave warnings: {}", stderr(&out));
    assert!(!setup.pidfile().exists(), "--check wrote a pidfile");
    assert!(TcpStream::connect(("127.0.0.1", setup.port)).is_err(), "--check left something listening");
}

#[test]
fn check_names_file_line_and_key_of_an_unknown_key() {
    let setup = Setup::new("max_client_conn = 10\nbogus_key = 1\ndefault_pool_size = 5\n");
    let out = setup.check();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let expected =
        format!("{}:{}: bogus_key: unknown setting", setup.ini.display(), setup.line_of("bogus_key"));
    assert!(stderr(&out).contains(&expected), "expected {expected:?} in:\n{}", stderr(&out));
}

#[test]
fn check_names_the_key_and_the_expected_form_of_a_bad_value() {
    let setup = Setup::new("default_pool_size = twenty\n");
    let out = setup.check();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let location =
        format!("{}:{}: default_pool_size:", setup.ini.display(), setup.line_of("default_pool_size"));
    assert!(err.contains(&location), "expected {location:?} in:\n{err}");
    assert!(err.contains("integer") && err.contains("\"twenty\""), "no expected form and value in:\n{err}");
}

#[test]
fn check_warns_once_about_a_pgbouncer_key_not_implemented_yet() {
    let setup = Setup::new("tcp_socket_buffer = 1\n");
    let out = setup.check();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("tcp_socket_buffer")).collect();
    assert_eq!(warnings.len(), 1, "expected one warning naming tcp_socket_buffer:\n{err}");
    let expected = format!(
        "{}:{}: tcp_socket_buffer: not implemented yet",
        setup.ini.display(),
        setup.line_of("tcp_socket_buffer")
    );
    assert!(
        warnings[0].contains("warning") && warnings[0].contains(&expected),
        "expected a warning with {expected:?}, got {:?}",
        warnings[0]
    );
}

#[test]
fn a_bad_config_stops_the_daemon_before_it_listens() {
    for (bad, key) in
        [("bogus_key = 1\n", "bogus_key"), ("default_pool_size = twenty\n", "default_pool_size")]
    {
        match Pooler::start_result(bad, "") {
            Ok(_) => panic!("pgcorral started with {bad:?}"),
            Err(output) => {
                assert!(
                    output.contains("pgcorral.ini:") && output.contains(&format!(": {key}: ")),
                    "{bad:?}: the error does not name the file, line and key:\n{output}"
                );
            }
        }
    }
}

#[test]
fn a_bad_config_gives_the_check_message_and_leaves_no_pidfile() {
    let setup = Setup::new("bogus_key = 1\n");
    let checked = setup.check();
    let (status, err) = run_to_exit(&[setup.ini_arg()]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err, stderr(&checked), "starting and --check disagree about the config");
    assert!(
        err.contains(&format!("{}:{}: bogus_key", setup.ini.display(), setup.line_of("bogus_key"))),
        "{err}"
    );
    assert!(!setup.pidfile().exists(), "a refused start left a pidfile");
}

#[test]
fn pidfile_holds_the_pid_until_sigterm_stops_the_daemon() {
    let setup = Setup::new("");
    let mut daemon = Daemon::start(&setup);
    // The port accepts (into its backlog) as soon as it is bound, a moment before the pidfile
    // is written.
    assert!(wait_until(DEADLINE, || read_pid(&setup.pidfile()).is_some()), "no pidfile written");
    assert_eq!(read_pid(&setup.pidfile()), Some(daemon.child.id() as i32), "pidfile while running");
    // Signals that arrive earlier hit a start-up race of their own; see the next test.
    assert!(
        wait_until(DEADLINE, || setup.log().contains("started with")),
        "pgcorral never finished starting:\n{}",
        setup.log()
    );

    unsafe {
        libc::kill(daemon.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = daemon.wait(DEADLINE).unwrap_or_else(|| panic!("still running {DEADLINE:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(!setup.pidfile().exists(), "the pidfile outlived the daemon");
    assert!(TcpStream::connect(("127.0.0.1", setup.port)).is_err(), "still listening after exit");
}

#[test]
fn a_sighup_right_after_the_pidfile_appears_does_not_kill_the_daemon() {
    // Init scripts and config managers reload as soon as the pidfile exists, so the daemon must
    // handle SIGHUP from then on. A few rounds, since the window being tested is short.
    for round in 0..5 {
        let setup = Setup::new("");
        let out = File::create(setup.dir.join("stderr.log")).expect("create stderr.log");
        let mut cmd = pgcorral();
        cmd.arg(&setup.ini).stdout(out.try_clone().unwrap()).stderr(out);
        let mut daemon = Daemon { child: spawn_supervised(cmd).expect("spawn pgcorral") };
        let deadline = Instant::now() + DEADLINE;
        // A tight loop rather than wait_until's 20 ms polls: the signal must follow at once.
        while read_pid(&setup.pidfile()).is_none() {
            assert!(Instant::now() < deadline && daemon.exited().is_none(), "round {round}: no pidfile");
            std::hint::spin_loop();
        }
        unsafe {
            libc::kill(daemon.child.id() as libc::pid_t, libc::SIGHUP);
        }
        let settled = wait_until(DEADLINE, || setup.log().contains("reloading") || daemon.exited().is_some());
        assert!(
            settled && daemon.exited().is_none(),
            "round {round}: SIGHUP right after the pidfile appeared: exit status {:?}, pidfile left behind: {}, \
             log:\n{}",
            daemon.exited().map(|s| s.to_string()),
            setup.pidfile().exists(),
            setup.log()
        );
    }
}

/// Polls until `db` accepts a login and answers, or DEADLINE passes.
async fn serves(pooler: &Pooler, db: &str) -> Result<String, String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let attempt = async {
            let client = pooler.connect(APP_USER, APP_PASSWORD, db).await?;
            let row = client.query_one("SELECT current_database()::text", &[]).await?;
            Ok::<String, tokio_postgres::Error>(row.get(0))
        };
        match attempt.await {
            Ok(name) => return Ok(name),
            Err(e) if Instant::now() >= deadline => return Err(format!("{e:?}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_keeps_the_running_one_on_errors() {
    let pg = Postgres::shared();
    let mut pooler = Pooler::start(&app_database(pg), &Pooler::userlist_line(APP_USER, APP_PASSWORD));
    let err = match pooler.connect(APP_USER, APP_PASSWORD, "app2").await {
        Ok(_) => panic!("app2 is not configured yet but accepted a login"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(&SqlState::PROTOCOL_VIOLATION), "{err:?}");
    assert!(format!("{err:?}").contains("no such database: app2"), "{err:?}");

    let ini_path = pooler.dir.join("pgcorral.ini");
    let original = std::fs::read_to_string(&ini_path).expect("read pgcorral.ini");
    let app2 = format!("[databases]\napp2 = host=127.0.0.1 port={} dbname=app\n", pg.port);
    let with_app2 = original.replacen("[databases]\n", &app2, 1);
    assert_ne!(with_app2, original);
    std::fs::write(&ini_path, &with_app2).unwrap();
    pooler.signal(libc::SIGHUP);
    assert_eq!(serves(&pooler, "app2").await.as_deref(), Ok("app"), "app2 after a reload that adds it");

    // Without app2 and with an unknown key: rejected whole, so app2 must survive.
    std::fs::write(&ini_path, format!("{original}bogus_key = 1\n")).unwrap();
    pooler.signal(libc::SIGHUP);
    let logged =
        wait_until(DEADLINE, || pooler.log().lines().any(|l| l.contains("ERROR") && l.contains("bogus_key")));
    assert!(logged, "no error about bogus_key logged after the broken reload:\n{}", pooler.log());
    assert!(!pooler.has_exited(), "a broken config on SIGHUP stopped the daemon");
    assert_eq!(serves(&pooler, "app2").await.as_deref(), Ok("app"), "app2 after a rejected reload");
    assert_eq!(serves(&pooler, APP_DB).await.as_deref(), Ok("app"), "app after a rejected reload");
}

/// The detached daemon is no child of ours: SIGTERM (then SIGKILL) by the pid in its pidfile.
struct Detached {
    pidfile: PathBuf,
}

impl Drop for Detached {
    fn drop(&mut self) {
        let Some(pid) = read_pid(&self.pidfile) else { return };
        if !alive(pid) {
            return;
        }
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if !wait_until(Duration::from_secs(2), || !alive(pid)) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test]
async fn dash_d_detaches_and_keeps_serving() {
    let pg = Postgres::shared();
    let setup = Setup::new(&app_database(pg));
    let (status, err) = run_to_exit(&["-d", setup.ini_arg()]);
    let guard = Detached { pidfile: setup.pidfile() };
    assert_eq!(status.code(), Some(0), "pgcorral -d: {err}");

    let mut pid = None;
    assert!(
        wait_until(DEADLINE, || {
            pid = read_pid(&guard.pidfile);
            pid.is_some()
        }),
        "the detached daemon wrote no pidfile:\n{}",
        setup.log()
    );
    let pid = pid.unwrap();
    assert!(alive(pid), "the pid {pid} in the pidfile is not running");
    let url = conninfo(setup.port, APP_USER, APP_PASSWORD, APP_DB);
    let (client, conn) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("login to the detached daemon");
    tokio::spawn(conn);
    let row =
        client.query_one("SELECT current_user::text", &[]).await.expect("query through the detached daemon");
    assert_eq!(row.get::<_, String>(0), APP_USER);
    drop(client);
    // SIGTERM waits for clients to leave: let the connection task say goodbye first.
    tokio::time::sleep(Duration::from_millis(200)).await;

    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    assert!(wait_until(DEADLINE, || !alive(pid)), "the detached daemon survived SIGTERM for {DEADLINE:?}");
    assert!(!setup.pidfile().exists(), "the detached daemon left its pidfile");
}

/// `-u postgres` as root: the daemon runs as that user (checked in /proc) and still serves.
#[tokio::test]
async fn dash_u_switches_user() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return; // Only root may switch users; nothing to check otherwise.
    }
    let pg = Postgres::shared();
    let setup = Setup::new(&format!("[databases]\napp = host=127.0.0.1 port={} dbname=app\n", pg.port));
    // The switched-to user must be able to write its pidfile and socket there.
    std::fs::set_permissions(&setup.dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut child = spawn_supervised({
        let mut cmd = pgcorral();
        cmd.args(["-u", "postgres", setup.ini_arg()]).stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    })
    .expect("spawn pgcorral -u postgres");
    let up = wait_until(DEADLINE, || std::net::TcpStream::connect(("127.0.0.1", setup.port)).is_ok());
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default().to_string();
    let login = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname=app", setup.port),
        tokio_postgres::NoTls,
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "pgcorral -u postgres did not start listening");
    let postgres_uid = postgres_ids().expect("a postgres user").0;
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == postgres_uid.to_string()), "{uid_line}");
    assert!(login.is_ok(), "login through pgcorral -u postgres failed");
}

/// The shipped configurations (the commented conf/pgcorral.ini and the seed's deployment
/// patterns in conf/examples/) load as they are: no error and no "not implemented" warning.
#[test]
fn shipped_configurations_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut files = vec![root.join("pgcorral.ini")];
    for entry in std::fs::read_dir(root.join("examples")).expect("conf/examples") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ini") {
            files.push(path);
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let out = run(&["--check", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", file.display(), stderr(&out));
        assert!(!stderr(&out).contains("not implemented"), "{}: {}", file.display(), stderr(&out));
    }
}

/// Starts the daemon with its open-file limit set to `soft`/`hard` (a hard limit above this
/// process's own is kept at its own) and returns the soft limit it runs with.
fn run_with_file_limit(setup: &Setup, soft: u64, hard: u64) -> (u64, String) {
    use std::os::unix::process::CommandExt;
    let out = File::create(setup.dir.join("stderr.log")).expect("create stderr.log");
    let mut cmd = pgcorral();
    cmd.arg(&setup.ini).stdout(out.try_clone().unwrap()).stderr(out);
    unsafe {
        cmd.pre_exec(move || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard.min(limit.rlim_max) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = Daemon { child: spawn_supervised(cmd).expect("spawn pgcorral") };
    assert!(
        wait_until(DEADLINE, || TcpStream::connect(("127.0.0.1", setup.port)).is_ok()),
        "{}",
        setup.log()
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    let soft = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    unsafe { libc::kill(daemon.child.id() as libc::pid_t, libc::SIGTERM) };
    daemon.wait(DEADLINE);
    (soft, setup.log())
}

/// As PgBouncer: the soft open-file limit is raised to what `max_client_conn` and the pools
/// may need, and a hard limit too low for them is named in a warning.
#[test]
fn the_open_file_limit_is_raised_to_fit_max_client_conn() {
    let mut own = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) };
    // 2 x 3000 clients (logged in and logging in) + the 64 margin; no database, no servers.
    let needed = 6064;
    let setup = Setup::new("max_client_conn = 3000\n");
    if own.rlim_max >= needed {
        let (soft, log) = run_with_file_limit(&setup, 256, own.rlim_max);
        assert_eq!(soft, needed, "{log}");
        assert!(log.contains("raised the open-file limit from 256 to 6064"), "{log}");
    }
    let (soft, log) = run_with_file_limit(&setup, 256, 1024);
    assert_eq!(soft, 1024, "raised as far as the hard limit allows: {log}");
    assert!(log.contains("may need 6064"), "the shortfall is named: {log}");
}

/// `unix_socket_mode` and `unix_socket_group` set the Unix socket's permissions, as in
/// PgBouncer (the default stays 0777); an unknown group stops start-up with its name.
#[test]
fn unix_socket_mode_and_group_apply_to_the_socket() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let socket = |setup: &Setup| setup.dir.join(format!(".s.PGSQL.{}", setup.port));
    // TCP accepts as soon as it is bound, a moment before the Unix socket is set up.
    let started = |setup: &Setup| assert!(wait_until(DEADLINE, || setup.log().contains("started with")));
    let setup = Setup::new("");
    let daemon = Daemon::start(&setup);
    started(&setup);
    assert_eq!(std::fs::metadata(socket(&setup)).unwrap().permissions().mode() & 0o777, 0o777);
    drop(daemon);

    // As root any group will do; otherwise only our own.
    let group = if unsafe { libc::geteuid() } == 0 { 65534 } else { unsafe { libc::getegid() } };
    let setup = Setup::new(&format!("unix_socket_mode = 0770\nunix_socket_group = {group}\n"));
    let daemon = Daemon::start(&setup);
    started(&setup);
    let meta = std::fs::metadata(socket(&setup)).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, meta.gid()), (0o770, group));
    drop(daemon);

    let setup = Setup::new("unix_socket_group = no_such_group_here\n");
    let (status, log) = {
        let out = pgcorral().arg(&setup.ini).output().expect("run pgcorral");
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(!status.success());
    assert!(log.contains("unix_socket_group no_such_group_here: no such group"), "{log}");
}
