//! The shared store (`store.kind: redis`): pins that every replica sees, revocations, and the
//! `{prefix}events` channel for kicks and revocations across replicas (contract §4).
//!
//! Keys: `{prefix}session:{sid}` is a hash `{backend, pool, owner, created_at, updated_at}` (unix
//! ms) with a TTL; `{prefix}revoked:{jti}` lives until the token's `exp`.
//!
//! Failure is not an outage: every operation has a short timeout; the first failure marks the
//! store down (`vncgate_store_up` 0, `/readyz` degraded) and from then on operations fail fast
//! (the router falls back to its local pin cache and rendezvous placement) while the supervisor
//! reconnects with exponential backoff and jitter. Once Redis answers again, the pins of live
//! sessions are written back, so a Redis that restarted empty learns them again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use rand::Rng;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;

use super::store::{Pin, SessionStore, StoreError};
use crate::metrics::Metrics;

/// A store round trip on a LAN is well under a millisecond; half a second means it is gone, and
/// an upgrade must not wait longer than that for it.
const OP_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
    client: redis::Client,
    manager: Mutex<Option<ConnectionManager>>,
    prefix: String,
    up: AtomicBool,
    went_down: Notify,
    metrics: Arc<Metrics>,
    claim: redis::Script,
    refresh: redis::Script,
    release: redis::Script,
}

/// The pins of live sessions, for the write-back after a reconnect.
pub type LivePins = Arc<dyn Fn() -> Vec<(String, Pin)> + Send + Sync>;

impl RedisStore {
    /// Build the store without connecting: the supervisor connects from the runtime the
    /// connection's tasks will live on. Until then the store counts as down (served degraded),
    /// and an unreachable Redis at start is not fatal either.
    pub fn new(
        url: &str,
        prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RedisStore>, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let store = Arc::new(RedisStore {
            client,
            manager: Mutex::new(None),
            prefix: prefix.to_owned(),
            up: AtomicBool::new(false),
            went_down: Notify::new(),
            metrics,
            claim: redis::Script::new(CLAIM),
            refresh: redis::Script::new(REFRESH),
            release: redis::Script::new(RELEASE),
        });
        store.metrics.store_up.set(0);
        Ok(store)
    }

    fn session_key(&self, sid: &str) -> String {
        format!("{}session:{sid}", self.prefix)
    }

    fn revoked_key(&self, jti: &str) -> String {
        format!("{}revoked:{jti}", self.prefix)
    }

    pub fn events_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    async fn reconnect(&self) -> Result<(), StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            // The supervisor owns reconnection (with jitter, and the write-back after it).
            .set_number_of_retries(1);
        let mut manager = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let _: String =
            tokio::time::timeout(OP_TIMEOUT, redis::cmd("PING").query_async(&mut manager))
                .await
                .map_err(|_| StoreError::Timeout)?
                .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        *self.manager.lock().unwrap_or_else(|p| p.into_inner()) = Some(manager);
        Ok(())
    }

    fn mark_up(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.metrics.store_up.set(1);
    }

    fn mark_down(&self, op: &str, error: &StoreError) {
        self.metrics
            .store_errors_total
            .with_label_values(&[op])
            .inc();
        if self.up.swap(false, Ordering::SeqCst) {
            self.metrics.store_up.set(0);
            tracing::warn!(event = "store_error", op, error = %error, "session store unreachable; serving degraded");
            self.went_down.notify_one();
        }
    }

    /// Run one operation with the timeout, timing and failure accounting every op shares.
    async fn op<T, F, Fut>(&self, name: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.up.load(Ordering::SeqCst) {
            // Fail fast while down: the supervisor, not every upgrade, waits for Redis.
            self.metrics
                .store_errors_total
                .with_label_values(&[name])
                .inc();
            return Err(StoreError::Unreachable("store marked down".into()));
        }
        let Some(manager) = self
            .manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Err(StoreError::Unreachable("not connected".into()));
        };
        let started = Instant::now();
        let result = tokio::time::timeout(OP_TIMEOUT, f(manager)).await;
        self.metrics
            .store_op_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => StoreError::Unreachable(e.to_string()),
            Err(_) => StoreError::Timeout,
        };
        self.mark_down(name, &error);
        Err(error)
    }

    /// Reconnect with exponential backoff and jitter whenever the store goes down, then write
    /// back the pins of live sessions. Runs forever (a background task).
    pub async fn run_supervisor(self: Arc<Self>, live_pins: LivePins) {
        let mut first = true;
        loop {
            if self.up.load(Ordering::SeqCst) {
                self.went_down.notified().await;
            }
            let mut backoff = BACKOFF_MIN;
            let mut attempts = 0u32;
            loop {
                if !first || attempts > 0 {
                    // Half jitter: replicas that lost Redis together do not retry in lockstep.
                    let wait = rand::rng().random_range(backoff / 2..=backoff);
                    tokio::time::sleep(wait).await;
                }
                attempts += 1;
                match self.reconnect().await {
                    Ok(()) => break,
                    Err(e) => {
                        self.metrics
                            .store_errors_total
                            .with_label_values(&["connect"])
                            .inc();
                        if first && attempts == 1 {
                            tracing::warn!(event = "store_error", op = "connect", error = %e,
                                "Redis unreachable at start; serving degraded");
                        } else {
                            tracing::debug!(event = "store_error", op = "connect", attempts, error = %e,
                                "Redis still unreachable");
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            self.mark_up();
            if std::mem::take(&mut first) && attempts == 1 {
                tracing::info!(event = "store_connected", "session store connected");
                continue;
            }
            let pins = live_pins();
            let mut written = 0usize;
            for (sid, pin) in &pins {
                if self.write_back(sid, pin).await.is_ok() {
                    written += 1;
                }
            }
            tracing::info!(
                event = "store_reconnected",
                attempts,
                pins_written = written,
                "session store reachable again; {written} live pins written back"
            );
        }
    }

    async fn write_back(&self, sid: &str, pin: &Pin) -> Result<(), StoreError> {
        // The idle TTL is refreshed by the session itself within a third of it; a day is only
        // the bound if that never happens.
        self.refresh(sid, pin, Duration::from_secs(86400)).await
    }

    /// Deliver every message on `{prefix}events` to `on_event`, resubscribing after failures.
    pub async fn run_subscriber(self: Arc<Self>, on_event: Arc<dyn Fn(&str) + Send + Sync>) {
        let channel = self.events_channel();
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub.subscribe(&channel).await.is_ok() {
                        backoff = BACKOFF_MIN;
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            if let Ok(payload) = msg.get_payload::<String>() {
                                on_event(&payload);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(event = "store_error", op = "subscribe", error = %e, "event subscription failed")
                }
            }
            let wait = rand::rng().random_range(backoff / 2..=backoff);
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
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

    async fn publish(&self, payload: &str) -> Result<(), StoreError> {
        let channel = self.events_channel();
        let payload = payload.to_owned();
        self.op("publish", |mut c| async move {
            c.publish::<_, _, i64>(&channel, payload).await.map(|_| ())
        })
        .await
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}
