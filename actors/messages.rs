//! The messages actors exchange, in one place so the protocol between actors reads as a whole.
//!
//! Control flows through these; query bytes never do (a leased server's socket travels inside
//! [`ServerLink`](crate::actors::server::ServerLink) to the client's relay loop instead).

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::actors::router::Router;
use crate::actors::server::{AfterLease, DetachedLink, ServerConnection, ServerLink};
use crate::protocol::PgError;

/// What a client waiting for a server eventually gets.
pub type CheckoutReply = oneshot::Sender<Result<ServerOffer, PgError>>;

/// A server the Router assigned to a client. A client that vanished before claiming it drops
/// the offer, and the server goes straight back to the Router instead of being lost.
pub struct ServerOffer {
    server: Option<Addr<ServerConnection>>,
    router: Addr<Router>,
}

impl ServerOffer {
    pub fn new(server: Addr<ServerConnection>, router: Addr<Router>) -> ServerOffer {
        ServerOffer { server: Some(server), router }
    }

    pub fn claim(mut self) -> Addr<ServerConnection> {
        self.server.take().expect("an offer is claimed once")
    }
}

impl Drop for ServerOffer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.router.do_send(ServerIdle { server, fresh: false });
        }
    }
}

// ----- to the Router -------------------------------------------------------------------------

/// A client needs a server. Answered through `reply`, at once or when one frees up (FIFO).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Checkout {
    pub reply: CheckoutReply,
}

/// A server finished logging in (`fresh`) or came back from a lease, and is free.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServerIdle {
    pub server: Addr<ServerConnection>,
    pub fresh: bool,
}

/// A server actor stopped (closed, died, or failed to log in); its permit is already released.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServerGone {
    pub server: Addr<ServerConnection>,
    /// Why it failed to log in, when it never became usable: waiting clients get this error.
    pub login_error: Option<PgError>,
}

/// Another worker's router (`to`) is starved at the pool limit: if this one has no waiters,
/// move one idle server there, so that servers follow the clients without reconnecting.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Donate {
    pub to: Addr<Router>,
}

/// An idle server moved here from another worker: start its actor on this arbiter.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Adopt(pub DetachedLink);

/// A permit was released somewhere in the pool: try again to open a server for waiters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PermitFreed;

/// The pool is below `min_pool_size`: open one server and keep it idle.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Grow;

// ----- to a ServerConnection -------------------------------------------------------------------

/// Hand the server's socket to the client that the router assigned it to. `None` when the
/// server turned out to be dead; the client then asks the router again.
#[derive(Message)]
#[rtype(result = "Option<ServerLink>")]
pub struct Lend;

/// The lease is over: the socket comes back with what must happen before the next lease.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Return {
    pub link: ServerLink,
    pub after: AfterLease,
}

/// Move to the worker of router `to` (only when idle; a lent server ignores it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Migrate {
    pub to: Addr<Router>,
}

/// The link this server lent was dropped without coming back (its client's future ended
/// abnormally): the socket is gone, so the actor stops and gives its permit back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkLost;

/// Close the server (pool shrinking, shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

// ----- to a ClientSession ----------------------------------------------------------------------

/// A CancelRequest carrying this client's key arrived on another connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelQuery;

/// Disconnect the client with this error (shutdown, admin KILL).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Kill(pub PgError);

// ----- to the Supervisor -----------------------------------------------------------------------

/// Re-read the configuration and auth_file and apply them.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Reload;
