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

    /// Send a control event to every replica (`{prefix}events`); the embedded store has no
    /// other replicas, so it has nothing to do.
    async fn publish(&self, payload: &str) -> Result<(), StoreError>;

    /// Whether the store is reachable now (for `/readyz` and `vncgate_store_up`).
    fn is_up(&self) -> bool;
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
