//! Server host names: round robin over a name's addresses, servers that follow a name to its
//! new address once `dns_max_ttl` has passed, and failed lookups cached for
//! `dns_nxdomain_ttl`. pgcorral runs with a hosts file the test writes (its own mount
//! namespace, `Pooler::start_with_hosts_file`), so names resolve where the test says.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

fn hosts_file(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pgcorral-hosts-{}-{}", std::process::id(), rand_suffix()));
    std::fs::write(&path, text).unwrap();
    path
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// PostgreSQL on 127.0.0.1 and 127.0.0.2, so that one name can point at either.
fn two_address_postgres() -> Postgres {
    Postgres::start_with_config("listen_addresses = '127.0.0.1,127.0.0.2'")
}

fn ini(pg: &Postgres, host: &str, general: &str) -> String {
    format!(
        "[databases]\n{APP_DB} = host={host} port={} dbname={APP_DB}\n\
         [pgbouncer]\nauth_type = md5\npool_mode = transaction\n{general}\n",
        pg.port
    )
}

fn server_address(pooler: &Pooler) -> Result<String, String> {
    let out = pooler.psql(APP_USER, APP_PASSWORD, APP_DB, "SELECT host(inet_server_addr())");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn new_servers_take_a_names_addresses_in_turn() {
    let pg = two_address_postgres();
    let hosts = hosts_file("127.0.0.1 pgdb.test\n127.0.0.2 pgdb.test\n");
    let pooler = Pooler::start_with_hosts_file(
        &ini(&pg, "pgdb.test", "default_pool_size = 6"),
        &app_userlist(),
        &hosts,
    );
    // Six clients each hold a transaction: six servers, three on each address.
    let mut clients = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..6 {
        let client = pooler.connect(APP_USER, APP_PASSWORD, APP_DB).await.expect("connect through pgcorral");
        client.batch_execute("BEGIN").await.unwrap();
        seen.push(first_value(&client, "SELECT host(inet_server_addr())").await.unwrap());
        clients.push(client);
    }
    seen.sort();
    assert_eq!(seen, ["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.2"]);
    let _ = std::fs::remove_file(&hosts);
}

#[test]
fn servers_follow_a_name_to_its_new_address_after_dns_max_ttl() {
    let pg = two_address_postgres();
    let hosts = hosts_file("127.0.0.2 pgdb.test\n");
    let pooler =
        Pooler::start_with_hosts_file(&ini(&pg, "pgdb.test", "dns_max_ttl = 1"), &app_userlist(), &hosts);
    assert_eq!(server_address(&pooler), Ok("127.0.0.2".into()));
    // The name moves (rewritten in place: the bind mount follows the file, not a new one).
    std::fs::write(&hosts, "127.0.0.1 pgdb.test\n").unwrap();
    let mut answers = Vec::new();
    let moved = wait_until(Duration::from_secs(20), || {
        let answer = server_address(&pooler);
        answers.push(answer.clone());
        answer == Ok("127.0.0.1".into())
    });
    assert!(moved, "still on the old address: {answers:?}\n{}", pooler.log());
    assert!(answers.iter().all(Result::is_ok), "no client failed meanwhile: {answers:?}");
    let _ = std::fs::remove_file(&hosts);
}

#[test]
fn a_name_that_does_not_resolve_is_retried_after_dns_nxdomain_ttl() {
    let pg = Postgres::shared();
    let hosts = hosts_file("127.0.0.1 localhost\n");
    let pooler = Pooler::start_with_hosts_file(
        &ini(pg, "late.test", "dns_nxdomain_ttl = 8\nserver_login_retry = 1\nquery_wait_timeout = 2"),
        &app_userlist(),
        &hosts,
    );
    assert!(server_address(&pooler).is_err(), "late.test does not resolve yet");
    assert!(pooler.log().contains("could not resolve \"late.test\""), "{}", pooler.log());
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 late.test\n").unwrap();
    // Within dns_nxdomain_ttl the failure is remembered: the new line is not read yet...
    assert!(server_address(&pooler).is_err(), "the failed lookup was not cached");
    // ...after it, the name is looked up again.
    assert!(wait_until(Duration::from_secs(30), || server_address(&pooler).is_ok()), "{}", pooler.log());
    let _ = std::fs::remove_file(&hosts);
}
