//! Listener: accepts client connections on one listening socket and starts a ClientSession for
//! each on its own arbiter.
//!
//! Each worker has its own TCP listener on every `listen_addr` (SO_REUSEPORT lets the kernel
//! spread connections across workers), so accepting takes no cross-thread hop and a client's
//! whole life stays on one worker. The Unix socket (`unix_socket_dir/.s.PGSQL.<port>`) has a
//! single listener on the first worker. Takes [`StopAccepting`] (graceful shutdown): the
//! listening socket closes, connections already accepted go on. An accepted TCP socket gets
//! the keepalive and user timeout of the configuration live at that moment, so a reload
//! applies to the connections that come after it.

use std::sync::Arc;

use actix::fut::wrap_future;
use actix::prelude::*;

use crate::actors::client::ClientSession;
use crate::actors::registry::Shared;
use crate::net::Socket;

/// A bound socket, created before the actor system starts so that bind errors stop start-up.
pub enum BoundListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

pub struct Listener {
    shared: Arc<Shared>,
    bound: Option<BoundListener>,
}

impl Listener {
    pub fn new(shared: Arc<Shared>, bound: BoundListener) -> Listener {
        Listener { shared, bound: Some(bound) }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(bound) = self.bound.take() else { return };
        let shared = self.shared.clone();
        let accept_loop = async move {
            match bound {
                BoundListener::Tcp(std) => {
                    let listener = match tokio::net::TcpListener::from_std(std) {
                        Ok(l) => l,
                        Err(e) => return log::error!("cannot use TCP listener: {e}"),
                    };
                    let mut failures = 0;
                    loop {
                        match listener.accept().await {
                            Ok((stream, peer)) => {
                                failures = 0;
                                let _ = stream.set_nodelay(true);
                                // As PgBouncer: a socket that cannot be set up is not served.
                                if let Err(e) = shared.config().general.tcp.apply(&stream) {
                                    log::warn!("closing the connection from {peer}: {e}");
                                    continue;
                                }
                                ClientSession::new(shared.clone(), Socket::Tcp(stream)).start();
                            }
                            Err(e) => accept_failed(e, &mut failures).await,
                        }
                    }
                }
                BoundListener::Unix(std) => {
                    let listener = match tokio::net::UnixListener::from_std(std) {
                        Ok(l) => l,
                        Err(e) => return log::error!("cannot use Unix listener: {e}"),
                    };
                    let mut failures = 0;
                    loop {
                        match listener.accept().await {
                            Ok((stream, _)) => {
                                failures = 0;
                                ClientSession::new(shared.clone(), Socket::Unix(stream)).start();
                            }
                            Err(e) => accept_failed(e, &mut failures).await,
                        }
                    }
                }
            }
        };
        ctx.spawn(wrap_future(accept_loop));
    }
}

/// Out of file descriptors, typically: connections wait in the listen backlog while accepting
/// backs off, from 50 ms doubling to 1.6 s, until descriptors are freed. Logged once per run of
/// failures, not once per retry.
async fn accept_failed(e: std::io::Error, failures: &mut u32) {
    if *failures == 0 {
        let hint = match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => {
                " (out of file descriptors: see the open-file limit logged at start)"
            }
            _ => "",
        };
        log::warn!("accept failed: {e}{hint}; backing off until it succeeds");
    }
    let backoff = std::time::Duration::from_millis(50) * 2u32.pow((*failures).min(5));
    *failures = failures.saturating_add(1);
    tokio::time::sleep(backoff).await;
}

/// Close the listening socket; a graceful shutdown has begun.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

impl Handler<StopAccepting> for Listener {
    type Result = ();

    fn handle(&mut self, _: StopAccepting, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
