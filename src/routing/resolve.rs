//! Address lookups for `discovery: dns` backends, with a short cache.
//!
//! Why a cache: a tab reload or a reconnect storm opens many connections to one sandbox within
//! seconds, and each would otherwise be a lookup through the system resolver (a DNS round trip
//! in a cluster). Why a short one: a sandbox's address changes when it is rescheduled, and the
//! system resolver gives no TTL to honour. Five seconds of a stale address costs a failed
//! connect (502, the client retries); a failed lookup is remembered for one second, so a storm
//! against a name that does not exist is one lookup per second, not one per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

const FOUND_TTL: Duration = Duration::from_secs(5);
const FAILED_TTL: Duration = Duration::from_secs(1);
/// Names cached at most; past it, expired entries are dropped (and if none has expired, the
/// whole cache: lookups are cheap enough that a flood of distinct names only costs lookups).
const MAX_ENTRIES: usize = 10_000;
/// A lookup that takes longer has failed: the upgrade is waiting on it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

type Answer = Result<SocketAddr, String>;

pub struct Resolver {
    cache: Mutex<HashMap<(String, u16), (Instant, Answer)>>,
    lookups: IntCounterVec,
}

impl Resolver {
    /// `lookups`: `vncgate_discovery_lookups_total{pool, result}`.
    pub fn new(lookups: IntCounterVec) -> Resolver {
        Resolver {
            cache: Mutex::new(HashMap::new()),
            lookups,
        }
    }

    /// The address to connect to for `host:port` (the first the system resolver returns).
    pub async fn resolve(&self, pool: &str, host: &str, port: u16) -> Answer {
        let key = (host.to_owned(), port);
        if let Some((at, answer)) = self.lock().get(&key).cloned() {
            let ttl = if answer.is_ok() {
                FOUND_TTL
            } else {
                FAILED_TTL
            };
            if at.elapsed() < ttl {
                return answer;
            }
        }
        let looked_up = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("lookup of {host} timed out"))
            .and_then(|r| r.map_err(|e| format!("lookup of {host} failed: {e}")))
            .and_then(|mut addrs| addrs.next().ok_or_else(|| format!("{host} has no address")));
        let result = if looked_up.is_ok() { "ok" } else { "failed" };
        self.lookups.with_label_values(&[pool, result]).inc();
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < FOUND_TTL);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), looked_up.clone()));
        looked_up
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u16), (Instant, Answer)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn resolver() -> Resolver {
        let lookups = IntCounterVec::new(Opts::new("l", "l"), &["pool", "result"])
            .unwrap_or_else(|e| panic!("{e}"));
        Resolver::new(lookups)
    }

    #[tokio::test]
    async fn a_second_lookup_within_the_ttl_is_served_from_the_cache() {
        let r = resolver();
        let first = r.resolve("p", "localhost", 5900).await;
        assert!(first.as_ref().is_ok_and(|a| a.port() == 5900), "{first:?}");
        assert_eq!(r.resolve("p", "localhost", 5900).await, first);
        assert_eq!(r.lookups.with_label_values(&["p", "ok"]).get(), 1);
    }

    #[tokio::test]
    async fn failures_are_cached_too() {
        let r = resolver();
        assert!(r.resolve("p", "no-such-host.invalid", 1).await.is_err());
        assert!(r.resolve("p", "no-such-host.invalid", 1).await.is_err());
        assert_eq!(r.lookups.with_label_values(&["p", "failed"]).get(), 1);
    }
}
