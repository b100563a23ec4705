//! Sockets: one type for a TCP or Unix-domain connection, plain or TLS, on either side of the
//! pooler.
//!
//! Clients arrive over TCP or the `.s.PGSQL.<port>` socket; servers are reached over TCP or a
//! Unix socket directory (a `host` starting with `/`). Either side may be wrapped in TLS once
//! negotiated (see `crate::tls`). The relay and the login code are written once against
//! [`Socket`]. Every TCP socket, accepted or connected, gets the keepalive and user timeout of
//! [`TcpSettings`] first, as PgBouncer's `tune_socket` does.

use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub mod dns;
pub mod fd_passing;
mod framed;
pub use framed::{Framed, ReadError, Stream, GOODBYE_DEADLINE};

pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client that negotiated TLS with pgcorral (OpenSSL; see `tls::acceptor`).
    ClientTls(Box<tokio_openssl::SslStream<Socket>>),
    /// A server connection pgcorral encrypted (native-tls; see `tls::connector`).
    ServerTls(Box<tokio_native_tls::TlsStream<Socket>>),
    /// Stands in for the plain socket under a TLS stream while that socket moves to another
    /// worker's reactor; never read or written.
    Moving,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Socket::Tcp(_) => "tcp",
            Socket::Unix(_) => "unix",
            Socket::ClientTls(_) => "client-tls",
            Socket::ServerTls(_) => "server-tls",
            Socket::Moving => "moving",
        };
        write!(f, "Socket({kind}, {})", self.peer())
    }
}

/// `tcp_keepalive`, `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt` and `tcp_user_timeout`:
/// how a dead peer that sends no FIN or RST (a host that crashed, a cable pulled, a NAT or
/// firewall that forgot the connection) is noticed. `None` keeps the operating system's value
/// (PgBouncer's 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSettings {
    /// SO_KEEPALIVE. Off, the three timings below are not set either.
    pub keepalive: bool,
    /// TCP_KEEPIDLE: idle time before the first probe (whole seconds).
    pub keepidle: Option<Duration>,
    /// TCP_KEEPINTVL: time between unanswered probes (whole seconds).
    pub keepintvl: Option<Duration>,
    /// TCP_KEEPCNT: unanswered probes before the connection is dropped.
    pub keepcnt: Option<u32>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the connection is
    /// dropped (milliseconds).
    pub user_timeout: Option<Duration>,
}

impl Default for TcpSettings {
    /// PgBouncer's defaults: keepalive on, with the system's timings.
    fn default() -> Self {
        TcpSettings { keepalive: true, keepidle: None, keepintvl: None, keepcnt: None, user_timeout: None }
    }
}

/// A socket option the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("cannot set {option} on a TCP socket: {source}")]
pub struct TcpOptionError {
    pub option: &'static str,
    #[source]
    pub source: io::Error,
}

impl From<TcpOptionError> for io::Error {
    fn from(e: TcpOptionError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

impl TcpSettings {
    /// Sets these options on a TCP socket.
    pub fn apply(&self, socket: &impl AsFd) -> Result<(), TcpOptionError> {
        let sock = socket2::SockRef::from(socket);
        let failed = |option| move |source| TcpOptionError { option, source };
        if self.keepalive {
            let mut keepalive = socket2::TcpKeepalive::new();
            if let Some(idle) = self.keepidle {
                keepalive = keepalive.with_time(idle);
            }
            if let Some(interval) = self.keepintvl {
                keepalive = keepalive.with_interval(interval);
            }
            if let Some(count) = self.keepcnt {
                keepalive = keepalive.with_retries(count);
            }
            sock.set_tcp_keepalive(&keepalive).map_err(failed("TCP keepalive"))?;
        } else {
            sock.set_keepalive(false).map_err(failed("SO_KEEPALIVE"))?;
        }
        if let Some(timeout) = self.user_timeout {
            sock.set_tcp_user_timeout(Some(timeout)).map_err(failed("TCP_USER_TIMEOUT"))?;
        }
        Ok(())
    }
}

fn moving() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket is moving between workers")
}

/// Where a server lives; kept so that a CancelRequest can be sent to the same place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl ServerAddr {
    /// `host` as in `[databases]`: a name or address, a directory for a Unix socket, or unset
    /// (PostgreSQL's default socket directory).
    pub fn from_host(host: Option<&str>, port: u16) -> ServerAddr {
        match host {
            Some(h) if !h.starts_with('/') => ServerAddr::Tcp { host: h.to_string(), port },
            Some(dir) => ServerAddr::Unix { path: PathBuf::from(dir).join(format!(".s.PGSQL.{port}")) },
            None => ServerAddr::Unix {
                path: PathBuf::from("/var/run/postgresql").join(format!(".s.PGSQL.{port}")),
            },
        }
    }

    /// The TCP port, or the one in a Unix socket's `.s.PGSQL.<port>` name.
    pub fn port(&self) -> u16 {
        match self {
            ServerAddr::Tcp { port, .. } => *port,
            ServerAddr::Unix { path } => {
                path.extension().and_then(|e| e.to_str()).and_then(|e| e.parse().ok()).unwrap_or(0)
            }
        }
    }

    /// Connects; a TCP socket gets `tcp`'s options.
    pub async fn connect_with(&self, tcp: &TcpSettings) -> io::Result<Socket> {
        match self {
            ServerAddr::Tcp { host, port } => {
                let ip = dns::resolve(host).await?;
                let stream = TcpStream::connect((ip, *port)).await?;
                stream.set_nodelay(true)?;
                tcp.apply(&stream)?;
                Ok(Socket::Tcp(stream))
            }
            ServerAddr::Unix { path } => Ok(Socket::Unix(UnixStream::connect(path).await?)),
        }
    }

    /// Connects with PgBouncer's default TCP options rather than configured ones.
    pub async fn connect(&self) -> io::Result<Socket> {
        self.connect_with(&TcpSettings::default()).await
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            ServerAddr::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

/// One end of a connection, for display.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub addr: String,
    pub port: u16,
}

/// A socket taken out of one thread's reactor to be moved to another worker.
pub enum DetachedSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
    /// A TLS server connection: the TLS state travels as it is, its plain socket detached.
    ServerTls {
        stream: Box<tokio_native_tls::TlsStream<Socket>>,
        plain: Box<DetachedSocket>,
    },
}

impl std::fmt::Debug for DetachedSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DetachedSocket")
    }
}

impl DetachedSocket {
    /// Registers the socket with the reactor of the thread this is called on.
    pub fn attach(self) -> io::Result<Socket> {
        match self {
            DetachedSocket::Tcp(s) => Ok(Socket::Tcp(TcpStream::from_std(s)?)),
            DetachedSocket::Unix(s) => Ok(Socket::Unix(UnixStream::from_std(s)?)),
            DetachedSocket::ServerTls { mut stream, plain } => {
                *stream.get_mut().get_mut().get_mut() = plain.attach()?;
                Ok(Socket::ServerTls(stream))
            }
        }
    }
}

impl Socket {
    /// Takes the socket out of this thread's reactor (it stays non-blocking). Client TLS
    /// sessions never move: clients stay on the worker that accepted them.
    pub fn detach(self) -> io::Result<DetachedSocket> {
        match self {
            Socket::Tcp(s) => Ok(DetachedSocket::Tcp(s.into_std()?)),
            Socket::Unix(s) => Ok(DetachedSocket::Unix(s.into_std()?)),
            Socket::ServerTls(mut stream) => {
                let plain = std::mem::replace(stream.get_mut().get_mut().get_mut(), Socket::Moving);
                Ok(DetachedSocket::ServerTls { stream, plain: Box::new(plain.detach()?) })
            }
            Socket::ClientTls(_) | Socket::Moving => {
                Err(io::Error::new(io::ErrorKind::Unsupported, "this socket cannot move between workers"))
            }
        }
    }

    /// The TCP or Unix socket under any TLS layer.
    fn plain(&self) -> &Socket {
        match self {
            Socket::ClientTls(s) => s.get_ref().plain(),
            Socket::ServerTls(s) => s.get_ref().get_ref().get_ref().plain(),
            other => other,
        }
    }

    /// The first byte a TCP client sent, without taking it: PostgreSQL 17's direct TLS starts
    /// with a TLS handshake record instead of a startup packet.
    pub async fn peek_first_byte(&self) -> io::Result<Option<u8>> {
        let Socket::Tcp(s) = self else { return Ok(None) };
        let mut byte = [0u8; 1];
        Ok((s.peek(&mut byte).await? == 1).then_some(byte[0]))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Socket::ClientTls(_) | Socket::ServerTls(_))
    }

    /// What `SHOW CLIENTS`/`SHOW SERVERS` put in their `tls` column: protocol and cipher where
    /// the TLS library says (native-tls, used towards servers, does not), empty for plaintext.
    pub fn tls_description(&self) -> String {
        match self {
            Socket::ClientTls(s) => {
                let ssl = s.ssl();
                format!("{}/{}", ssl.version_str(), ssl.current_cipher().map_or("?", |c| c.name()))
            }
            Socket::ServerTls(_) => "TLS".into(),
            _ => String::new(),
        }
    }

    /// Reads without waiting, from tokio's cached readiness: no system call unless the
    /// reactor saw the socket become readable. Used to notice that an idle server closed or
    /// spoke out of turn. Under TLS the plain socket is peeked at: any byte there (an alert, a
    /// message) or its end is news an idle connection should not have.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_read(buf),
            Socket::Unix(s) => s.try_read(buf),
            Socket::Moving => Err(moving()),
            tls => tls.peek_now(),
        }
    }

    /// Peeks with a system call, whatever tokio's readiness says: a socket that just moved to
    /// another worker's reactor reads as "not ready" there until that reactor has polled it,
    /// and a server that closed meanwhile would look silent.
    pub fn peek_now(&self) -> io::Result<usize> {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match self.plain() {
            Socket::Tcp(s) => socket2::SockRef::from(s).peek(&mut probe),
            Socket::Unix(s) => socket2::SockRef::from(s).peek(&mut probe),
            _ => Err(moving()),
        }
    }

    /// Waits for readability without a buffer, so idle connections need none. Under TLS the
    /// plain socket's readiness is enough: its readiness is only cleared by a read that found
    /// nothing, which OpenSSL attempts only once it has handed over all it decrypted.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.plain() {
            Socket::Tcp(s) => s.poll_read_ready(cx),
            Socket::Unix(s) => s.poll_read_ready(cx),
            _ => Poll::Ready(Err(moving())),
        }
    }

    /// The (remote, local) ends of the connection, as the console shows them: a Unix socket
    /// is `unix` with the port it was reached on.
    pub fn endpoints(&self, unix_port: u16) -> (Endpoint, Endpoint) {
        let tcp = |addr: io::Result<std::net::SocketAddr>| match addr {
            Ok(a) => Endpoint { addr: a.ip().to_string(), port: a.port() },
            Err(_) => Endpoint { addr: "?".into(), port: 0 },
        };
        match self.plain() {
            Socket::Tcp(s) => (tcp(s.peer_addr()), tcp(s.local_addr())),
            _ => {
                let unix = Endpoint { addr: "unix".into(), port: unix_port };
                (unix.clone(), unix)
            }
        }
    }

    /// The peer's user id and process id over a Unix socket.
    pub fn peer_credentials(&self) -> Option<(u32, i32)> {
        match self.plain() {
            Socket::Unix(s) => s.peer_cred().ok().map(|c| (c.uid(), c.pid().unwrap_or(0))),
            _ => None,
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self.plain(), Socket::Unix(_))
    }

    /// The peer's IP address over TCP (hba address matching).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self.plain() {
            Socket::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            _ => None,
        }
    }

    /// A short description of the peer for logs.
    pub fn peer(&self) -> String {
        match self.plain() {
            Socket::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into()),
            Socket::Unix(_) => "unix".into(),
            _ => "?".into(),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Socket::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Socket::Moving => Poll::Ready(Err(moving())),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Socket::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Socket::Moving => Poll::Ready(Err(moving())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::Moving => Poll::Ready(Err(moving())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::Moving => Poll::Ready(Err(moving())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected loopback socket, as the kernel makes it.
    fn fresh_socket() -> (std::net::TcpStream, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (stream, listener)
    }

    #[test]
    fn configured_options_are_set() {
        let (stream, _listener) = fresh_socket();
        let tcp = TcpSettings {
            keepalive: true,
            keepidle: Some(Duration::from_secs(7)),
            keepintvl: Some(Duration::from_secs(3)),
            keepcnt: Some(4),
            user_timeout: Some(Duration::from_millis(9000)),
        };
        tcp.apply(&stream).unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(sock.keepalive_retries().unwrap(), 4);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_millis(9000)));
    }

    #[test]
    fn defaults_turn_keepalive_on_and_keep_the_system_timings() {
        let (stream, _listener) = fresh_socket();
        let untouched = socket2::SockRef::from(&stream);
        let system = (
            untouched.keepalive_time().unwrap(),
            untouched.keepalive_interval().unwrap(),
            untouched.keepalive_retries().unwrap(),
        );
        assert!(!untouched.keepalive().unwrap(), "the kernel leaves keepalive off");
        TcpSettings::default().apply(&stream).unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            (
                sock.keepalive_time().unwrap(),
                sock.keepalive_interval().unwrap(),
                sock.keepalive_retries().unwrap()
            ),
            system
        );
        assert_eq!(sock.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn keepalive_off_still_sets_the_user_timeout() {
        let (stream, _listener) = fresh_socket();
        let system_idle = socket2::SockRef::from(&stream).keepalive_time().unwrap();
        TcpSettings::default().apply(&stream).unwrap();
        let off = TcpSettings {
            keepalive: false,
            keepidle: Some(system_idle + Duration::from_secs(1)),
            user_timeout: Some(Duration::from_millis(1500)),
            ..TcpSettings::default()
        };
        off.apply(&stream).unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(!sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), system_idle, "timings are left alone when off");
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn a_refused_option_names_itself() {
        let (stream, _listener) = fresh_socket();
        let bad = TcpSettings { keepcnt: Some(100_000), ..TcpSettings::default() };
        let err = bad.apply(&stream).unwrap_err();
        assert_eq!(err.option, "TCP keepalive");
        assert!(io::Error::from(err).to_string().starts_with("cannot set TCP keepalive on a TCP socket: "));
    }
}
