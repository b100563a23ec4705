//! Online restart (`pgcorral -R`): a new process, possibly a new binary, takes over from the
//! running one without a client noticing.
//!
//! The running process listens on `<unix_socket_dir>/.s.PGSQL.<port>.takeover` (only its own
//! OS user, or root, may connect). The new process connects and asks to take over
//! ([`crate::takeover`] holds the messages). Then:
//! 1. The old process sends its listening sockets themselves (SCM_RIGHTS), so the accept
//!    queues carry on in the new process and no connection waiting there is lost, and stops
//!    accepting.
//! 2. Every client of the old process moves as soon as it is idle between transactions
//!    (its relay checks [`handing_over`]): its socket and what its session holds (parameters,
//!    prepared statements, cancel key) go over the takeover socket, and the new process serves
//!    it from its next query on. Clients in a transaction finish it first. Clients that hold a
//!    server for their whole session (session pooling, replication) cannot move without their
//!    server and stay until they leave; TLS clients cannot move either (their TLS state lives
//!    in this process's OpenSSL) and are let go between transactions.
//! 3. Server connections are not handed over: the new process opens its own. A server holds
//!    per-session state the new process could only trust by resetting it, and opening one
//!    costs a few milliseconds against seconds of handover.
//! 4. Cancel requests reach the new process (it holds the listening sockets); for a key it does
//!    not know, it asks the old process over the takeover socket.
//! 5. When no client is left to move, the old process says so and exits.
//!
//! The exchange runs on plain threads with blocking sockets: a handful of messages per client,
//! once per restart. What they do to the actor system goes through messages to the Supervisor
//! and to client sessions.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use actix::prelude::*;
use parking_lot::Mutex;

use crate::actors::client::ClientSession;
use crate::actors::registry::Shared;
use crate::config::General;
use crate::net::fd_passing::FdChannel;
use crate::net::DetachedSocket;
use crate::takeover::{ListenerKind, Message, MovedClient, VERSION};

static HANDING_OVER: AtomicBool = AtomicBool::new(false);

/// Whether this process is handing its clients over to a new one.
pub fn handing_over() -> bool {
    HANDING_OVER.load(Ordering::Relaxed)
}

/// What goes to the new process, in order.
enum Outgoing {
    Client(Box<MovedClient>, OwnedFd),
    Done,
}

/// The queue to the thread writing to the new process; set while handing over.
static OUTBOX: Mutex<Option<mpsc::Sender<Outgoing>>> = Mutex::new(None);

/// In the new process, while the old one still has clients: where cancels for them go.
static PREDECESSOR: Mutex<Option<FdChannel>> = Mutex::new(None);

/// In the old process, until the new one has heard Done: the listening sockets handed over,
/// so that if the new process dies meanwhile this one takes them back and listens again.
static KEPT: Mutex<Option<Vec<(ListenerKind, OwnedFd)>>> = Mutex::new(None);

/// The new process went away before the takeover was complete: this process listens on its
/// sockets again, serves the clients it still has, and can be taken over again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TakeBack(pub Vec<(ListenerKind, OwnedFd)>);

fn take_back(supervisor: &Addr<crate::actors::supervisor::Supervisor>, why: &str) {
    let Some(listeners) = KEPT.lock().take() else { return };
    HANDING_OVER.store(false, Ordering::Relaxed);
    OUTBOX.lock().take();
    log::error!("takeover failed: {why}; listening again on the sockets handed over");
    supervisor.do_send(TakeBack(listeners));
}

/// The listening sockets per worker: each TCP socket to one worker in turn, the Unix socket to
/// the first.
pub fn per_worker(
    tcp: Vec<std::net::TcpListener>,
    unix: Option<std::os::unix::net::UnixListener>,
    workers: usize,
) -> Vec<Vec<crate::actors::listener::BoundListener>> {
    use crate::actors::listener::BoundListener;
    let mut per_worker: Vec<Vec<BoundListener>> = (0..workers.max(1)).map(|_| Vec::new()).collect();
    let count = per_worker.len();
    for (i, tcp) in tcp.into_iter().enumerate() {
        per_worker[i % count].push(BoundListener::Tcp(tcp));
    }
    if let Some(unix) = unix {
        per_worker[0].push(BoundListener::Unix(unix));
    }
    per_worker
}

/// Where the takeover socket of a configuration lives; None without `unix_socket_dir`, which
/// an online restart needs (as PgBouncer's `-R` does).
pub fn socket_path(general: &General) -> Option<PathBuf> {
    let dir = general.unix_socket_dir.as_ref()?;
    Some(dir.join(format!(".s.PGSQL.{}.takeover", general.listen_port)))
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverFailed {
    #[error("-R needs unix_socket_dir: the running process is found through its takeover socket there")]
    NoSocketDir,
    #[error("cannot reach the running process at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("the running process refused the takeover: {0}")]
    Refused(String),
    #[error("takeover: {0}")]
    Io(#[from] io::Error),
    #[error("takeover: the running process answered {0}")]
    Unexpected(String),
}

// ---- the running (old) process ----

/// Binds the takeover socket, readable by this OS user only.
pub fn bind(general: &General) -> io::Result<Option<UnixListener>> {
    bind_with(general, false)
}

/// Binds the takeover socket again after a takeover failed. Whatever the path holds is the
/// failed process's socket: that process may still be exiting (the kernel closes its files in
/// no set order, so its takeover listener can outlive the channel whose end told us it died),
/// and a connect would still succeed.
pub fn bind_after_failed_takeover(general: &General) -> io::Result<Option<UnixListener>> {
    bind_with(general, true)
}

fn bind_with(general: &General, replace: bool) -> io::Result<Option<UnixListener>> {
    let Some(path) = socket_path(general) else { return Ok(None) };
    if path.exists() {
        if !replace && UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another process takes over here", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Some(listener))
}

/// Asked of the Supervisor when a new process takes over: stop accepting and give the
/// listening sockets; from then on, clients move as they become idle. The reply goes back on
/// a plain channel, to the takeover thread.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BeginHandover {
    pub reply: mpsc::Sender<Result<Vec<(ListenerKind, OwnedFd)>, String>>,
}

/// Serves the takeover socket on a thread of its own, one takeover at a time.
pub fn serve(
    listener: UnixListener,
    path: PathBuf,
    shared: Arc<Shared>,
    supervisor: Addr<crate::actors::supervisor::Supervisor>,
) {
    let system = System::current();
    std::thread::Builder::new()
        .name("takeover".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if !same_user(&stream) {
                    log::warn!("takeover: refused a connection from another OS user");
                    continue;
                }
                match hand_over(stream, &path, &shared, &supervisor, &system) {
                    // The socket path is gone and the listeners with it: no second takeover.
                    Ok(()) => return,
                    Err(e) => log::warn!("takeover: {e}"),
                }
            }
        })
        .expect("spawn the takeover thread");
}

fn same_user(stream: &UnixStream) -> bool {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    // SAFETY: geteuid cannot fail.
    rc == 0 && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}

fn hand_over(
    stream: UnixStream,
    path: &std::path::Path,
    shared: &Arc<Shared>,
    supervisor: &Addr<crate::actors::supervisor::Supervisor>,
    system: &System,
) -> io::Result<()> {
    let mut channel = FdChannel::new(stream);
    match channel.receive()? {
        Some((Message::Takeover { version }, _)) if version == VERSION => {}
        Some((Message::Takeover { version }, _)) => {
            let reason = format!("takeover format {version}, this process speaks {VERSION}");
            channel.send(&Message::Refused(reason.clone()), &[])?;
            return Err(io::Error::other(reason));
        }
        other => return Err(io::Error::other(format!("expected a takeover request, got {other:?}"))),
    }
    let (reply, answer) = mpsc::channel();
    supervisor.do_send(BeginHandover { reply });
    let listeners = match answer.recv() {
        Ok(Ok(listeners)) => listeners,
        Ok(Err(reason)) => {
            channel.send(&Message::Refused(reason.clone()), &[])?;
            return Err(io::Error::other(reason));
        }
        Err(_) => return Err(io::Error::other("the daemon is stopping")),
    };
    // Gone before the new process hears of the listeners, so that it can bind its own.
    let _ = std::fs::remove_file(path);
    let kinds: Vec<ListenerKind> = listeners.iter().map(|(kind, _)| *kind).collect();
    let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let (to_writer, outgoing) = mpsc::channel();
    *OUTBOX.lock() = Some(to_writer);
    if let Err(e) = channel.send(&Message::Listeners(kinds), &fds) {
        OUTBOX.lock().take();
        return Err(e);
    }
    *KEPT.lock() = Some(listeners);
    log::info!("takeover: the new process has the listening sockets; moving clients as they become idle");
    HANDING_OVER.store(true, Ordering::Relaxed);
    wake_clients(shared);
    let reader = channel.try_clone()?;
    let (cancels, watcher) = (shared.clone(), supervisor.clone());
    std::thread::Builder::new()
        .name("takeover-cancels".into())
        .spawn(move || read_cancels(reader, cancels, watcher))?;
    write_clients(channel, outgoing, system, supervisor);
    Ok(())
}

/// Idle relays wait for their client's next message: a nudge makes each look.
fn wake_clients(shared: &Shared) {
    for client in shared.census.clients() {
        client.session.do_send(WakeForHandover);
    }
}

/// Sent to every client session when a takeover begins.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WakeForHandover;

fn write_clients(
    mut channel: FdChannel,
    outgoing: mpsc::Receiver<Outgoing>,
    system: &System,
    supervisor: &Addr<crate::actors::supervisor::Supervisor>,
) {
    let mut moved = 0usize;
    for item in outgoing {
        match item {
            Outgoing::Client(client, fd) => match channel.send(&Message::Client(client), &[fd.as_raw_fd()]) {
                Ok(()) => moved += 1,
                Err(e) => {
                    // The clients that had moved went with the new process; the others stay.
                    let why =
                        format!("the new process stopped answering ({e}) after {moved} clients had moved");
                    return take_back(supervisor, &why);
                }
            },
            Outgoing::Done => {
                // Taken first: once the new process has Done it may hang up at once, and the
                // cancel reader must not mistake that for a death.
                let kept = KEPT.lock().take();
                if let Err(e) = channel.send(&Message::Done, &[]) {
                    *KEPT.lock() = kept;
                    return take_back(supervisor, &format!("the new process stopped answering ({e})"));
                }
                drop(kept);
                log::info!("takeover complete: {moved} clients moved to the new process; exiting");
                system.stop();
                return;
            }
        }
    }
}

/// Reads the new process's cancels; its end of the channel closing before it heard Done means
/// it died.
fn read_cancels(
    mut channel: FdChannel,
    shared: Arc<Shared>,
    supervisor: Addr<crate::actors::supervisor::Supervisor>,
) {
    while let Ok(Some((message, _))) = channel.receive() {
        if let Message::Cancel { process_id, secret_key } = message {
            shared.cancel_here(process_id, &secret_key);
        }
    }
    take_back(&supervisor, "the new process went away");
}

/// A relay that reached idle during a takeover hands its client here. Err gives the socket
/// back when no new process listens any more.
pub fn send_moved(client: MovedClient, socket: DetachedSocket) -> Result<(), String> {
    let fd: OwnedFd = match socket {
        DetachedSocket::Tcp(s) => s.into(),
        DetachedSocket::Unix(s) => s.into(),
        DetachedSocket::ServerTls { .. } => return Err("a TLS socket cannot move".into()),
    };
    match OUTBOX.lock().as_ref() {
        Some(outbox) => {
            outbox.send(Outgoing::Client(Box::new(client), fd)).map_err(|_| "the takeover ended".into())
        }
        None => Err("no takeover under way".into()),
    }
}

/// No client is left to move: tells the new process, whose writer then stops this one.
/// Returns false when there is no new process to tell.
pub fn finish() -> bool {
    match OUTBOX.lock().take() {
        Some(outbox) => outbox.send(Outgoing::Done).is_ok(),
        None => false,
    }
}

// ---- the new process ----

/// What the running process handed over: its listening sockets, and the channel on which its
/// clients will come.
pub struct Inherited {
    pub tcp: Vec<std::net::TcpListener>,
    pub unix: Option<std::os::unix::net::UnixListener>,
    pub metrics: Option<std::net::TcpListener>,
    channel: FdChannel,
}

/// `-R`: asks the running process to hand over, and takes its listening sockets.
pub fn take_over(general: &General) -> Result<Inherited, TakeoverFailed> {
    let path = socket_path(general).ok_or(TakeoverFailed::NoSocketDir)?;
    let stream = UnixStream::connect(&path)
        .map_err(|source| TakeoverFailed::Connect { path: path.display().to_string(), source })?;
    // Whoever listens there gets this process's trust (it hands over clients): it must be
    // pgcorral running as this OS user, not a socket someone else left in a shared directory.
    if !same_user(&stream) {
        return Err(TakeoverFailed::Refused(format!("{} belongs to another OS user", path.display())));
    }
    let mut channel = FdChannel::new(stream);
    channel.send(&Message::Takeover { version: VERSION }, &[])?;
    let (kinds, fds) = match channel.receive()? {
        Some((Message::Listeners(kinds), fds)) => (kinds, fds),
        Some((Message::Refused(reason), _)) => return Err(TakeoverFailed::Refused(reason)),
        other => return Err(TakeoverFailed::Unexpected(format!("{other:?}"))),
    };
    let mut inherited = Inherited { tcp: Vec::new(), unix: None, metrics: None, channel };
    for (kind, fd) in kinds.into_iter().zip(fds) {
        match kind {
            ListenerKind::Tcp => inherited.tcp.push(std::net::TcpListener::from(fd)),
            ListenerKind::Unix => inherited.unix = Some(std::os::unix::net::UnixListener::from(fd)),
            ListenerKind::Metrics => inherited.metrics = Some(std::net::TcpListener::from(fd)),
        }
    }
    for l in &inherited.tcp {
        l.set_nonblocking(true)?;
    }
    if let Some(l) = &inherited.unix {
        l.set_nonblocking(true)?;
    }
    if let Some(l) = &inherited.metrics {
        l.set_nonblocking(true)?;
    }
    Ok(inherited)
}

impl Inherited {
    /// The listeners per worker: each inherited TCP socket to one worker in turn, the Unix
    /// socket to the first.
    pub fn listeners(&mut self, workers: usize) -> Vec<Vec<crate::actors::listener::BoundListener>> {
        per_worker(std::mem::take(&mut self.tcp), self.unix.take(), workers)
    }

    /// Receives the moved clients on a thread of its own and starts a session for each on the
    /// workers in turn; cancels for clients still in the old process go back over the channel.
    pub fn receive_clients(self, shared: Arc<Shared>, workers: Vec<ArbiterHandle>) {
        let Inherited { channel, .. } = self;
        match channel.try_clone() {
            Ok(writer) => *PREDECESSOR.lock() = Some(writer),
            Err(e) => log::warn!("takeover: cancels for clients still in the old process will be lost: {e}"),
        }
        let mut channel = channel;
        std::thread::Builder::new()
            .name("takeover".into())
            .spawn(move || {
                let next = AtomicUsize::new(0);
                let mut moved = 0usize;
                loop {
                    match channel.receive() {
                        Ok(Some((Message::Client(client), mut fds))) => {
                            let Some(fd) = fds.pop() else { continue };
                            moved += 1;
                            let worker = &workers[next.fetch_add(1, Ordering::Relaxed) % workers.len()];
                            let shared = shared.clone();
                            worker.spawn_fn(move || adopt(shared, client, fd));
                        }
                        Ok(Some((Message::Done, _))) | Ok(None) => {
                            log::info!("takeover complete: {moved} clients moved in; the old process exits");
                            break;
                        }
                        Ok(Some((other, _))) => log::warn!("takeover: unexpected {other:?}"),
                        Err(e) => {
                            log::error!("takeover: the old process's channel failed: {e}");
                            break;
                        }
                    }
                }
                PREDECESSOR.lock().take();
            })
            .expect("spawn the takeover thread");
    }
}

/// Starts a session for a moved client on the current worker.
fn adopt(shared: Arc<Shared>, client: Box<MovedClient>, fd: OwnedFd) {
    // The descriptor is a TCP or a Unix socket; which one decides how tokio registers it.
    let socket = if socket_is_tcp(&fd) {
        let tcp = std::net::TcpStream::from(fd);
        tcp.set_nonblocking(true).map(|()| DetachedSocket::Tcp(tcp))
    } else {
        let unix = std::os::unix::net::UnixStream::from(fd);
        unix.set_nonblocking(true).map(|()| DetachedSocket::Unix(unix))
    };
    match socket.and_then(DetachedSocket::attach) {
        Ok(socket) => {
            ClientSession::moved_in(shared, socket, client).start();
        }
        Err(e) => log::warn!("takeover: cannot serve a moved client: {e}"),
    }
}

fn socket_is_tcp(socket: &impl AsRawFd) -> bool {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_DOMAIN fills an int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut domain as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && (domain == libc::AF_INET || domain == libc::AF_INET6)
}

/// Sends the old process a cancel request for a key this one does not know; false when there
/// is no old process any more.
pub fn forward_cancel_to_predecessor(process_id: i32, secret_key: &[u8]) -> bool {
    let mut predecessor = PREDECESSOR.lock();
    let Some(channel) = predecessor.as_mut() else { return false };
    let message = Message::Cancel { process_id, secret_key: secret_key.to_vec() };
    if channel.send(&message, &[]).is_err() {
        predecessor.take();
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn general_in(dir: &std::path::Path) -> General {
        General { unix_socket_dir: Some(dir.to_path_buf()), listen_port: 7, ..General::default() }
    }

    /// A failed new process may still be exiting with its takeover listener open: the old
    /// process must win the path back all the same, or no later `-R` can reach it.
    #[test]
    fn after_a_failed_takeover_a_still_listening_socket_is_replaced() {
        let dir = std::env::temp_dir().join(format!("pgcorral-takeover-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let general = general_in(&dir);
        let dying = bind(&general).unwrap().expect("a socket directory is set");
        let refused = bind(&general).expect_err("a live takeover socket is not taken");
        assert_eq!(refused.kind(), io::ErrorKind::AddrInUse);
        let ours = bind_after_failed_takeover(&general).unwrap().expect("bound");
        drop(dying);
        let path = socket_path(&general).unwrap();
        let _client = UnixStream::connect(&path).expect("the path leads to the new listener");
        assert!(ours.accept().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
