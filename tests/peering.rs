//! Peering, as PgBouncer 1.19+ does it: several poolers behind one load balancer forward each
//! other the cancel requests that landed on the wrong one.
//!
//! Two pgcorral processes share a port (`so_reuseport`), as a kernel-balanced fleet does, and
//! each also listens on an address of its own, which its peers use. A query runs on one; its
//! cancel request is sent to the other, which forwards it: the query ends at once, for
//! protocol 3.0 keys and 3.2's long ones. A request bounced between peers that point at each
//! other dies after 3 hops, and a peer that never answers is given up within bounded time.

mod support;

use std::time::{Duration, Instant};

use support::console::{show, Table};
use support::wire::{send_cancel, KeyedSession};
use support::*;

/// Each node's own address, on which its peers reach it.
const NODE_ADDRS: [&str; 2] = ["127.0.0.11", "127.0.0.12"];

fn node_ini(pg: &Postgres, own: usize, port: u16, extra: &str) -> String {
    let general = format!(
        "listen_addr = 127.0.0.1,{addr}\nso_reuseport = 1\npeer_id = {id}\nadmin_users = {APP_USER}\n{extra}",
        addr = NODE_ADDRS[own],
        id = own + 1,
    );
    let ini =
        pool_ini(pg, APP_DB, "", "transaction", &general).replace("auth_type = md5", "auth_type = plain");
    // Every node lists every node, itself included, as one generated file would.
    format!(
        "{ini}[peers]\n1 = host={} port={port}\n2 = host={} port={port} pool_size=3\n",
        NODE_ADDRS[0], NODE_ADDRS[1]
    )
}

async fn console_at(addr: &str, port: u16) -> tokio_postgres::Client {
    let conninfo = format!(
        "host={addr} port={port} user={APP_USER} password={APP_PASSWORD} dbname=pgbouncer sslmode=disable"
    );
    let (client, connection) =
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await.expect("console");
    tokio::spawn(connection);
    client
}

/// The peer id a process id carries, read as PgBouncer reads it.
fn peer_in(process_id: i32) -> u16 {
    let b = process_id.to_be_bytes();
    b[1] as u16 + ((b[2] as u16) << 8)
}

/// Runs `pg_sleep(60)` on `session`, sends its cancel request to `cancel_at`, and returns the
/// SQLSTATE the query ended with and how long it ran.
fn sleep_cancelled_through(session: &mut KeyedSession, cancel_at: (&str, u16)) -> (Option<String>, Duration) {
    session.query_while("SELECT pg_sleep(60)", |s| send_cancel(cancel_at, s.process_id, &s.key))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_that_lands_on_another_peer_is_forwarded_to_the_one_running_the_query() {
    let pg = Postgres::shared();
    let port = free_port();
    let nodes: Vec<Pooler> = (0..2)
        .map(|own| Pooler::start_on_port(&node_ini(pg, own, port, ""), &app_userlist(), port).unwrap())
        .collect();
    for (own, other) in [(0, 1), (1, 0)] {
        let socket = nodes[own].dir.join(format!(".s.PGSQL.{port}"));
        assert!(wait_until(Duration::from_secs(10), || socket.exists()), "{}", nodes[own].log());
        for minor in [0u16, 2] {
            let what = format!(
                "a protocol 3.{minor} session on node {} cancelled through node {}",
                own + 1,
                other + 1
            );
            let mut session = tokio::task::block_in_place(|| {
                KeyedSession::login((NODE_ADDRS[own], port), minor, APP_USER, APP_PASSWORD, APP_DB)
            });
            assert_eq!(peer_in(session.process_id), own as u16 + 1, "{what}: the key names its node");
            assert_eq!(session.key.len(), if minor == 2 { 32 } else { 4 }, "{what}");
            let (error, took) = tokio::task::block_in_place(|| {
                sleep_cancelled_through(&mut session, (NODE_ADDRS[other], port))
            });
            assert_eq!(error.as_deref(), Some("57014"), "{what}: not cancelled\n{}", nodes[other].log());
            assert!(took < Duration::from_secs(30), "{what}: cancelled only after {took:?}");
        }
    }

    // The node that forwarded lists its peers and, the forwards done, no request in flight.
    let console = console_at(NODE_ADDRS[1], port).await;
    let peers = show(&console, "SHOW PEERS").await;
    assert_eq!(peers.columns, ["peer_id", "host", "port", "pool_size"]);
    assert_eq!(peers.row("peer_id", "1")["host"], NODE_ADDRS[0]);
    assert_eq!(peers.number("peer_id", "1", "port"), port as i64);
    assert_eq!(peers.number("peer_id", "2", "pool_size"), 3);
    let pools = show(&console, "SHOW PEER_POOLS").await;
    assert_eq!(pools.rows.len(), 2);
    for column in ["cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"] {
        assert_eq!(pools.number("peer_id", "1", column), 0, "{column}");
    }
    let lists = show(&console, "SHOW LISTS").await;
    assert_eq!(lists.number("list", "peers", "items"), 2);
}

fn number_in(table: &Table, peer: &str, column: &str) -> i64 {
    table.number("peer_id", peer, column)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_bounced_between_peers_dies_after_three_hops_and_a_silent_peer_is_given_up() {
    let pg = Postgres::shared();
    let port = free_port();
    // A peer that takes connections and never answers: the kernel's backlog accepts them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let general = format!("peer_id = 1\nadmin_users = {APP_USER}\ncancel_wait_timeout = 3\n");
    let ini = pool_ini(pg, APP_DB, "", "transaction", &general).replace("auth_type = md5", "auth_type = plain")
        // Peer 2 is this very process under another id: a misconfigured loop.
        + &format!("[peers]\n2 = host=127.0.0.1 port={port}\n3 = host=127.0.0.1 port={silent_port} pool_size=1\n");
    let pooler = Pooler::start_on_port(&ini, &app_userlist(), port).unwrap();

    // Peer 2's key, with its full time to live: forwarded to "peer 2" (this process) three
    // times, then dropped; the requester's connection is closed, not held.
    let looping = i32::from_be_bytes([0, 2, 0, 5]);
    let started = Instant::now();
    tokio::task::block_in_place(|| send_cancel(("127.0.0.1", port), looping, &[9, 9, 9, 0xff]));
    assert!(started.elapsed() < Duration::from_secs(10), "a looping request held its requester");
    assert!(
        wait_until(Duration::from_secs(5), || pooler.log().contains("dropped: already forwarded 3 times")),
        "{}",
        pooler.log()
    );
    let forwards = pooler.log().matches("forwarding a cancel request to peer 2").count();
    assert_eq!(forwards, 3 * 2, "3 forwards (each line is in both logs)\n{}", pooler.log());

    // A peer nobody configured: dropped at once.
    tokio::task::block_in_place(|| {
        send_cancel(("127.0.0.1", port), i32::from_be_bytes([0, 9, 0, 5]), &[0, 0, 0, 3])
    });
    assert!(pooler.log().contains("cancel request for peer 9 dropped: no such peer in [peers]"));

    // The silent peer takes one forward at a time (pool_size = 1): the first waits for its
    // answer, the second for a turn, and both are counted while they wait.
    let to_silent = i32::from_be_bytes([0, 3, 0, 5]);
    let requests: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || send_cancel(("127.0.0.1", port), to_silent, &[1, 2, 3, 3])))
        .collect();
    let console = console_at("127.0.0.1", port).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = None;
    while Instant::now() < deadline {
        let pools = show(&console, "SHOW PEER_POOLS").await;
        let counts = ["cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel"]
            .map(|c| number_in(&pools, "3", c));
        if counts == [1, 1, 1] {
            seen = Some(counts);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Some([1, 1, 1]), "one forward active and one waiting for a turn");
    let started = Instant::now();
    for request in requests {
        tokio::task::block_in_place(|| request.join().unwrap());
    }
    assert!(started.elapsed() < Duration::from_secs(20), "forwards to a silent peer were not given up");
    assert!(pooler.log().contains("no turn within cancel_wait_timeout"), "{}", pooler.log());
    let pools = show(&console, "SHOW PEER_POOLS").await;
    for column in ["cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login"] {
        assert_eq!(number_in(&pools, "3", column), 0, "{column} once every forward ended");
    }
    drop(silent);

    // Through all of it, the pooler serves its clients.
    let client = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.unwrap();
    assert_eq!(first_value(&client, "SELECT 1").await.unwrap(), "1");
}
