//! Which backend a session goes to.
//!
//! - [`store`]: the [`SessionStore`] trait and the [`Pin`] it keeps per `sid`.
//! - [`memory`]: the embedded store (`store.kind: memory`).
//! - [`health`]: backend health checks and live-session counts.
//! - [`placement`]: least-loaded choice with rendezvous-hash tie-break.
//!
//! [`Router::place`] puts them together: reuse the pin when there is one (owner binding,
//! health), otherwise choose and claim one atomically.

pub mod health;
pub mod memory;
pub mod placement;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

pub use health::{BackendState, Health};
pub use memory::MemoryStore;
pub use store::{Pin, SessionStore, StoreError};

use crate::auth::Claims;
use crate::config::{BackendConfig, Config, PoolConfig};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RoutingError {
    #[error("this session belongs to another user")]
    OwnedByOtherUser,
    #[error("the session's backend {0} is unavailable")]
    BackendUnavailable(String),
    #[error("no healthy backend in pool {0}")]
    NoHealthyBackend(String),
    #[error("pool {0} is not configured")]
    PoolUnknown(String),
    #[error("the token names a different backend than the session is pinned to")]
    BackendNotAllowed,
}

/// Where a session goes.
#[derive(Debug, Clone)]
pub struct Placement {
    pub pool: String,
    pub backend: BackendConfig,
    pub state: Arc<BackendState>,
}

pub struct Router {
    store: Arc<dyn SessionStore>,
    health: Arc<Health>,
    idle_ttl: Duration,
}

impl Router {
    pub fn new(store: Arc<dyn SessionStore>, health: Arc<Health>, idle_ttl: Duration) -> Router {
        Router {
            store,
            health,
            idle_ttl,
        }
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }

    /// Reuse or create the pin for the token's session.
    pub async fn place(&self, config: &Config, claims: &Claims) -> Result<Placement, RoutingError> {
        let pool_name = claims.pool_name();
        let pool = config
            .pool(pool_name)
            .ok_or_else(|| RoutingError::PoolUnknown(pool_name.to_owned()))?;
        let sid = claims.session_id();
        // A store failure must not refuse a connection: fall through to placement, which is
        // deterministic (rendezvous) so replicas still agree while the store is away.
        let existing = self.store.get(sid).await.unwrap_or_default();
        if let Some(pin) = existing {
            if pin.owner != claims.sub {
                return Err(RoutingError::OwnedByOtherUser);
            }
            if let Some(placement) = self.reuse(pool_name, pool, &pin, claims).await? {
                return Ok(placement);
            }
        }
        let chosen = self.choose(pool_name, pool, claims)?;
        let now = store::unix_ms();
        let mine = Pin {
            backend: chosen.backend.name.clone(),
            pool: pool_name.to_owned(),
            owner: claims.sub.clone(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let held = match self.store.claim(sid, mine.clone(), self.idle_ttl).await {
            Ok(held) => held,
            Err(_) => mine,
        };
        if held.owner != claims.sub {
            return Err(RoutingError::OwnedByOtherUser);
        }
        if held.backend == chosen.backend.name {
            return Ok(chosen);
        }
        // A concurrent first connection claimed another backend first: follow it.
        self.reuse(pool_name, pool, &held, claims)
            .await?
            .ok_or_else(|| RoutingError::BackendUnavailable(held.backend.clone()))
    }

    /// Use an existing pin; `Ok(None)` when the pin should be replaced by a fresh choice (its
    /// backend left the config, or failover re-pins away from a dead one).
    async fn reuse(
        &self,
        pool_name: &str,
        pool: &PoolConfig,
        pin: &Pin,
        claims: &Claims,
    ) -> Result<Option<Placement>, RoutingError> {
        if pin.pool != pool_name {
            return Err(RoutingError::BackendNotAllowed);
        }
        if claims.backend.as_ref().is_some_and(|b| *b != pin.backend) {
            return Err(RoutingError::BackendNotAllowed);
        }
        let Some(backend) = pool.backends.iter().find(|b| b.name == pin.backend) else {
            return Ok(None);
        };
        let Some(state) = self.health.get(pool_name, &backend.name) else {
            return Ok(None);
        };
        if state.is_up() {
            return Ok(Some(Placement {
                pool: pool_name.to_owned(),
                backend: backend.clone(),
                state: Arc::clone(state),
            }));
        }
        if !pool.failover || claims.backend.is_some() {
            return Err(RoutingError::BackendUnavailable(backend.name.clone()));
        }
        let chosen = self.choose(pool_name, pool, claims)?;
        let now = store::unix_ms();
        let repin = Pin {
            backend: chosen.backend.name.clone(),
            updated_at_ms: now,
            ..pin.clone()
        };
        // Best effort: if the store is away, the new pin lives in this placement only.
        let _ = self
            .store
            .replace(claims.session_id(), repin, self.idle_ttl)
            .await;
        tracing::info!(event = "session_repinned", pool = pool_name, backend = %chosen.backend.name,
            session_id = claims.session_id(), "pinned backend {} is down; failover", backend.name);
        Ok(Some(chosen))
    }

    /// A healthy backend for a new session: the one the token names, else the least loaded.
    fn choose(
        &self,
        pool_name: &str,
        pool: &PoolConfig,
        claims: &Claims,
    ) -> Result<Placement, RoutingError> {
        let healthy: Vec<(&BackendConfig, &Arc<BackendState>)> = pool
            .backends
            .iter()
            .filter_map(|b| self.health.get(pool_name, &b.name).map(|s| (b, s)))
            .filter(|(_, s)| s.is_up())
            .collect();
        let pick = match &claims.backend {
            Some(name) => healthy
                .iter()
                .find(|(b, _)| &b.name == name)
                .ok_or_else(|| RoutingError::BackendUnavailable(name.clone()))?,
            None => {
                let candidates: Vec<(&str, usize)> = healthy
                    .iter()
                    .map(|(b, s)| (b.name.as_str(), s.sessions()))
                    .collect();
                let name = placement::least_loaded(claims.session_id(), &candidates)
                    .ok_or_else(|| RoutingError::NoHealthyBackend(pool_name.to_owned()))?;
                healthy
                    .iter()
                    .find(|(b, _)| b.name == name)
                    .ok_or_else(|| RoutingError::NoHealthyBackend(pool_name.to_owned()))?
            }
        };
        Ok(Placement {
            pool: pool_name.to_owned(),
            backend: pick.0.clone(),
            state: Arc::clone(pick.1),
        })
    }
}
