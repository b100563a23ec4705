//! Cancel requests for the query a client is running: where to send one (the server the client
//! holds at that moment, with that server's real key), and sending it over a new connection.

use super::*;
use crate::net::TcpSettings;
use crate::protocol::cancel_key::{write_cancel_request, SecretKey};

/// Where to send a cancel for the query this client is running now, if any.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: ServerAddr,
    pub process_id: i32,
    pub secret_key: SecretKey,
    /// The pool's socket options (tcp_keepalive, tcp_user_timeout, ...), as for its servers.
    pub tcp: TcpSettings,
}

/// Shared between the ClientSession actor (which handles CancelQuery) and its relay loop, on
/// the same thread.
#[derive(Debug, Default)]
pub struct CancelState {
    /// The leased server's, shared with its link: a pointer, so an idle client pays 8 bytes.
    pub target: RefCell<Option<Arc<CancelTarget>>>,
    /// Cancels sent and not yet delivered: the server is not released meanwhile, so that a late
    /// cancel can never hit the next client's query.
    pub in_flight: Cell<u32>,
}

/// Sends PostgreSQL a CancelRequest with the server's real key, over a new connection, and
/// waits until the postmaster closes it (by then the backend has been signalled).
pub async fn send_cancel(target: &CancelTarget) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = target.addr.connect_with(&target.tcp).await?;
    let mut request = BytesMut::new();
    write_cancel_request(&mut request, target.process_id, &target.secret_key);
    socket.write_all(&request).await?;
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut sink)).await;
    Ok(())
}

impl Relay {
    /// Stops the query this client is running, if any: closing the sockets alone would leave
    /// it running on the server.
    pub(super) fn cancel_running_query(&self) {
        if let Some(target) = self.cancel.target.borrow().clone() {
            actix::spawn(async move {
                let _ = send_cancel(&target).await;
            });
        }
    }
}
