//! The shared store (`store.kind: redis`): pins that every replica sees, revocations, kicks, and
//! the `{prefix}events` channel for kicks and revocations across replicas (contract §4).
//!
//! Keys: `{prefix}session:{sid}` is a hash `{backend, pool, owner, created_at, updated_at}` (unix
//! ms) with a TTL; `{prefix}revoked:{jti}` lives until the token's `exp`; `{prefix}kicked:{sid}`
//! holds the time of the session's last kick (unix ms) for a day (`control::KICK_TTL`), so a
//! replica that missed the kick event closes the connections that started before it when it
//! resubscribes.
//!
//! Failure is not an outage. Every operation has a short timeout; the store is marked down
//! (`vncgate_store_up` 0, `/readyz` degraded) when the liveness pings stop being answered or
//! `OP_FAILURES_DOWN` operations fail in a row, and from then on operations fail fast (the
//! router falls back to its local pin cache and rendezvous placement) while the supervisor
//! reconnects (see [`supervise`]).
//!
//! The same holds for every `store.topology` (contract §13): how a connection is made — the
//! configured server, the master the sentinels name, or a cluster from its seeds — is
//! [`topology`]'s business; the supervisor's reconnect is what re-asks the sentinels or re-seeds
//! the cluster, so a failover is followed like any other outage.
//!
//! Cluster: every script touches one key, so it runs on that key's slot; the multi-key catch-up
//! queries are issued as concurrent single-key commands (a cluster pipeline must stay within one
//! slot), multiplexed on the same connections.

pub mod board;
pub mod supervise;
pub mod topology;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::try_join_all;
use redis::AsyncCommands;
use tokio::sync::{Notify, watch};

use super::store::{Pin, SessionStore, StoreError};
use crate::config::RedisTopology;
use crate::metrics::Metrics;

pub use supervise::Replica;
pub use topology::Conn;
use topology::Topology;

/// A store round trip on a LAN is well under a millisecond; half a second means it is gone, and
/// an upgrade must not wait longer than that for it.
const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// One slow moment (a fork for a snapshot, a slow script, a GC pause in a proxy) must not
/// switch the whole replica to degraded placement; three failures one after another with no
/// success in between are no hiccup. Failures of operations in flight at the same moment count
/// once ([`FailureRun`]). The liveness pings catch a dead store without any traffic.
const OP_FAILURES_DOWN: u32 = 3;
/// Catch-up queries go out in batches of this many keys (concurrent commands, multiplexed on
/// the connection: pipelined on one server, spread over the nodes of a cluster), so 10,000 live
/// sessions are 20 batches, each well inside [`OP_TIMEOUT`].
const CATCH_UP_BATCH: usize = 500;

/// Create the pin unless it exists; either way return the pin that holds (first writer wins,
/// which is how concurrent first connections on different replicas agree).
const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'backend', ARGV[1], 'pool', ARGV[2], 'owner', ARGV[3],
             'created_at', ARGV[4], 'updated_at', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return redis.call('HMGET', KEYS[1], 'backend', 'pool', 'owner', 'created_at', 'updated_at')
"#;

/// Extend a live session's pin; recreate it when it is missing (Redis restarted empty, or the
/// key expired while the store was unreachable).
const REFRESH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'backend', ARGV[1], 'pool', ARGV[2], 'owner', ARGV[3],
             'created_at', ARGV[4])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
return redis.call('PEXPIRE', KEYS[1], ARGV[6])
"#;

/// Delete the pin only if it is still the one this connection created.
const RELEASE: &str = r#"
local v = redis.call('HMGET', KEYS[1], 'backend', 'owner', 'created_at')
if v[1] == ARGV[1] and v[2] == ARGV[2] and v[3] == ARGV[3] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisStore {
    topology: Topology,
    /// The command connection; replaced by the supervisor on every reconnect.
    conn: Mutex<Option<Conn>>,
    prefix: String,
    /// Whether the command connection answers. A watch, so the supervisor wakes when it goes
    /// down and the subscriber when it comes back.
    up: watch::Sender<bool>,
    /// Operations failed in a row (any success resets it).
    failures: std::sync::Mutex<FailureRun>,
    /// Whether the `{prefix}events` subscription is live and answering its pings.
    subscribed: AtomicBool,
    /// The command connection was replaced without the store being marked down (the liveness
    /// probe saw a new connection id), or a cluster master failed over (asynchronous
    /// replication may have lost the latest writes): the pins must be written back all the same.
    replaced: Notify,
    /// The last probe found a master that answers writes (`vncgate_store_master_up`).
    master_ok: AtomicBool,
    metrics: Arc<Metrics>,
    claim: redis::Script,
    refresh: redis::Script,
    release: redis::Script,
}

impl RedisStore {
    /// Build the store without connecting: the supervisor connects from the runtime the
    /// connection's tasks will live on. Until then the store counts as down (served degraded),
    /// and an unreachable Redis at start is not fatal either.
    pub fn new(
        topology: &RedisTopology,
        prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RedisStore>, StoreError> {
        let topology =
            Topology::new(topology).map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let store = Arc::new(RedisStore {
            topology,
            conn: Mutex::new(None),
            prefix: prefix.to_owned(),
            up: watch::Sender::new(false),
            failures: std::sync::Mutex::default(),
            subscribed: AtomicBool::new(false),
            replaced: Notify::new(),
            master_ok: AtomicBool::new(false),
            metrics,
            claim: redis::Script::new(CLAIM),
            refresh: redis::Script::new(REFRESH),
            release: redis::Script::new(RELEASE),
        });
        store.metrics.store_up.set(0);
        store.metrics.store_subscriber_up.set(0);
        store.metrics.store_topology.master_up.set(0);
        store
            .metrics
            .store_topology
            .set_census(topology::Census::default());
        Ok(store)
    }

    fn session_key(&self, sid: &str) -> String {
        format!("{}session:{sid}", self.prefix)
    }

    fn revoked_key(&self, jti: &str) -> String {
        format!("{}revoked:{jti}", self.prefix)
    }

    fn kicked_key(&self, sid: &str) -> String {
        format!("{}kicked:{sid}", self.prefix)
    }

    pub fn events_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// Resolves once the store counts as up (the supervisor's first connection, or the next
    /// after an outage).
    pub async fn wait_up(&self) {
        let mut up = self.up.subscribe();
        let _ = up.wait_for(|up| *up).await;
    }

    fn connection(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_connection(&self, conn: Conn) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
    }

    fn set_master_ok(&self, ok: bool) {
        self.master_ok.store(ok, Ordering::SeqCst);
        self.metrics.store_topology.master_up.set(i64::from(ok));
    }

    fn mark_up(&self) {
        self.reset_failures();
        self.metrics.store_up.set(1);
        self.up.send_replace(true);
    }

    /// The store is gone: fail fast from now on and wake the supervisor. Logged once per outage.
    fn mark_down(&self, op: &str, error: &StoreError) {
        self.reset_failures();
        self.set_master_ok(false);
        if self.up.send_replace(false) {
            self.metrics.store_up.set(0);
            tracing::warn!(event = "store_error", op, store = "unreachable", error = %error,
                "session store unreachable; serving degraded");
        }
    }

    fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::SeqCst);
        self.metrics.store_subscriber_up.set(i64::from(subscribed));
    }

    fn reset_failures(&self) {
        if let Ok(mut run) = self.failures.lock() {
            *run = FailureRun::default();
        }
    }

    fn count_error(&self, op: &str) {
        self.metrics
            .store_errors_total
            .with_label_values(&[op])
            .inc();
    }

    /// Run one operation with the timeout, timing and failure accounting every op shares. The
    /// closure gets the command connection by value (a cheap clone of a multiplexed one).
    async fn op<T, F, Fut>(&self, name: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            // Fail fast while down: the supervisor, not every upgrade, waits for Redis.
            self.count_error(name);
            return Err(StoreError::Unreachable("store marked down".into()));
        }
        let Some(manager) = self.connection() else {
            self.count_error(name);
            return Err(StoreError::Unreachable("not connected".into()));
        };
        let started = Instant::now();
        let result = tokio::time::timeout(OP_TIMEOUT, f(manager)).await;
        self.metrics
            .store_op_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(v)) => {
                self.reset_failures();
                return Ok(v);
            }
            // READONLY from the sentinels' master: it is a replica now (a failover demoted it,
            // and the connection manager reconnected to the same address). No write will
            // succeed there: reconnect at once, which re-asks the sentinels. A cluster
            // connection follows such moves by itself (slot refresh), and a standalone URL
            // would only lead back to the same replica: there it is one more failure.
            Ok(Err(e)) if is_read_only(&e) && self.topology.is_sentinel() => {
                let error = StoreError::Unreachable(e.to_string());
                self.count_error(name);
                self.mark_down(name, &error);
                return Err(error);
            }
            Ok(Err(e)) => StoreError::Unreachable(e.to_string()),
            Err(_) => StoreError::Timeout,
        };
        self.count_error(name);
        let in_a_row = self.failures.lock().map_or(OP_FAILURES_DOWN, |mut run| {
            run.failed(started, Instant::now())
        });
        if in_a_row >= OP_FAILURES_DOWN {
            self.mark_down(name, &error);
        } else {
            tracing::warn!(event = "store_error", op = name, in_a_row, error = %error,
                "session store operation failed");
        }
        Err(error)
    }

    /// Put a live session's pin back after a reconnect unless the store holds one already
    /// (another replica wrote it meanwhile); returns the pin that holds.
    async fn write_back(&self, sid: &str, pin: &Pin) -> Result<Pin, StoreError> {
        // The session refreshes its pin to the idle TTL within a third of it; a day is only the
        // bound if that never happens.
        SessionStore::claim(self, sid, pin.clone(), Duration::from_secs(86400)).await
    }
}

/// Failed operations in a row, one per moment. A pause of the store (or of the path to it)
/// fails every operation in flight at once: counted one by one, three concurrent upgrades
/// during a single 600 ms hiccup marked the whole replica down. A failure counts only when its
/// operation started after the last counted failure was seen, that is when it tried again
/// after the store had already failed, which is what "down" means.
#[derive(Debug, Default)]
struct FailureRun {
    in_a_row: u32,
    last_counted: Option<Instant>,
}

impl FailureRun {
    /// An operation that started at `started` failed at `now`; returns the failures in a row.
    fn failed(&mut self, started: Instant, now: Instant) -> u32 {
        if self.last_counted.is_none_or(|last| started >= last) {
            self.in_a_row += 1;
            self.last_counted = Some(now);
        }
        self.in_a_row
    }
}

/// Scripts report the error of the write inside them as theirs; the code stays READONLY.
fn is_read_only(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.code() == Some("READONLY")
        || e.to_string().contains("READONLY")
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

fn pin_from(fields: Vec<Option<String>>) -> Option<Pin> {
    let mut it = fields.into_iter();
    let backend = it.next()??;
    let pool = it.next()??;
    let owner = it.next()??;
    let created_at_ms = it
        .next()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let updated_at_ms = it
        .next()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(created_at_ms);
    Some(Pin {
        backend,
        pool,
        owner,
        created_at_ms,
        updated_at_ms,
    })
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn get(&self, sid: &str) -> Result<Option<Pin>, StoreError> {
        let key = self.session_key(sid);
        let fields: Vec<Option<String>> = self
            .op("get", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&["backend", "pool", "owner", "created_at", "updated_at"])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(pin_from(fields))
    }

    async fn claim(&self, sid: &str, pin: Pin, ttl: Duration) -> Result<Pin, StoreError> {
        let key = self.session_key(sid);
        let fields: Vec<Option<String>> = self
            .op("claim", |mut c| async move {
                self.claim
                    .key(&key)
                    .arg(&pin.backend)
                    .arg(&pin.pool)
                    .arg(&pin.owner)
                    .arg(pin.created_at_ms)
                    .arg(ms(ttl))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        pin_from(fields).ok_or_else(|| StoreError::Unreachable("claim returned no pin".into()))
    }

    async fn replace(&self, sid: &str, pin: Pin, ttl: Duration) -> Result<(), StoreError> {
        let key = self.session_key(sid);
        self.op("replace", |mut c| async move {
            redis::pipe()
                .atomic()
                .hset_multiple(
                    &key,
                    &[
                        ("backend", pin.backend.clone()),
                        ("pool", pin.pool.clone()),
                        ("owner", pin.owner.clone()),
                        ("created_at", pin.created_at_ms.to_string()),
                        ("updated_at", pin.updated_at_ms.to_string()),
                    ],
                )
                .ignore()
                .pexpire(&key, ms(ttl) as i64)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn refresh(&self, sid: &str, pin: &Pin, ttl: Duration) -> Result<(), StoreError> {
        let key = self.session_key(sid);
        self.op("refresh", |mut c| async move {
            self.refresh
                .key(&key)
                .arg(&pin.backend)
                .arg(&pin.pool)
                .arg(&pin.owner)
                .arg(pin.created_at_ms)
                .arg(super::store::unix_ms())
                .arg(ms(ttl))
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn release(&self, sid: &str, pin: &Pin) -> Result<(), StoreError> {
        let key = self.session_key(sid);
        self.op("release", |mut c| async move {
            self.release
                .key(&key)
                .arg(&pin.backend)
                .arg(&pin.owner)
                .arg(pin.created_at_ms.to_string())
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = self.revoked_key(jti);
        self.op("revoke", |mut c| async move {
            c.pset_ex::<_, _, ()>(&key, 1, ms(ttl)).await
        })
        .await
    }

    async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let key = self.revoked_key(jti);
        self.op("check_revoked", |mut c| async move {
            c.exists::<_, bool>(&key).await
        })
        .await
    }

    async fn revoked_among(&self, jtis: &[String]) -> Result<Vec<(String, Duration)>, StoreError> {
        let mut revoked = Vec::new();
        for batch in jtis.chunks(CATCH_UP_BATCH) {
            let keys: Vec<String> = batch.iter().map(|j| self.revoked_key(j)).collect();
            let ttls: Vec<i64> = self
                .op("check_revoked", |c| async move {
                    try_join_all(keys.iter().map(|key| {
                        let mut c = c.clone();
                        async move { c.pttl::<_, i64>(key).await }
                    }))
                    .await
                })
                .await?;
            // PTTL: -2 when the key is missing, -1 when it has no TTL (never written so).
            revoked.extend(batch.iter().zip(ttls).filter_map(|(jti, ttl)| match ttl {
                -2 => None,
                -1 => Some((jti.clone(), Duration::from_secs(86400))),
                ms => Some((jti.clone(), Duration::from_millis(ms.max(1) as u64))),
            }));
        }
        Ok(revoked)
    }

    async fn record_kick(&self, sid: &str, at_ms: u64, ttl: Duration) -> Result<(), StoreError> {
        let key = self.kicked_key(sid);
        self.op("kick", |mut c| async move {
            c.pset_ex::<_, _, ()>(&key, at_ms, ms(ttl)).await
        })
        .await
    }

    async fn kicked_at(&self, sids: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        let mut out = Vec::with_capacity(sids.len());
        for batch in sids.chunks(CATCH_UP_BATCH) {
            let keys: Vec<String> = batch.iter().map(|s| self.kicked_key(s)).collect();
            // One GET per key, not MGET: in a cluster the keys live in different slots.
            let values: Vec<Option<u64>> = self
                .op("check_kicked", |c| async move {
                    try_join_all(keys.iter().map(|key| {
                        let mut c = c.clone();
                        async move { c.get::<_, Option<u64>>(key).await }
                    }))
                    .await
                })
                .await?;
            out.extend(values);
        }
        Ok(out)
    }

    async fn publish(&self, payload: &str) -> Result<(), StoreError> {
        let channel = self.events_channel();
        let payload = payload.to_owned();
        self.op("publish", |mut c| async move {
            c.publish::<_, _, i64>(&channel, payload).await.map(|_| ())
        })
        .await
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    fn events_up(&self) -> bool {
        self.subscribed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_failing_at_the_same_moment_count_once() {
        let t0 = Instant::now();
        let mut run = FailureRun::default();
        let pause_seen = t0 + OP_TIMEOUT;
        // Three operations in flight when the store paused, all timing out together.
        assert_eq!(run.failed(t0, pause_seen), 1);
        assert_eq!(run.failed(t0, pause_seen), 1);
        assert_eq!(run.failed(t0 + Duration::from_millis(1), pause_seen), 1);
    }

    #[test]
    fn operations_failing_one_after_another_count_each() {
        let t0 = Instant::now();
        let mut run = FailureRun::default();
        let mut at = t0;
        for want in 1..=OP_FAILURES_DOWN {
            let failed = at + OP_TIMEOUT;
            assert_eq!(run.failed(at, failed), want);
            at = failed + Duration::from_millis(1);
        }
    }
}
