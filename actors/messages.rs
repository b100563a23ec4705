//! The messages actors exchange, in one place so the protocol between actors reads as a whole.
//!
//! Control flows through these; query bytes never do. A server's connection (its
//! [`ServerLink`]) travels inside them: it waits in its Router while idle and sits in the
//! client's relay loop while lent, so a lease costs one message each way.

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::actors::router::Router;
use crate::actors::server::{AfterLease, DetachedLink, ServerConnection, ServerLink};
use crate::protocol::PgError;

/// What a client waiting for a server eventually gets.
pub type CheckoutReply = oneshot::Sender<Result<ServerOffer, PgError>>;

/// A server the Router assigned to a client, connection included. A client that vanished
/// before claiming it drops the offer, and the server goes straight back to the Router instead
/// of being lost.
pub struct ServerOffer {
    server: Addr<ServerConnection>,
    link: Option<ServerLink>,
    router: Addr<Router>,
}

impl ServerOffer {
    pub fn new(server: Addr<ServerConnection>, mut link: ServerLink, router: Addr<Router>) -> ServerOffer {
        link.lend(server.clone());
        ServerOffer { server, link: Some(link), router }
    }

    /// Takes the lease: from now on the client must give the link back.
    pub fn claim(mut self) -> (Addr<ServerConnection>, ServerLink) {
        let link = self.link.take().expect("an offer is claimed once");
        (self.server.clone(), link)
    }

    /// Takes the server back unlent (the offer could not be delivered).
    pub fn reclaim(mut self) -> (Addr<ServerConnection>, ServerLink) {
        let mut link = self.link.take().expect("an offer is reclaimed once");
        link.settle();
        (self.server.clone(), link)
    }
}

impl Drop for ServerOffer {
    fn drop(&mut self) {
        if let Some(mut link) = self.link.take() {
            link.settle();
            self.router.do_send(Checkin { server: self.server.clone(), link, fresh: false });
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

/// A clean server is free: just logged in (`fresh`), back from a lease, or cleaned up.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Checkin {
    pub server: Addr<ServerConnection>,
    pub link: ServerLink,
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
    /// The starving router's worker.
    pub to: usize,
}

/// An idle server moved here from another worker, with its permit: adopt it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Adopt(pub DetachedLink);

/// A permit was released somewhere in the pool: try again to open a server for waiters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PermitFreed;

/// The pool was freed (unused for its idle lifetime): its Pool actor and Routers stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PoolFreed;

/// Another pool of the same database or user is refused by a shared limit: close one idle
/// server to make room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShedIdle;

/// Close idle servers now: all of them (PAUSE, KILL), or only those opened before the pool's
/// connection settings last changed (RECONNECT).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseIdle {
    pub outdated_only: bool,
}

/// The pool is below `min_pool_size`: open one server and keep it idle.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Grow;

// ----- to a ServerConnection -------------------------------------------------------------------

/// The lease is over and the server needs cleaning first (reset query, ROLLBACK) or closing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Return {
    pub link: ServerLink,
    pub after: AfterLease,
}

/// The connection moved to another worker together with its permit: stop without giving the
/// permit back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// The link this server lent was dropped without coming back (its client's future ended
/// abnormally): the socket is gone, so the actor stops and gives its permit back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkLost;

/// Close the server (unhealthy, idle too long, past its lifetime, shutting down).
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

/// Stop the daemon: at once, once servers are back in their pools (SIGINT), or once clients
/// have left (SIGTERM).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown(pub crate::admin::command::ShutdownMode);

/// Re-read the configuration and auth_file and apply them.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Reload;
