//! Server host names, resolved and cached as PgBouncer caches them: a name's addresses for
//! `dns_max_ttl`, a failed lookup for `dns_nxdomain_ttl` (the records' own TTLs are not known to
//! the system resolver, and PgBouncer ignores them too). Each new server connection takes the
//! next address of the name, round robin. A name's [`version`](DnsCache::version) moves when a
//! lookup finds a different set of addresses, which makes its pools reconnect their servers
//! (see `actors/pool.rs`).
//!
//! Lookups run `getaddrinfo` on tokio's blocking pool ([`tokio::net::lookup_host`]): never on a
//! worker thread. The cache itself is pure bookkeeping, tested without a resolver.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsTtls {
    /// `dns_max_ttl`.
    pub found: Duration,
    /// `dns_nxdomain_ttl`.
    pub not_found: Duration,
}

impl Default for DnsTtls {
    fn default() -> Self {
        DnsTtls { found: Duration::from_secs(15), not_found: Duration::from_secs(15) }
    }
}

#[derive(Debug)]
struct Entry {
    /// The last addresses the name resolved to (empty if it never did).
    addrs: Vec<IpAddr>,
    /// The last lookup failed: this is why.
    failed: Option<String>,
    expires: Instant,
    next: usize,
    /// Moves each time a lookup finds a different set of addresses.
    version: u64,
}

#[derive(Debug, Default)]
pub struct DnsCache {
    ttls: Mutex<DnsTtls>,
    entries: Mutex<HashMap<String, Entry>>,
}

/// What the cache knows of a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    /// The next address, round robin.
    Addr(IpAddr),
    /// The name did not resolve, and that answer is still fresh.
    Failed(String),
    /// Unknown or expired: look it up.
    Stale,
}

impl DnsCache {
    pub fn set_ttls(&self, ttls: DnsTtls) {
        *self.ttls.lock() = ttls;
    }

    /// The next address of `name` if the cache has a fresh answer.
    pub fn cached(&self, name: &str, now: Instant) -> Cached {
        let mut entries = self.entries.lock();
        match entries.get_mut(name) {
            Some(entry) if now < entry.expires => match &entry.failed {
                Some(error) => Cached::Failed(error.clone()),
                None => {
                    let addr = entry.addrs[entry.next % entry.addrs.len()];
                    entry.next = entry.next.wrapping_add(1);
                    Cached::Addr(addr)
                }
            },
            _ => Cached::Stale,
        }
    }

    /// Records a lookup's answer; returns whether the name now resolves to other addresses
    /// than before. A failure changes no addresses: servers already connected stay, and new
    /// ones fail until the name resolves again.
    pub fn store(&self, name: &str, answer: Result<Vec<IpAddr>, String>, now: Instant) -> bool {
        let ttls = *self.ttls.lock();
        let answer = match answer {
            Ok(mut addrs) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                Ok(addrs)
            }
            Ok(_) => Err("no addresses".to_string()),
            Err(error) => Err(error),
        };
        let ttl = if answer.is_ok() { ttls.found } else { ttls.not_found };
        let expires = now.checked_add(ttl).unwrap_or(now);
        let mut entries = self.entries.lock();
        let entry = entries.entry(name.to_string()).or_insert_with(|| Entry {
            addrs: Vec::new(),
            failed: None,
            expires,
            next: 0,
            version: 0,
        });
        entry.expires = expires;
        match answer {
            Ok(addrs) => {
                let changed = !entry.addrs.is_empty() && entry.addrs != addrs;
                if changed {
                    entry.version += 1;
                }
                entry.addrs = addrs;
                entry.failed = None;
                changed
            }
            Err(error) => {
                entry.failed = Some(error);
                false
            }
        }
    }

    /// Whether `name`'s answer has expired (or was never asked for).
    pub fn expired(&self, name: &str, now: Instant) -> bool {
        self.entries.lock().get(name).is_none_or(|e| now >= e.expires)
    }

    /// How many times `name`'s addresses changed.
    pub fn version(&self, name: &str) -> u64 {
        self.entries.lock().get(name).map_or(0, |e| e.version)
    }
}

/// The process's cache: names are the system's, shared by every pool.
pub fn cache() -> &'static DnsCache {
    static CACHE: std::sync::OnceLock<DnsCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(DnsCache::default)
}

/// Looks `name` up (off the worker threads) and stores the answer; returns whether its
/// addresses changed.
pub async fn refresh(name: &str) -> bool {
    let answer = match tokio::net::lookup_host((name, 0)).await {
        Ok(found) => Ok(found.map(|a: SocketAddr| a.ip()).collect()),
        Err(e) => Err(e.to_string()),
    };
    cache().store(name, answer, Instant::now())
}

/// The address to connect to for `host`: itself if it is one, else the next cached address of
/// the name, looking it up first if the cache has nothing fresh.
pub async fn resolve(host: &str) -> std::io::Result<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    for _ in 0..2 {
        match cache().cached(host, Instant::now()) {
            Cached::Addr(ip) => return Ok(ip),
            Cached::Failed(error) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("could not resolve \"{host}\": {error}"),
                ))
            }
            Cached::Stale => {
                refresh(host).await;
            }
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("could not resolve \"{host}\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn answers_are_kept_for_their_ttl_and_served_round_robin() {
        let cache = DnsCache::default();
        cache.set_ttls(DnsTtls { found: Duration::from_secs(10), not_found: Duration::from_secs(3) });
        let now = Instant::now();
        assert_eq!(cache.cached("db", now), Cached::Stale);
        assert!(!cache.store("db", Ok(vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.2")]), now));
        let served: Vec<_> = (0..4).map(|_| cache.cached("db", now)).collect();
        let [a, b] = [ip("10.0.0.1"), ip("10.0.0.2")];
        assert_eq!(served, [Cached::Addr(a), Cached::Addr(b), Cached::Addr(a), Cached::Addr(b)]);
        let later = now + Duration::from_secs(10);
        assert!(cache.expired("db", later));
        assert_eq!(cache.cached("db", later), Cached::Stale);
        // The same set again: no change. Another set: its version moves.
        assert!(!cache.store("db", Ok(vec![b, a]), later));
        assert_eq!(cache.version("db"), 0);
        assert!(cache.store("db", Ok(vec![ip("10.0.0.3")]), later));
        assert_eq!(cache.version("db"), 1);
    }

    #[test]
    fn a_failed_lookup_is_kept_for_the_nxdomain_ttl() {
        let cache = DnsCache::default();
        cache.set_ttls(DnsTtls { found: Duration::from_secs(10), not_found: Duration::from_secs(3) });
        let now = Instant::now();
        cache.store("nope", Err("Name or service not known".into()), now);
        assert_eq!(cache.cached("nope", now), Cached::Failed("Name or service not known".into()));
        assert_eq!(cache.cached("nope", now + Duration::from_secs(3)), Cached::Stale);
        // A name that stops resolving keeps its version: its servers are not closed for it,
        // nor when it resolves again to the same address.
        cache.store("db", Ok(vec![ip("10.0.0.1")]), now);
        assert!(!cache.store("db", Err("timeout".into()), now + Duration::from_secs(10)));
        assert!(!cache.store("db", Ok(vec![ip("10.0.0.1")]), now + Duration::from_secs(20)));
        assert_eq!(cache.version("db"), 0);
    }

    #[tokio::test]
    async fn literal_addresses_are_not_looked_up() {
        assert_eq!(resolve("127.0.0.1").await.unwrap(), ip("127.0.0.1"));
        assert_eq!(resolve("::1").await.unwrap(), ip("::1"));
        assert!(resolve("name.invalid").await.is_err(), "RFC 6761: .invalid never resolves");
    }
}
