//! Process plumbing around the actor system: the open-file limit, binding the listening
//! sockets, the pidfile, `-d` (detach) and `-u` (switch user), done before any thread starts.

use std::fs;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, Socket as RawSocket, Type};

use crate::actors::listener::BoundListener;
use crate::config::{Config, General};

/// PgBouncer's `listen_backlog` default is 128; a burst of `pgbench -C` clients needs more.
const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("listen_addr {0}: cannot resolve")]
    Resolve(String),
    #[error("pidfile {path}: {source}")]
    Pidfile { path: String, source: io::Error },
    #[error(
        "{addr}: another process listens on this port; set so_reuseport = 1 in every process that shares it"
    )]
    PortTaken { addr: String },
    #[error("pidfile {0} exists and process {1} is running: is another pgcorral running?")]
    AlreadyRunning(String, i32),
    #[error("no listen_addr and no unix_socket_dir: nothing to listen on")]
    NothingToListenOn,
    #[error("user {0}: {1}")]
    User(String, String),
    #[error("cannot detach: {0}")]
    Detach(io::Error),
}

/// File descriptors the configuration may need at once, as PgBouncer estimates them:
/// `max_client_conn` logged-in clients and as many still logging in (see
/// `Shared::start_login`), every database's servers (`pool_size` + `reserve_pool_size`, per
/// user in `auth_file` unless the database forces one), and a margin for listeners, log and
/// auth_query connections.
pub fn files_needed(config: &Config) -> u64 {
    let general = &config.general;
    let users = config.userlist.len().max(1) as u64;
    let servers: u64 = config
        .databases
        .iter()
        .map(|db| {
            let per_pool = db.pool_size.unwrap_or(general.default_pool_size)
                + db.reserve_pool_size.unwrap_or(general.reserve_pool_size);
            per_pool as u64 * if db.user.is_some() { 1 } else { users }
        })
        .sum();
    2 * general.max_client_conn as u64 + servers + 64
}

/// Raises the soft RLIMIT_NOFILE to what the configuration needs (up to the hard limit), as
/// PgBouncer does, and warns when the hard limit is too low: past it, accept() fails and
/// clients are turned away. Returns the soft limit in force.
pub fn raise_file_limit(needed: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!("cannot read the open-file limit: {}", io::Error::last_os_error());
        return 0;
    }
    if limit.rlim_cur < needed && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: needed.min(limit.rlim_max), rlim_max: limit.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::info!("raised the open-file limit from {} to {}", limit.rlim_cur, raised.rlim_cur);
            limit.rlim_cur = raised.rlim_cur;
        } else {
            log::warn!("cannot raise the open-file limit: {}", io::Error::last_os_error());
        }
    }
    if limit.rlim_cur < needed {
        log::warn!(
            "the open-file limit is {} but this configuration may need {needed} (max_client_conn and \
             pool sizes); raise the hard limit (ulimit -Hn, LimitNOFILE=) or clients will be refused",
            limit.rlim_cur
        );
    }
    limit.rlim_cur
}

/// Binds every listening socket: for each TCP address one socket per worker (SO_REUSEPORT),
/// and the Unix socket once. Returns the listeners grouped by worker.
///
/// Without `so_reuseport`, a port another process listens on is refused first: the workers'
/// own SO_REUSEPORT would otherwise let a second pgcorral (of the same OS user) share it
/// silently. With it, processes share the port and the kernel spreads connections.
pub fn bind_listeners(general: &General, workers: usize) -> Result<Vec<Vec<BoundListener>>, DaemonError> {
    let mut per_worker: Vec<Vec<BoundListener>> = (0..workers).map(|_| Vec::new()).collect();
    for addr in tcp_addresses(general)? {
        if !general.so_reuseport {
            if let Err(e) = probe_exclusive(addr) {
                if e.kind() == io::ErrorKind::AddrInUse {
                    return Err(DaemonError::PortTaken { addr: addr.to_string() });
                }
            }
        }
        for listeners in per_worker.iter_mut() {
            match bind_tcp(addr) {
                Ok(l) => listeners.push(BoundListener::Tcp(l)),
                // `*` includes IPv6, which some machines lack; IPv4 alone is still useful.
                Err(e) if addr.is_ipv6() && general.listen_addr.iter().any(|a| a == "*") => {
                    log::warn!("not listening on {addr}: {e}");
                    break;
                }
                Err(e) => return Err(DaemonError::Bind { addr: addr.to_string(), source: e }),
            }
        }
    }
    if let Some(dir) = &general.unix_socket_dir {
        let path = dir.join(format!(".s.PGSQL.{}", general.listen_port));
        let listener = bind_unix(&path, general.unix_socket_mode, general.unix_socket_group.as_deref())
            .map_err(|e| DaemonError::Bind { addr: path.display().to_string(), source: e })?;
        per_worker[0].push(BoundListener::Unix(listener));
    }
    if per_worker.iter().all(|l| l.is_empty()) {
        return Err(DaemonError::NothingToListenOn);
    }
    Ok(per_worker)
}

/// The `/metrics` listener, if `metrics_addr` is set; bound before start-up completes so that
/// an address in use is reported at once.
pub fn bind_metrics(general: &General) -> Result<Option<std::net::TcpListener>, DaemonError> {
    let Some(addr) = &general.metrics_addr else { return Ok(None) };
    let resolved = addr.to_socket_addrs().map_err(|_| DaemonError::Resolve(addr.clone()))?;
    let mut last = None;
    for socket in resolved {
        match std::net::TcpListener::bind(socket) {
            Ok(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(|e| DaemonError::Bind { addr: addr.clone(), source: e })?;
                return Ok(Some(listener));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(DaemonError::Bind {
        addr: addr.clone(),
        source: last.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no address")),
    })
}

fn tcp_addresses(general: &General) -> Result<Vec<SocketAddr>, DaemonError> {
    let mut addrs = Vec::new();
    for host in &general.listen_addr {
        if host == "*" {
            addrs.push(SocketAddr::from(([0, 0, 0, 0], general.listen_port)));
            addrs.push(SocketAddr::from(([0u16; 8], general.listen_port)));
            continue;
        }
        let resolved = (host.as_str(), general.listen_port)
            .to_socket_addrs()
            .map_err(|_| DaemonError::Resolve(host.clone()))?;
        for addr in resolved {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
    }
    Ok(addrs)
}

/// Binds `addr` without SO_REUSEPORT and lets it go: fails with AddrInUse while another
/// process listens there.
fn probe_exclusive(addr: SocketAddr) -> io::Result<()> {
    let socket = RawSocket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // TIME_WAIT connections of an earlier run must not count as a listener.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = RawSocket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Binds the Unix socket with `unix_socket_mode` and, when set, `unix_socket_group`.
fn bind_unix(path: &Path, mode: u32, group: Option<&str>) -> io::Result<std::os::unix::net::UnixListener> {
    // A socket file left by a crashed process would make bind fail; a live one would answer.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening there"));
        }
        fs::remove_file(path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    if let Some(group) = group {
        let gid = group_id(group).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("unix_socket_group {group}: no such group"))
        })?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The id of a group named by name or number.
fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // getgrnam_r: the reentrant form; start-up is single-threaded, but this costs nothing.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut result) };
    (rc == 0 && !result.is_null()).then_some(group.gr_gid)
}

/// Removes the pidfile when dropped.
pub struct Pidfile(PathBuf);

impl Pidfile {
    pub fn create(path: &Path) -> Result<Pidfile, DaemonError> {
        if let Ok(text) = fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                // SAFETY: kill with signal 0 only checks that the process exists.
                if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                    return Err(DaemonError::AlreadyRunning(path.display().to_string(), pid));
                }
            }
        }
        Self::replace(path)
    }

    /// Writes this process's pid over whatever is there: an online restart takes the file
    /// over from the running process.
    pub fn replace(path: &Path) -> Result<Pidfile, DaemonError> {
        let err = |source| DaemonError::Pidfile { path: path.display().to_string(), source };
        fs::write(path, format!("{}\n", std::process::id())).map_err(err)?;
        Ok(Pidfile(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    /// Removes the file only while it names this process: after an online restart it names the
    /// new one.
    fn drop(&mut self) {
        let ours =
            fs::read_to_string(&self.0).is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// `-d`: fork, let the parent exit, start a new session, and drop the terminal.
pub fn detach() -> Result<(), DaemonError> {
    // SAFETY: called before any thread exists; the child continues with a copy of this
    // single-threaded process, the parent exits at once.
    unsafe {
        match libc::fork() {
            -1 => return Err(DaemonError::Detach(io::Error::last_os_error())),
            0 => {}
            _ => libc::_exit(0),
        }
        if libc::setsid() == -1 {
            return Err(DaemonError::Detach(io::Error::last_os_error()));
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(())
}

/// `-u user`: switch to that user's uid and gid (only possible as root).
pub fn switch_user(name: &str) -> Result<(), DaemonError> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| DaemonError::User(name.into(), "invalid name".into()))?;
    // SAFETY: getpwnam returns a pointer into static storage, read before any other call.
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            return Err(DaemonError::User(name.into(), "no such user".into()));
        }
        let (uid, gid) = ((*pw).pw_uid, (*pw).pw_gid);
        if libc::setgid(gid) != 0 || libc::initgroups(cname.as_ptr(), gid) != 0 || libc::setuid(uid) != 0 {
            return Err(DaemonError::User(name.into(), io::Error::last_os_error().to_string()));
        }
    }
    Ok(())
}

/// systemd's readiness protocol (`Type=notify`): `state` (`READY=1`, `STOPPING=1`, ...) as one
/// datagram to `$NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract socket name.
/// Nothing happens without the variable; a failure is logged, never fatal.
pub fn notify_systemd(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let name = target.as_encoded_bytes();
        match name.strip_prefix(b"@") {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &target),
        }
    })();
    if let Err(e) = sent {
        log::warn!("could not notify systemd ({}): {e}", target.to_string_lossy());
    }
}
