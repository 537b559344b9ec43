//! Which backend a session goes to.
//!
//! - [`store`]: the [`SessionStore`] trait and the [`Pin`] it keeps per `sid`.
//! - [`memory`]: the embedded store (`store.kind: memory`).
//! - [`health`]: backend health checks and live-session counts.
//! - [`placement`]: least-loaded choice with rendezvous-hash tie-break.
//! - [`board`]: cluster-wide backend state (drain marks, session counts, registered backends).
//! - [`directory`]: the backends known beyond the config file, synced with the board.
//! - [`resolve`]: address lookups of `discovery: dns` backends, cached briefly.
//!
//! [`Router::place`] puts them together: reuse the pin when there is one (owner binding,
//! health), otherwise choose and claim one atomically.

pub mod board;
pub mod directory;
pub mod health;
pub mod memory;
pub mod placement;
pub mod redis;
pub mod resolve;
pub mod store;

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Duration;

pub use health::{BackendState, Health};
pub use memory::MemoryStore;
pub use store::{Pin, SessionStore, StoreError};

use crate::auth::Claims;
use crate::config::{BackendConfig, Config, Discovery, PoolConfig};
use directory::Directory;
use resolve::Resolver;

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
    #[error("no session with this id to join")]
    NothingToJoin,
}

/// The pool a placement is for, with the config it comes from.
#[derive(Clone, Copy)]
struct Target<'a> {
    config: &'a Config,
    name: &'a str,
    pool: &'a PoolConfig,
}

/// Where a session goes.
#[derive(Debug, Clone)]
pub struct Placement {
    pub pool: String,
    pub backend: BackendConfig,
    pub state: Arc<BackendState>,
    /// The pin, when this placement created it (a first connection).
    pub created: Option<Pin>,
    /// The session's owner (the pin's `owner`): differs from the token's `sub` for a share.
    pub owner: String,
    /// The session already counted on `state` (placed through the cluster-wide board, which
    /// counted it there at the same moment); else the caller counts it.
    pub counted: Option<Arc<health::BackendSessionGuard>>,
}

pub struct Router {
    store: Arc<dyn SessionStore>,
    /// For a remote store: the pins and revocations this replica has seen, consulted when the
    /// store is unreachable so reconnects still reach their desktop.
    local: Option<MemoryStore>,
    /// Swapped whole on a config reload (backends added or removed).
    health: ArcSwap<Health>,
    idle_ttl: Duration,
    directory: Arc<Directory>,
    resolver: Resolver,
}

impl Router {
    /// `remote`: the store is shared and can fail (Redis), so keep a local cache next to it.
    pub fn new(
        store: Arc<dyn SessionStore>,
        remote: bool,
        health: Arc<Health>,
        idle_ttl: Duration,
        directory: Arc<Directory>,
        resolver: Resolver,
    ) -> Router {
        Router {
            store,
            local: remote.then(MemoryStore::new),
            health: ArcSwap::new(health),
            idle_ttl,
            directory,
            resolver,
        }
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// Count the session on its backend until the guard drops, here and, with a shared store,
    /// on the board at once: the next placement on any replica must see it, also when it was
    /// not placed by load (a pin reused, a backend the token names). A placement the board
    /// chose comes counted already.
    pub async fn count_session(
        &self,
        placement: &mut Placement,
    ) -> Arc<health::BackendSessionGuard> {
        if let Some(guard) = placement.counted.take() {
            return guard;
        }
        if self.local.is_none() || !self.store.is_up() {
            return Arc::new(placement.state.session_started());
        }
        let _placing = self.directory.placing().await;
        let guard = Arc::new(placement.state.session_started());
        let key = board::BackendKey::new(&placement.pool, &placement.backend.name);
        // Best effort: the next sync publishes the count anyway.
        let _ = self
            .directory
            .board()
            .add_sessions(self.directory.replica(), &key, 1)
            .await;
        guard
    }

    /// Where to connect for `placement`: `Some` for a `discovery: dns` backend (looked up now,
    /// through the short cache), `None` when the backend's own address is to be used.
    pub async fn connect_addr(
        &self,
        config: &Config,
        placement: &Placement,
    ) -> Result<Option<std::net::SocketAddr>, String> {
        match config.pool(&placement.pool).map(|p| &p.discovery) {
            Some(Discovery::Dns { .. }) => {
                let addr = &placement.backend.addr;
                self.resolver
                    .resolve(&placement.pool, &addr.host, addr.port)
                    .await
                    .map(Some)
            }
            _ => Ok(None),
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.load_full()
    }

    pub fn set_health(&self, health: Arc<Health>) {
        self.health.store(health);
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }

    /// Reuse or create the pin for the token's session.
    ///
    /// Owner binding and replica agreement hold as far as the store allows. The store's pin
    /// wins. While the store is away, the local cache's pin (this replica's own, or the store's
    /// as last seen) binds the session. A session without a pin, while the store is away or when
    /// it fails the claim, goes to the rendezvous choice over the pool's healthy backends (the
    /// same on every replica, unlike loads) and is claimed in the local cache, where the first
    /// writer wins as in the store; so a pin made while the store refused writes still binds.
    pub async fn place(&self, config: &Config, claims: &Claims) -> Result<Placement, RoutingError> {
        let pool_name = claims.pool_name();
        let pool = config
            .pool(pool_name)
            .ok_or_else(|| RoutingError::PoolUnknown(pool_name.to_owned()))?;
        let target = Target {
            config,
            name: pool_name,
            pool,
        };
        let sid = claims.session_id();
        let (existing, degraded) = match self.store.get(sid).await {
            Ok(Some(pin)) => {
                // Kept for an outage: it is what the other replicas agree on.
                self.remember(sid, &pin).await;
                (Some(pin), false)
            }
            // A pin only the local cache still holds is not revived while the store answers (it
            // may have expired there); a claim the store cannot take falls back to it below.
            Ok(None) => (None, false),
            Err(_) => (self.cached(sid).await, true),
        };
        let stale = existing.is_some();
        if let Some(pin) = existing {
            if pin.owner != claims.sub && claims.share.is_none() {
                return Err(RoutingError::OwnedByOtherUser);
            }
            if let Some(placement) = self.reuse(target, &pin, claims, degraded).await? {
                return Ok(placement);
            }
        } else if claims.share.is_some() {
            // A share joins a session; creating one would make the viewer its owner and lock
            // the real owner out.
            return Err(RoutingError::NothingToJoin);
        }
        let (chosen, mine, held) = self.pin_new(target, sid, claims, stale, degraded).await?;
        if held.owner != claims.sub && claims.share.is_none() {
            return Err(RoutingError::OwnedByOtherUser);
        }
        if held == mine {
            return Ok(Placement {
                created: Some(mine),
                ..chosen
            });
        }
        if held.backend == chosen.backend.name {
            return Ok(Placement {
                owner: held.owner.clone(),
                ..chosen
            });
        }
        // A concurrent first connection claimed another backend first: follow it.
        self.reuse(target, &held, claims, degraded)
            .await?
            .ok_or_else(|| RoutingError::BackendUnavailable(held.backend.clone()))
    }

    /// Choose a backend for a session without a usable pin and pin it: returns the choice, the
    /// pin made for it, and the pin that holds afterwards (another one when a concurrent first
    /// connection won).
    async fn pin_new(
        &self,
        target: Target<'_>,
        sid: &str,
        claims: &Claims,
        stale: bool,
        degraded: bool,
    ) -> Result<(Placement, Pin, Pin), RoutingError> {
        let mut chosen = self.choose(target, claims, degraded).await?;
        let mut mine = new_pin(&chosen, claims);
        if stale {
            // The pin's backend left the config: overwrite it (a claim would hand it back).
            let _ = self.store.replace(sid, mine.clone(), self.idle_ttl).await;
            self.remember(sid, &mine).await;
            return Ok((chosen, mine.clone(), mine));
        }
        let claimed = match degraded {
            true => None,
            false => self
                .store
                .claim(sid, mine.clone(), self.idle_ttl)
                .await
                .ok(),
        };
        let held = match claimed {
            Some(held) => {
                self.remember(sid, &held).await;
                held
            }
            None => {
                if !degraded {
                    // The store did not confirm the claim (it may or may not hold a pin now):
                    // place as while it is away, by rendezvous, which a replica in the same
                    // position computes alike, rather than by this replica's loads.
                    chosen = self.choose(target, claims, true).await?;
                    mine = new_pin(&chosen, claims);
                }
                self.claim_locally(sid, mine.clone()).await
            }
        };
        Ok((chosen, mine, held))
    }

    /// The pin this replica has seen for `sid` (its own or the store's), if it has not expired.
    pub async fn cached(&self, sid: &str) -> Option<Pin> {
        match &self.local {
            Some(local) => local.get(sid).await.ok().flatten(),
            None => None,
        }
    }

    async fn remember(&self, sid: &str, pin: &Pin) {
        if let Some(local) = &self.local {
            let _ = local.replace(sid, pin.clone(), self.idle_ttl).await;
        }
    }

    /// First writer wins in the local cache, as in the store: two first connections for one
    /// `sid` racing on this replica while the store is away get one owner.
    async fn claim_locally(&self, sid: &str, pin: Pin) -> Pin {
        match &self.local {
            Some(local) => local
                .claim(sid, pin.clone(), self.idle_ttl)
                .await
                .unwrap_or(pin),
            None => pin,
        }
    }

    /// Follow the store's pin for `sid` from now on (it won over this replica's after an
    /// outage). Live connections are not moved.
    pub async fn adopt(&self, sid: &str, pin: &Pin) {
        self.remember(sid, pin).await;
    }

    /// Undo a pin this request created when its backend could not be reached, so the user's
    /// retry is placed afresh instead of going back to the dead backend for the idle TTL.
    pub async fn release_created(&self, sid: &str, placement: &Placement) {
        if let Some(pin) = &placement.created {
            self.release_pin(sid, pin).await;
        }
    }

    /// The backend of `placement` could not be reached: undo the pin this request created; for
    /// a dynamic backend (a sandbox that is gone) drop the session's pin to it whoever made it,
    /// so the next connection is not sent back to a dead address for the idle TTL.
    pub async fn release_failed(&self, config: &Config, sid: &str, placement: &Placement) {
        if placement.created.is_some() {
            return self.release_created(sid, placement).await;
        }
        let dynamic = config
            .pool(&placement.pool)
            .is_some_and(|p| p.discovery.is_dynamic());
        if !dynamic {
            return;
        }
        let pin = match self.store.get(sid).await {
            Ok(pin) => pin,
            Err(_) => self.cached(sid).await,
        };
        if let Some(pin) = pin.filter(|p| p.backend == placement.backend.name) {
            self.release_pin(sid, &pin).await;
        }
    }

    /// Drop `pin` (only that one: a pin someone else created meanwhile stays).
    pub async fn release_pin(&self, sid: &str, pin: &Pin) {
        if let Some(local) = &self.local {
            let _ = local.release(sid, pin).await;
        }
        let _ = self.store.release(sid, pin).await;
    }

    /// Keep a live session's pin alive (and recreate it if the store lost it).
    pub async fn refresh_pin(&self, sid: &str, pin: &Pin) -> Result<(), StoreError> {
        if let Some(local) = &self.local {
            let _ = local.refresh(sid, pin, self.idle_ttl).await;
        }
        self.store.refresh(sid, pin, self.idle_ttl).await
    }

    /// Whether a `jti` is revoked, by the store or, when it is away, by what this replica knows.
    pub async fn is_revoked(&self, jti: &str) -> bool {
        if let Some(local) = &self.local
            && local.is_revoked(jti).await.unwrap_or(false)
        {
            return true;
        }
        match self.store.is_revoked(jti).await {
            Ok(revoked) => revoked,
            // Unknown is not revoked: refusing every token while the store is away would turn a
            // store outage into a login outage. Revocations reach live sessions by event.
            Err(e) => {
                tracing::warn!(event = "store_error", op = "check_revoked", error = %e, "revocation check failed");
                false
            }
        }
    }

    /// Remember a revocation locally (always) and in the store (when reachable).
    pub async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), StoreError> {
        self.revoke_locally(jti, ttl).await;
        self.store.revoke(jti, ttl).await
    }

    /// Remember a revocation this replica learnt of (from the admin API or another replica).
    pub async fn revoke_locally(&self, jti: &str, ttl: Duration) {
        if let Some(local) = &self.local {
            let _ = local.revoke(jti, ttl).await;
        }
    }

    /// Use an existing pin; `Ok(None)` when the pin should be replaced by a fresh choice (its
    /// backend left the config, or failover re-pins away from a dead one).
    async fn reuse(
        &self,
        target: Target<'_>,
        pin: &Pin,
        claims: &Claims,
        degraded: bool,
    ) -> Result<Option<Placement>, RoutingError> {
        let Target {
            name: pool_name,
            pool,
            ..
        } = target;
        if pin.pool != pool_name {
            return Err(RoutingError::BackendNotAllowed);
        }
        if claims.backend.as_ref().is_some_and(|b| *b != pin.backend) {
            return Err(RoutingError::BackendNotAllowed);
        }
        let Some((backend, state)) = self.backend(target, &pin.backend).await else {
            // A registered backend that was removed: its sessions go elsewhere only where the
            // pool fails over (a sandbox's session has nowhere else to go).
            if matches!(pool.discovery, Discovery::Registry { .. }) && !pool.failover {
                return Err(RoutingError::BackendUnavailable(pin.backend.clone()));
            }
            return Ok(None);
        };
        if state.is_up() {
            return Ok(Some(Placement {
                pool: pool_name.to_owned(),
                backend: backend.clone(),
                state: Arc::clone(&state),
                created: None,
                owner: pin.owner.clone(),
                counted: None,
            }));
        }
        if !pool.failover || claims.backend.is_some() {
            return Err(RoutingError::BackendUnavailable(backend.name.clone()));
        }
        let chosen = self.choose(target, claims, degraded).await?;
        let now = store::unix_ms();
        let repin = Pin {
            backend: chosen.backend.name.clone(),
            updated_at_ms: now,
            ..pin.clone()
        };
        // Best effort: if the store is away, the new pin lives in the local cache until the
        // write-back after reconnection.
        self.remember(claims.session_id(), &repin).await;
        let _ = self
            .store
            .replace(claims.session_id(), repin, self.idle_ttl)
            .await;
        tracing::info!(event = "session_repinned", pool = pool_name, backend = %chosen.backend.name,
            session_id = claims.session_id(), "pinned backend {} is down; failover", backend.name);
        Ok(Some(Placement {
            owner: pin.owner.clone(),
            ..chosen
        }))
    }

    /// A backend of the pool by name: configured, registered, or (dns) named by the token.
    async fn backend(
        &self,
        target: Target<'_>,
        name: &str,
    ) -> Option<(BackendConfig, Arc<BackendState>)> {
        let Target {
            config,
            name: pool_name,
            pool,
        } = target;
        match &pool.discovery {
            Discovery::Static => {
                let backend = pool.backends.iter().find(|b| b.name == name)?;
                let health = self.health.load();
                let state = health.get(pool_name, name)?;
                Some((backend.clone(), Arc::clone(state)))
            }
            Discovery::Registry { .. } => match self.directory.get(pool_name, pool, name) {
                Some(found) => Some(found),
                None => {
                    self.directory
                        .lookup_registered(config, pool_name, name)
                        .await
                }
            },
            Discovery::Dns { addr_template, .. } => {
                // The name was checked against `name_pattern` before anything else.
                let addr =
                    crate::config::parse_backend_addr(&addr_template.replace("{backend}", name))?;
                Some(self.directory.named(pool_name, pool, name, addr))
            }
        }
    }

    /// The backends a new session of the pool may go to, before health and drain.
    fn candidates(&self, target: Target<'_>) -> Vec<(BackendConfig, Arc<BackendState>)> {
        let Target {
            name: pool_name,
            pool,
            ..
        } = target;
        match &pool.discovery {
            Discovery::Static => {
                let health = self.health.load();
                pool.backends
                    .iter()
                    .filter_map(|b| {
                        health
                            .get(pool_name, &b.name)
                            .map(|s| (b.clone(), Arc::clone(s)))
                    })
                    .collect()
            }
            Discovery::Registry { .. } => self.directory.registered(pool_name, pool),
            // A dns pool's backend is always the one the token names.
            Discovery::Dns { .. } => Vec::new(),
        }
    }

    /// A healthy backend for a new session: the one the token names, else the least loaded.
    ///
    /// With a shared store the loads are the cluster's (every replica's live sessions, see
    /// [`board`]) and the choice is counted at once, so replicas placing at the same moment
    /// spread. `degraded` (no store to agree through): ignore loads, which differ per replica,
    /// and use the rendezvous hash alone, which every replica computes the same.
    async fn choose(
        &self,
        target: Target<'_>,
        claims: &Claims,
        degraded: bool,
    ) -> Result<Placement, RoutingError> {
        let pool_name = target.name;
        let placement = |(backend, state): (BackendConfig, Arc<BackendState>)| Placement {
            pool: pool_name.to_owned(),
            backend,
            state,
            created: None,
            owner: claims.sub.clone(),
            counted: None,
        };
        // A draining backend keeps its pinned sessions but takes no new ones.
        let usable = |s: &BackendState| s.is_up() && !s.is_draining();
        if let Some(name) = &claims.backend {
            return match self.backend(target, name).await {
                Some(found) if usable(&found.1) => Ok(placement(found)),
                _ => Err(RoutingError::BackendUnavailable(name.clone())),
            };
        }
        let mut healthy: Vec<(BackendConfig, Arc<BackendState>)> = self
            .candidates(target)
            .into_iter()
            .filter(|(_, s)| usable(s))
            .collect();
        if healthy.is_empty() {
            return Err(RoutingError::NoHealthyBackend(pool_name.to_owned()));
        }
        let sid = claims.session_id();
        if !degraded && self.local.is_some() {
            // Rendezvous order first: among equally loaded backends the board takes the first,
            // which is the one every replica would pick for this sid.
            healthy.sort_by_key(|(b, _)| std::cmp::Reverse(placement::score(sid, &b.name)));
            let names: Vec<String> = healthy.iter().map(|(b, _)| b.name.clone()).collect();
            let _placing = self.directory.placing().await;
            match self
                .directory
                .board()
                .place(self.directory.replica(), pool_name, &names)
                .await
            {
                Ok(Some(name)) => {
                    if let Some(i) = healthy.iter().position(|(b, _)| b.name == name) {
                        let mut chosen = placement(healthy.swap_remove(i));
                        chosen.counted = Some(Arc::new(chosen.state.session_started()));
                        return Ok(chosen);
                    }
                }
                Ok(None) => return Err(RoutingError::NoHealthyBackend(pool_name.to_owned())),
                // The store did not answer: the rendezvous choice, as while it is away.
                Err(_) => {}
            }
        }
        let candidates: Vec<(&str, usize)> = healthy
            .iter()
            .map(|(b, s)| {
                let load = if degraded || self.local.is_some() {
                    0
                } else {
                    s.sessions()
                };
                (b.name.as_str(), load)
            })
            .collect();
        let name = placement::least_loaded(sid, &candidates)
            .ok_or_else(|| RoutingError::NoHealthyBackend(pool_name.to_owned()))?
            .to_owned();
        let i = healthy
            .iter()
            .position(|(b, _)| b.name == name)
            .ok_or_else(|| RoutingError::NoHealthyBackend(pool_name.to_owned()))?;
        Ok(placement(healthy.swap_remove(i)))
    }
}

/// A pin for `claims`' session on the chosen backend, created now.
fn new_pin(chosen: &Placement, claims: &Claims) -> Pin {
    let now = store::unix_ms();
    Pin {
        backend: chosen.backend.name.clone(),
        pool: chosen.pool.clone(),
        owner: claims.sub.clone(),
        created_at_ms: now,
        updated_at_ms: now,
    }
}
