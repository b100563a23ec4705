//! Sockets: one type for a TCP or Unix-domain connection, on either side of the pooler.
//!
//! Clients arrive over TCP or the `.s.PGSQL.<port>` socket; servers are reached over TCP or a
//! Unix socket directory (a `host` starting with `/`). The relay and the login code are written
//! once against [`Socket`].

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
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

    pub async fn connect(&self) -> io::Result<Socket> {
        match self {
            ServerAddr::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Ok(Socket::Tcp(stream))
            }
            ServerAddr::Unix { path } => Ok(Socket::Unix(UnixStream::connect(path).await?)),
        }
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
#[derive(Debug)]
pub enum DetachedSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl DetachedSocket {
    /// Registers the socket with the reactor of the thread this is called on.
    pub fn attach(self) -> io::Result<Socket> {
        match self {
            DetachedSocket::Tcp(s) => Ok(Socket::Tcp(TcpStream::from_std(s)?)),
            DetachedSocket::Unix(s) => Ok(Socket::Unix(UnixStream::from_std(s)?)),
        }
    }
}

impl Socket {
    /// Takes the socket out of this thread's reactor (it stays non-blocking).
    pub fn detach(self) -> io::Result<DetachedSocket> {
        match self {
            Socket::Tcp(s) => Ok(DetachedSocket::Tcp(s.into_std()?)),
            Socket::Unix(s) => Ok(DetachedSocket::Unix(s.into_std()?)),
        }
    }

    /// Reads without waiting; used to notice that an idle server closed or spoke out of turn.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_read(buf),
            Socket::Unix(s) => s.try_read(buf),
        }
    }

    /// Waits for readability without a buffer, so idle connections need none.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Tcp(s) => s.poll_read_ready(cx),
            Socket::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// The (remote, local) ends of the connection, as the console shows them: a Unix socket
    /// is `unix` with the port it was reached on.
    pub fn endpoints(&self, unix_port: u16) -> (Endpoint, Endpoint) {
        let tcp = |addr: io::Result<std::net::SocketAddr>| match addr {
            Ok(a) => Endpoint { addr: a.ip().to_string(), port: a.port() },
            Err(_) => Endpoint { addr: "?".into(), port: 0 },
        };
        match self {
            Socket::Tcp(s) => (tcp(s.peer_addr()), tcp(s.local_addr())),
            Socket::Unix(_) => {
                let unix = Endpoint { addr: "unix".into(), port: unix_port };
                (unix.clone(), unix)
            }
        }
    }

    /// The peer's user id and process id over a Unix socket.
    pub fn peer_credentials(&self) -> Option<(u32, i32)> {
        match self {
            Socket::Unix(s) => s.peer_cred().ok().map(|c| (c.uid(), c.pid().unwrap_or(0))),
            Socket::Tcp(_) => None,
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Socket::Unix(_))
    }

    /// A short description of the peer for logs.
    pub fn peer(&self) -> String {
        match self {
            Socket::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into()),
            Socket::Unix(_) => "unix".into(),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
