//! Peering: the other poolers of a fleet (`[peers]`), and the cancel requests this process
//! forwards to them.
//!
//! Behind a load balancer a client's CancelRequest opens a new connection, which may land on
//! another pooler than the one running its query. Every key a peer gives out carries its
//! `peer_id` ([`crate::protocol::cancel_key`]), so the pooler that receives the request sends
//! it on to the owner, over a new connection to the address `[peers]` gives, as a client would.
//!
//! Not an actor: the requester's own session future awaits [`forward`], so a forwarded
//! request keeps the requester's connection open until the owner has it, as PostgreSQL keeps
//! it until the backend is signalled. Each peer takes at most `pool_size` forwards at once;
//! waiting for a turn is bounded by `cancel_wait_timeout`, connecting by
//! `server_connect_timeout`, and the owner's answer by [`ANSWER_WAIT`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::show::PeerView;
use crate::config::{Config, PeerEntry};
use crate::net::{ServerAddr, TcpSettings};
use crate::protocol::cancel_key::{write_cancel_request, SecretKey};

/// How long the owner may take to close the forwarded request's connection (it closes once
/// its own lookup is done).
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// One peer and its forwards in progress: the rows of `SHOW PEERS` and `SHOW PEER_POOLS`.
#[derive(Debug)]
pub struct PeerPool {
    pub entry: PeerEntry,
    pub pool_size: usize,
    turns: tokio::sync::Semaphore,
    /// Requests waiting for a turn (`cl_waiting_cancel_req`).
    waiting: AtomicUsize,
    /// Connections to the peer being opened (`sv_login`).
    connecting: AtomicUsize,
    /// Requests sent, waiting for the peer to close (`cl_active_cancel_req`, `sv_active_cancel`).
    active: AtomicUsize,
}

impl PeerPool {
    fn new(entry: PeerEntry, default_pool_size: usize) -> PeerPool {
        // A peer nobody may forward to would hold every request for cancel_wait_timeout.
        let pool_size = entry.pool_size.unwrap_or(default_pool_size).max(1);
        PeerPool {
            entry,
            pool_size,
            turns: tokio::sync::Semaphore::new(pool_size),
            waiting: AtomicUsize::new(0),
            connecting: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        }
    }

    fn view(&self) -> PeerView {
        PeerView {
            peer_id: self.entry.peer_id,
            host: self.entry.host.clone(),
            port: self.entry.port,
            pool_size: self.pool_size,
            waiting: self.waiting.load(Ordering::Relaxed),
            connecting: self.connecting.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
        }
    }
}

/// The configured peers, by id. A reload keeps the pool of a peer whose line did not change, so
/// its counters and turns carry on; forwards in progress finish on the pool they started with.
#[derive(Debug, Default)]
pub struct Peers {
    pools: Mutex<BTreeMap<u16, Arc<PeerPool>>>,
}

impl Peers {
    pub fn new(config: &Config) -> Peers {
        let peers = Peers::default();
        peers.reconfigure(config);
        peers
    }

    pub fn reconfigure(&self, config: &Config) {
        let default_size = config.general.default_pool_size;
        let mut pools = self.pools.lock();
        let old = std::mem::take(&mut *pools);
        for entry in &config.peers {
            let pool = match old.get(&entry.peer_id) {
                Some(pool)
                    if pool.entry == *entry
                        && pool.pool_size == entry.pool_size.unwrap_or(default_size).max(1) =>
                {
                    pool.clone()
                }
                _ => Arc::new(PeerPool::new(entry.clone(), default_size)),
            };
            pools.insert(entry.peer_id, pool);
        }
    }

    pub fn get(&self, peer_id: u16) -> Option<Arc<PeerPool>> {
        self.pools.lock().get(&peer_id).cloned()
    }

    pub fn views(&self) -> Vec<PeerView> {
        self.pools.lock().values().map(|pool| pool.view()).collect()
    }
}

/// Why a forward did not reach its peer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no turn within cancel_wait_timeout ({0} forwards already in progress)")]
    NoTurn(usize),
    #[error("could not connect within server_connect_timeout")]
    ConnectTimeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Counts one forward in a counter for as long as it lives, however the forward ends (the
/// future may be dropped at any await).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Counted<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The time limits of one forward, from the configuration at the time it arrived.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    /// `cancel_wait_timeout`; zero: wait for a turn as long as it takes (every turn is itself
    /// bounded).
    pub wait: Duration,
    pub connect: Duration,
}

/// Sends a CancelRequest on to its owner and waits until the owner closes the connection.
pub async fn forward(
    pool: &PeerPool,
    process_id: i32,
    secret: &SecretKey,
    limits: ForwardLimits,
    tcp: &TcpSettings,
) -> Result<(), ForwardError> {
    let turn = {
        let _waiting = Counted::new(&pool.waiting);
        let acquire = pool.turns.acquire();
        let acquired = match limits.wait.is_zero() {
            true => Ok(acquire.await),
            false => tokio::time::timeout(limits.wait, acquire).await,
        };
        match acquired {
            Ok(Ok(turn)) => turn,
            // The semaphore is never closed; either way there is no turn.
            Ok(Err(_)) | Err(_) => return Err(ForwardError::NoTurn(pool.active.load(Ordering::Relaxed))),
        }
    };
    let addr = ServerAddr::from_host(Some(&pool.entry.host), pool.entry.port);
    let mut socket = {
        let _connecting = Counted::new(&pool.connecting);
        let connect = addr.connect_with(tcp);
        match limits.connect.is_zero() {
            true => connect.await?,
            false => tokio::time::timeout(limits.connect, connect)
                .await
                .map_err(|_| ForwardError::ConnectTimeout)??,
        }
    };
    let _active = Counted::new(&pool.active);
    let mut request = bytes::BytesMut::new();
    write_cancel_request(&mut request, process_id, secret);
    socket.write_all(&request).await?;
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(ANSWER_WAIT, socket.read(&mut sink)).await;
    drop(turn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse_str(text, std::path::Path::new("/nonexistent/pgbouncer.ini")).expect("valid").0
    }

    #[test]
    fn a_reload_keeps_the_pools_of_unchanged_peers() {
        let peers = Peers::new(&config(
            "[pgbouncer]\ndefault_pool_size = 4\n[peers]\n1 = host=/tmp/a\n2 = host=10.0.0.2 port=7000 pool_size=2\n",
        ));
        let views = peers.views();
        assert_eq!(
            views.iter().map(|v| (v.peer_id, v.pool_size, v.port)).collect::<Vec<_>>(),
            [(1, 4, 6432), (2, 2, 7000)]
        );
        let first = peers.get(1).unwrap();
        let second = peers.get(2).unwrap();
        peers.reconfigure(&config(
            "[pgbouncer]\ndefault_pool_size = 4\n[peers]\n1 = host=/tmp/a\n2 = host=10.0.0.3 port=7000 pool_size=2\n",
        ));
        assert!(Arc::ptr_eq(&first, &peers.get(1).unwrap()));
        assert!(!Arc::ptr_eq(&second, &peers.get(2).unwrap()));
        peers.reconfigure(&config(
            "[pgbouncer]\ndefault_pool_size = 5\n[peers]\n1 = host=/tmp/a pool_size=0\n",
        ));
        assert_eq!(peers.views()[0].pool_size, 1, "pool_size 0 would hold every request");
        assert!(peers.get(2).is_none());
    }

    #[tokio::test]
    async fn a_peer_with_no_free_turn_refuses_after_cancel_wait_timeout() {
        let peers = Peers::new(&config("[peers]\n3 = host=/nonexistent pool_size=1\n"));
        let pool = peers.get(3).unwrap();
        let _held = pool.turns.acquire().await.unwrap();
        let limits = ForwardLimits { wait: Duration::from_millis(50), connect: Duration::from_secs(1) };
        let key = SecretKey::from_bytes(&[1, 2, 3, 4]).unwrap();
        let err = forward(&pool, 1, &key, limits, &TcpSettings::default()).await.unwrap_err();
        assert!(matches!(err, ForwardError::NoTurn(_)), "{err}");
        assert_eq!(pool.view().waiting, 0, "the counter follows the request out");
    }
}
