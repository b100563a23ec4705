// A Python virtualenv with the client drivers (asyncpg, psycopg, SQLAlchemy) that
// compatibility tests run against pgcorral, built once per target dir and
// shared by every test binary.

use super::target_dir;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Changing this list rebuilds the venv, because the marker records it.
/// greenlet is what SQLAlchemy's asyncio extension runs on; pip leaves it out on some platforms.
/// fastapi, uvicorn and httpx serve and load the deployment guide's application.
const PACKAGES: &[&str] = &[
    "asyncpg",
    // 3.3.9: its wheel bundles libpq 18, which speaks protocol 3.2 (tests/protocol_versions.rs).
    "psycopg[binary]==3.3.9",
    "prometheus_client",
    "sqlalchemy",
    "greenlet",
    "fastapi",
    "uvicorn",
    "httpx",
];

/// Path of the venv's python, creating the venv on first use. A file lock
/// serialises test binaries that run in parallel; the marker file is written
/// last, so a half-built venv from an interrupted run is rebuilt.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let target = target_dir();
            std::fs::create_dir_all(&target).expect("create target dir");
            let venv = target.join("pyvenv");
            let python = venv.join("bin").join("python");
            let marker = venv.join(".pgcorral-ready");
            let wanted = PACKAGES.join("\n");

            let lock = File::create(target.join("pyvenv.lock")).expect("create pyvenv.lock");
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                panic!("flock pyvenv.lock: {}", std::io::Error::last_os_error());
            }
            if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
                let _ = std::fs::remove_dir_all(&venv);
                let base = std::env::var("PYTHON3").unwrap_or_else(|_| "python3".into());
                run_checked(Command::new(&base).arg("-m").arg("venv").arg(&venv), "python3 -m venv");
                run_checked(
                    Command::new(&python)
                        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                        .args(PACKAGES),
                    "pip install",
                );
                std::fs::write(&marker, &wanted).expect("write venv marker");
            }
            drop(lock);
            python
        })
        .clone()
}

/// Runs `script` with the venv's python and the given extra environment.
pub fn run_python(script: &str, env: &[(&str, &str)]) -> Output {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let python = python();
    let path = std::env::temp_dir().join(format!(
        "pgcorral-script-{}-{}.py",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, script).expect("write python script");
    let out = Command::new(python)
        .arg(&path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    let _ = std::fs::remove_file(&path);
    out
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    super::postgres::check(&out, what);
}
