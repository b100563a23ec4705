//! Per-client memory is bounded whatever the message sizes: messages pgcorral does not read
//! (DataRow, CopyData, the parameters of a large Bind, a Query too long to be one pgcorral
//! acts on) stream through in chunks. One client moves 1 GiB in each direction (bytea through
//! Bind and DataRow, then COPY in and out) while pgcorral's resident memory, read from /proc,
//! is sampled; and a client announcing a 2 GiB message cannot make pgcorral buffer it.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{pin_mut, SinkExt, TryStreamExt};
use support::*;

const MIB: usize = 1 << 20;
/// Growth of pgcorral's resident set above its idle figure that the issue allows.
const ALLOWED_GROWTH: u64 = 64 * MIB as u64;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Samples pgcorral's RSS every 20 ms on a thread until dropped; `peak()` is the largest seen.
struct RssWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(rss_bytes(pid))
        });
        RssWatch { stop, thread: Some(thread) }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("rss sampler")
    }
}

fn start(db: &str) -> Pooler {
    let pg = Postgres::shared();
    let ini = pool_ini(pg, db, "pool_size=2", "transaction", "workers = 1")
        .replace("auth_type = md5", "auth_type = plain");
    Pooler::start(&ini, &app_userlist())
}

/// Incompressible bytes, so that neither PostgreSQL's TOAST nor anything else shrinks them.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn a_gibibyte_each_way_through_one_client_keeps_pgcorrals_memory_flat() {
    let pg = Postgres::shared();
    let db = pg.create_database("bounded_memory");
    pg.sql_db(
        &db,
        "CREATE UNLOGGED TABLE blobs (id int, data bytea); ALTER TABLE blobs ALTER data SET STORAGE EXTERNAL;
         CREATE UNLOGGED TABLE lines (line text); ALTER TABLE lines ALTER line SET STORAGE EXTERNAL;
         GRANT ALL ON blobs, lines TO app_user;",
    );
    let pooler = start(&db);
    let client = pooler.connect(APP_USER, APP_PASSWORD, &db).await.expect("connect");
    client.simple_query("SELECT 1").await.expect("warm up");
    let idle = rss_bytes(pooler.pid());
    let watch = RssWatch::start(pooler.pid());

    // bytea in: eight 128 MiB Bind parameters; out: eight 128 MiB DataRows.
    let chunk = noise(128 * MIB, 7);
    let insert = client.prepare("INSERT INTO blobs VALUES ($1, $2)").await.expect("prepare insert");
    for id in 0..8i32 {
        client.execute(&insert, &[&id, &chunk]).await.expect("insert 128 MiB");
    }
    let mut selected = 0usize;
    for id in 0..8i32 {
        let row = client.query_one("SELECT data FROM blobs WHERE id = $1", &[&id]).await.expect("select");
        let data: &[u8] = row.get(0);
        assert!(data == &chunk[..], "row {id} came back intact");
        selected += data.len();
    }
    assert_eq!(selected, 1024 * MIB);

    // COPY in: 1 GiB of text lines in 1 MiB CopyData messages; COPY out: all of it back.
    let line: Vec<u8> = noise(MIB / 2, 11).iter().map(|b| format!("{b:02x}")).collect::<String>().into();
    let sink = client.copy_in("COPY lines FROM STDIN").await.expect("copy in");
    pin_mut!(sink);
    for _ in 0..1024 {
        let mut message = line.clone();
        message.truncate(MIB - 1);
        message.push(b'\n');
        sink.send(bytes::Bytes::from(message)).await.expect("copy data");
    }
    assert_eq!(sink.finish().await.expect("copy done"), 1024);
    let stream = client.copy_out("COPY lines TO STDOUT").await.expect("copy out");
    pin_mut!(stream);
    let mut copied = 0usize;
    while let Some(data) = stream.try_next().await.expect("copy out data") {
        copied += data.len();
    }
    assert_eq!(copied, 1024 * MIB);

    let peak = watch.peak();
    let growth = peak.saturating_sub(idle);
    assert!(
        growth < ALLOWED_GROWTH,
        "pgcorral grew by {} MiB (idle {} MiB, peak {} MiB) moving 4 GiB through one client",
        growth / MIB as u64,
        idle / MIB as u64,
        peak / MIB as u64
    );
}

#[test]
fn a_client_announcing_a_two_gibibyte_message_cannot_make_pgcorral_hold_it() {
    let pg = Postgres::shared();
    let db = pg.create_database("bounded_announce");
    let pooler = start(&db);
    let mut client = support::wire::RawClient::connect(pooler.port, APP_USER, APP_PASSWORD, &db);
    let idle = rss_bytes(pooler.pid());
    let watch = RssWatch::start(pooler.pid());
    // A Query of 2 GiB - 1 (pgcorral's default max_packet_size is 2 GiB), of which 600 MiB is
    // sent: PostgreSQL refuses such a length at once, and pgcorral must not have kept it.
    let mut header = vec![b'Q'];
    header.extend_from_slice(&i32::MAX.to_be_bytes());
    client.send(&header);
    let block = vec![b' '; MIB];
    let mut sent = 0;
    for _ in 0..600 {
        if client.stream.write_all(&block).is_err() {
            break;
        }
        sent += 1;
    }
    let peak = watch.peak();
    assert!(
        peak.saturating_sub(idle) < ALLOWED_GROWTH,
        "pgcorral grew by {} MiB after {sent} MiB of one announced 2 GiB message",
        peak.saturating_sub(idle) / MIB as u64
    );
    drop(client);
    // The daemon is alive and serves the next client.
    let out = pooler.psql(APP_USER, APP_PASSWORD, &db, "SELECT 'still here'");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "still here");
    let _ = TcpStream::connect(("127.0.0.1", pooler.port)).expect("still listening");
}
