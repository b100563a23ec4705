// node-postgres (`pg` from npm) for driver-compatibility tests: installed once into a cache
// directory under the system temp dir and reused by later runs, like the Python venv.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Changing this list reinstalls, because the marker records it.
const PACKAGES: &[&str] = &["pg@8"];

/// The `node_modules` directory holding [`PACKAGES`], installing them on first use. A file
/// lock serialises parallel test binaries; the marker is written last, so an interrupted
/// install is redone.
pub fn node_modules() -> PathBuf {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES
        .get_or_init(|| {
            super::require_program("node", "apt-get install nodejs");
            super::require_program("npm", "apt-get install npm");
            // Not named pgcorral-<kind>-<pid>: the stale-dir sweep must leave it alone.
            let dir = std::env::temp_dir().join("pgcorral-node-cache");
            std::fs::create_dir_all(&dir).expect("create node cache dir");
            let marker = dir.join(".pgcorral-ready");
            let wanted = PACKAGES.join("\n");

            let lock = File::create(dir.join("install.lock")).expect("create install.lock");
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                panic!("flock install.lock: {}", std::io::Error::last_os_error());
            }
            if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
                let _ = std::fs::remove_dir_all(dir.join("node_modules"));
                let out = Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
                    .arg(&dir)
                    .args(PACKAGES)
                    .stdin(Stdio::null())
                    .output()
                    .expect("run npm install");
                super::postgres::check(&out, "npm install");
                std::fs::write(&marker, &wanted).expect("write node cache marker");
            }
            drop(lock);
            dir.join("node_modules")
        })
        .clone()
}

/// Runs `script` with node, [`node_modules`] on its module path, and the given environment.
pub fn run_node(script: &str, env: &[(&str, &str)]) -> Output {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let modules = node_modules();
    let path = std::env::temp_dir().join(format!(
        "pgcorral-script-{}-{}.js",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, script).expect("write node script");
    let out = Command::new("node")
        .arg(&path)
        .env("NODE_PATH", &modules)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    let _ = std::fs::remove_file(&path);
    out
}
