//! The embedded store: one process, no dependencies. Pins expire like Redis keys would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::store::{Pin, SessionStore, StoreError, unix_ms};

/// Expired pins are swept when the map has grown by this much since the last sweep, so memory
/// follows the number of live pins without a background task.
const SWEEP_EVERY: usize = 1024;

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pins: HashMap<String, (Pin, Instant)>,
    len_at_last_sweep: usize,
    /// Revoked `jti`s and when each revocation may be forgotten (the token's expiry).
    revoked: HashMap<String, Instant>,
}

impl Inner {
    fn live(&mut self, sid: &str) -> Option<&mut (Pin, Instant)> {
        let now = Instant::now();
        if self.pins.get(sid).is_some_and(|(_, exp)| *exp <= now) {
            self.pins.remove(sid);
        }
        self.pins.get_mut(sid)
    }

    /// Every insert goes through here, so no path (the Redis mode's local cache writes with
    /// `replace` and `refresh` only) can grow the map past its live pins plus one sweep step.
    fn insert(&mut self, sid: &str, pin: Pin, ttl: Duration) {
        self.sweep_if_grown();
        self.pins
            .insert(sid.to_owned(), (pin, Instant::now() + ttl));
    }

    fn sweep_if_grown(&mut self) {
        if self.pins.len() + self.revoked.len() >= self.len_at_last_sweep + SWEEP_EVERY {
            let now = Instant::now();
            self.pins.retain(|_, (_, exp)| *exp > now);
            self.revoked.retain(|_, exp| *exp > now);
            self.len_at_last_sweep = self.pins.len() + self.revoked.len();
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn get(&self, sid: &str) -> Result<Option<Pin>, StoreError> {
        Ok(self.lock().live(sid).map(|(pin, _)| pin.clone()))
    }

    async fn claim(&self, sid: &str, pin: Pin, ttl: Duration) -> Result<Pin, StoreError> {
        let mut inner = self.lock();
        if let Some((existing, _)) = inner.live(sid) {
            return Ok(existing.clone());
        }
        inner.insert(sid, pin.clone(), ttl);
        Ok(pin)
    }

    async fn replace(&self, sid: &str, pin: Pin, ttl: Duration) -> Result<(), StoreError> {
        self.lock().insert(sid, pin, ttl);
        Ok(())
    }

    async fn refresh(&self, sid: &str, pin: &Pin, ttl: Duration) -> Result<(), StoreError> {
        let mut inner = self.lock();
        match inner.live(sid) {
            Some((held, exp)) => {
                held.updated_at_ms = unix_ms();
                *exp = Instant::now() + ttl;
            }
            None => {
                let pin = Pin {
                    updated_at_ms: unix_ms(),
                    ..pin.clone()
                };
                inner.insert(sid, pin, ttl);
            }
        }
        Ok(())
    }

    async fn release(&self, sid: &str, pin: &Pin) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let same = inner.pins.get(sid).is_some_and(|(held, _)| {
            held.owner == pin.owner
                && held.backend == pin.backend
                && held.created_at_ms == pin.created_at_ms
        });
        if same {
            inner.pins.remove(sid);
        }
        Ok(())
    }

    async fn publish(&self, _payload: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.sweep_if_grown();
        inner.revoked.insert(jti.to_owned(), Instant::now() + ttl);
        Ok(())
    }

    async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .revoked
            .get(jti)
            .is_some_and(|exp| *exp > Instant::now()))
    }

    fn is_up(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(backend: &str, owner: &str) -> Pin {
        Pin {
            backend: backend.into(),
            pool: "default".into(),
            owner: owner.into(),
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    /// The Redis mode's local cache only ever calls `replace` and `refresh`: expired pins must
    /// be swept on those paths too, or the cache grows by every distinct `sid` for good.
    #[tokio::test]
    async fn expired_pins_are_swept_on_every_insert_path() {
        let (replaced, refreshed) = (MemoryStore::new(), MemoryStore::new());
        for i in 0..10_000 {
            let sid = format!("s{i}");
            replaced
                .replace(&sid, pin("a", "u"), Duration::ZERO)
                .await
                .expect("replace");
            refreshed
                .refresh(&sid, &pin("a", "u"), Duration::ZERO)
                .await
                .expect("refresh");
        }
        for (path, store) in [("replace", &replaced), ("refresh", &refreshed)] {
            let held = store.lock().pins.len();
            assert!(held <= 2 * SWEEP_EVERY, "{path}: {held} expired pins kept");
        }
    }

    #[tokio::test]
    async fn first_claim_wins() {
        let s = MemoryStore::new();
        let ttl = Duration::from_secs(60);
        assert_eq!(
            s.claim("s1", pin("a", "u"), ttl)
                .await
                .expect("claim")
                .backend,
            "a"
        );
        assert_eq!(
            s.claim("s1", pin("b", "v"), ttl)
                .await
                .expect("claim")
                .backend,
            "a"
        );
        assert_eq!(
            s.get("s1").await.expect("get").map(|p| p.owner),
            Some("u".into())
        );
    }

    #[tokio::test]
    async fn revocations_last_until_their_ttl() {
        let s = MemoryStore::new();
        s.revoke("j1", Duration::from_secs(60))
            .await
            .expect("revoke");
        s.revoke("j2", Duration::ZERO).await.expect("revoke");
        assert!(s.is_revoked("j1").await.expect("check"));
        assert!(!s.is_revoked("j2").await.expect("check"));
        assert!(!s.is_revoked("j3").await.expect("check"));
    }

    #[tokio::test]
    async fn pins_expire_after_ttl() {
        let s = MemoryStore::new();
        s.claim("s1", pin("a", "u"), Duration::ZERO)
            .await
            .expect("claim");
        assert_eq!(s.get("s1").await.expect("get"), None);
    }
}
