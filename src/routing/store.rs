//! The session store: where a session's pin (`sid` -> backend) lives, so every connection with
//! that `sid` lands on the same desktop. Memory for one instance; Redis (issue 4) for replicas.

use std::time::Duration;

use async_trait::async_trait;

/// A session's pin (contract §4: `{prefix}session:{sid}` hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub backend: String,
    pub pool: String,
    /// The `sub` that created the pin; only it may use the session.
    pub owner: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Pin {
    /// Whether `other` sends the session to the same place for the same owner: two replicas
    /// that each pinned a `sid` while the store was away agree when this holds, whatever their
    /// timestamps say.
    pub fn binds_like(&self, other: &Pin) -> bool {
        self.backend == other.backend && self.pool == other.pool && self.owner == other.owner
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store unreachable: {0}")]
    Unreachable(String),
    #[error("session store timed out")]
    Timeout,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// The live pin for `sid`, if any.
    async fn get(&self, sid: &str) -> Result<Option<Pin>, StoreError>;

    /// Create the pin unless one exists, atomically; return the pin that holds afterwards (ours,
    /// or the one a concurrent first connection wrote first).
    async fn claim(&self, sid: &str, pin: Pin, ttl: Duration) -> Result<Pin, StoreError>;

    /// Overwrite the pin (failover re-pin).
    async fn replace(&self, sid: &str, pin: Pin, ttl: Duration) -> Result<(), StoreError>;

    /// Extend the pin's life to `ttl` from now: called while a session is live and when its last
    /// connection closes, so the pin outlives the session by the idle TTL. A missing pin is
    /// written again from `pin` (the store lost it while the session lived).
    async fn refresh(&self, sid: &str, pin: &Pin, ttl: Duration) -> Result<(), StoreError>;

    /// Delete the pin if it is still exactly `pin` (compare-and-delete: never another
    /// connection's newer pin).
    async fn release(&self, sid: &str, pin: &Pin) -> Result<(), StoreError>;

    /// Record that tokens with this `jti` are revoked, for `ttl` (until the token's `exp`).
    async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError>;

    async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError>;

    /// Which of `jtis` are revoked, with the time each revocation has left: one round trip for
    /// the catch-up after a replica resubscribes to `{prefix}events`.
    async fn revoked_among(&self, jtis: &[String]) -> Result<Vec<(String, Duration)>, StoreError> {
        // A store that cannot tell the time left says an hour: the catch-up only uses it to keep
        // the revocation in the local cache while the shared store is away.
        let mut out = Vec::new();
        for jti in jtis {
            if self.is_revoked(jti).await? {
                out.push((jti.clone(), Duration::from_secs(3600)));
            }
        }
        Ok(out)
    }

    /// Record that `sid` was kicked at `at_ms` (unix ms), for `ttl`, so a replica that missed
    /// the kick event can still close the connections that started before it. The embedded
    /// store has no other replicas to miss it.
    async fn record_kick(&self, _sid: &str, _at_ms: u64, _ttl: Duration) -> Result<(), StoreError> {
        Ok(())
    }

    /// For each of `sids`, when it was last kicked (unix ms), if a kick is still recorded.
    async fn kicked_at(&self, sids: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        Ok(vec![None; sids.len()])
    }

    /// Send a control event to every replica (`{prefix}events`); the embedded store has no
    /// other replicas, so it has nothing to do.
    async fn publish(&self, payload: &str) -> Result<(), StoreError>;

    /// Whether the store is reachable now (for `/readyz` and `vncgate_store_up`).
    fn is_up(&self) -> bool;

    /// Whether this replica hears the other replicas' events now (for `/readyz` and
    /// `vncgate_store_subscriber_up`). A store without other replicas has nothing to miss.
    fn events_up(&self) -> bool {
        true
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
