//! The backends this replica knows beyond the config file, and the cluster-wide view of all of
//! them: registered backends (`discovery: registry`), backends named by tokens (`discovery:
//! dns`), drain marks, and live-session counts summed over every replica (see [`board`]).
//!
//! A background loop ([`Directory::run`]) syncs with the board every [`SYNC_INTERVAL`], and at
//! once when another replica announces a change on `{prefix}events`, so a backend registered
//! or drained through one replica applies on every one within a second.
//!
//! [`board`]: super::board

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Notify;

use super::board::{BackendBoard, BackendKey, BoardView, SYNC_INTERVAL};
use super::health::{BackendState, Health};
use super::store::StoreError;
use crate::config::{BackendAddr, BackendConfig, BackendProtocol, Config, Discovery, PoolConfig};
use crate::metrics::Metrics;

/// A dynamic backend: its address, and the state that counts its sessions and logins.
#[derive(Clone)]
struct Entry {
    addr: BackendAddr,
    state: Arc<BackendState>,
    /// Registered through the admin API (else named by a token, `discovery: dns`).
    registered: bool,
}

/// The cluster-wide picture as of the last successful sync.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub sessions: HashMap<BackendKey, usize>,
    pub replicas: usize,
    /// Whether the last sync succeeded (else this is the last view that did).
    pub fresh: bool,
}

pub struct DirectoryMetrics {
    /// Registered backends per registry pool; dns pools: backends with live state here.
    pub backends_registered: IntGaugeVec,
    /// Live sessions per pool over every replica (`vncgate_sessions_active` is this replica's).
    pub cluster_sessions: IntGaugeVec,
    /// Live sessions per static backend over every replica.
    pub cluster_backend_sessions: IntGaugeVec,
    /// Replicas whose counts are live in the store (1 with the embedded store).
    pub cluster_replicas: IntGauge,
    /// Name lookups of `discovery: dns` backends, by result (`ok`, `failed`).
    pub discovery_lookups_total: IntCounterVec,
}

impl DirectoryMetrics {
    pub fn register(registry: &Registry) -> Result<DirectoryMetrics, prometheus::Error> {
        let m = DirectoryMetrics {
            backends_registered: IntGaugeVec::new(
                Opts::new(
                    "vncgate_backends_registered",
                    "Dynamic backends known per pool (registry: registered; dns: with live state here).",
                ),
                &["pool"],
            )?,
            cluster_sessions: IntGaugeVec::new(
                Opts::new(
                    "vncgate_cluster_sessions",
                    "Live sessions per pool summed over every replica (as of the last sync).",
                ),
                &["pool"],
            )?,
            cluster_backend_sessions: IntGaugeVec::new(
                Opts::new(
                    "vncgate_cluster_backend_sessions",
                    "Live sessions per static backend summed over every replica.",
                ),
                &["pool", "backend"],
            )?,
            cluster_replicas: IntGauge::new(
                "vncgate_cluster_replicas",
                "Replicas whose live-session counts are current in the store.",
            )?,
            discovery_lookups_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_discovery_lookups_total",
                    "Address lookups of discovery: dns backends, by result.",
                ),
                &["pool", "result"],
            )?,
        };
        registry.register(Box::new(m.backends_registered.clone()))?;
        registry.register(Box::new(m.cluster_sessions.clone()))?;
        registry.register(Box::new(m.cluster_backend_sessions.clone()))?;
        registry.register(Box::new(m.cluster_replicas.clone()))?;
        registry.register(Box::new(m.discovery_lookups_total.clone()))?;
        Ok(m)
    }

    /// Every series the config implies, at zero.
    pub fn init(&self, config: &Config) {
        for (pool, cfg) in &config.pools {
            self.cluster_sessions.with_label_values(&[pool]);
            for b in &cfg.backends {
                self.cluster_backend_sessions
                    .with_label_values(&[pool, &b.name]);
            }
            // Every pool, static ones at a constant zero: the families exist in every scrape,
            // so dashboards and alerts never name a metric that is absent.
            self.backends_registered.with_label_values(&[pool]);
            for result in ["ok", "failed"] {
                self.discovery_lookups_total
                    .with_label_values(&[pool, result]);
            }
        }
    }
}

pub struct Directory {
    board: Arc<dyn BackendBoard>,
    /// This replica's name on the board: host, pid and a random part, so a restarted process
    /// never inherits the counts of its previous life.
    replica: String,
    dynamic: Mutex<HashMap<BackendKey, Entry>>,
    /// The drain marks as last read from the board (or set here).
    drained: Mutex<HashSet<BackendKey>>,
    view: ArcSwap<ClusterView>,
    changed: Notify,
    metrics: Arc<Metrics>,
    /// Written by a sync and by an admin change, read by a placement through the board:
    /// - a sync that read the board just before an admin change must not apply its older view
    ///   just after it (a drained backend would take new sessions again for a second);
    /// - a sync publishes this replica's counts whole, so it must not fall between a placement
    ///   counted on the board and the same session counted here (it would erase it from the
    ///   board until the next sync, and the next placements would see one session too few).
    exclusive: tokio::sync::RwLock<()>,
}

impl Directory {
    pub fn new(board: Arc<dyn BackendBoard>, metrics: Arc<Metrics>) -> Directory {
        let host = hostname();
        let replica = format!(
            "{host}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        Directory {
            board,
            replica,
            dynamic: Mutex::new(HashMap::new()),
            drained: Mutex::new(HashSet::new()),
            view: ArcSwap::from_pointee(ClusterView::default()),
            changed: Notify::new(),
            metrics,
            exclusive: tokio::sync::RwLock::new(()),
        }
    }

    pub fn board(&self) -> &Arc<dyn BackendBoard> {
        &self.board
    }

    /// Held by a placement from its count on the board to its count here (see `exclusive`).
    pub async fn placing(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.exclusive.read().await
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    /// Sync now rather than at the next tick (another replica announced a change).
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<BackendKey, Entry>> {
        self.dynamic.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drained_set(&self) -> std::sync::MutexGuard<'_, HashSet<BackendKey>> {
        self.drained.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_drained(&self, key: &BackendKey) -> bool {
        self.drained_set().contains(key)
    }

    /// A dynamic backend of `pool`, as [`BackendConfig`] and state, if this replica knows it.
    pub fn get(
        &self,
        pool_name: &str,
        pool: &PoolConfig,
        name: &str,
    ) -> Option<(BackendConfig, Arc<BackendState>)> {
        let key = BackendKey::new(pool_name, name);
        let entry = self.entries().get(&key).cloned()?;
        Some((backend_config(pool, name, entry.addr), entry.state))
    }

    /// Every registered backend of `pool`.
    pub fn registered(
        &self,
        pool_name: &str,
        pool: &PoolConfig,
    ) -> Vec<(BackendConfig, Arc<BackendState>)> {
        let mut list: Vec<_> = self
            .entries()
            .iter()
            .filter(|(k, e)| e.registered && k.pool == pool_name)
            .map(|(k, e)| {
                (
                    backend_config(pool, &k.name, e.addr.clone()),
                    Arc::clone(&e.state),
                )
            })
            .collect();
        list.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        list
    }

    /// Every dynamic backend's state (for the admin view and the drain by name).
    pub fn all(&self) -> Vec<Arc<BackendState>> {
        self.entries()
            .values()
            .map(|e| Arc::clone(&e.state))
            .collect()
    }

    /// The state of a `discovery: dns` backend the token named (already checked against the
    /// pool's `name_pattern`), created on first use.
    pub fn named(
        &self,
        pool_name: &str,
        pool: &PoolConfig,
        name: &str,
        addr: BackendAddr,
    ) -> (BackendConfig, Arc<BackendState>) {
        let key = BackendKey::new(pool_name, name);
        let draining = self.is_drained(&key);
        let mut entries = self.entries();
        let entry = entries
            .entry(key)
            .and_modify(|e| {
                // The template or the name's resolution target changed under a reload: new
                // sessions go to the new address, live ones keep theirs.
                if e.addr != addr {
                    e.addr = addr.clone();
                }
            })
            .or_insert_with(|| Entry {
                state: Arc::new(BackendState::dynamic(
                    &self.metrics,
                    pool_name,
                    name,
                    addr.clone(),
                    draining,
                )),
                addr: addr.clone(),
                registered: false,
            })
            .clone();
        drop(entries);
        (backend_config(pool, name, entry.addr), entry.state)
    }

    /// A registered backend this replica has not synced yet: ask the store directly (it was
    /// registered through another replica a moment ago).
    pub async fn lookup_registered(
        &self,
        config: &Config,
        pool_name: &str,
        name: &str,
    ) -> Option<(BackendConfig, Arc<BackendState>)> {
        let pool = config.pool(pool_name)?;
        let key = BackendKey::new(pool_name, name);
        let addr = self.board.registered(&key).await.ok()??;
        self.register_locally(config, &key, &addr);
        self.get(pool_name, pool, name)
    }

    /// Apply a registration here (from the admin API, the board, or a lookup). Returns whether
    /// anything changed.
    pub fn register_locally(&self, config: &Config, key: &BackendKey, addr: &str) -> bool {
        let Some(pool) = config.pool(&key.pool) else {
            return false;
        };
        if !matches!(pool.discovery, Discovery::Registry { .. }) {
            return false;
        }
        let Some(addr) = crate::config::parse_backend_addr(addr) else {
            return false;
        };
        let draining = self.is_drained(key);
        let mut entries = self.entries();
        if entries
            .get(key)
            .is_some_and(|e| e.registered && e.addr == addr)
        {
            return false;
        }
        let state = Arc::new(BackendState::dynamic(
            &self.metrics,
            &key.pool,
            &key.name,
            addr.clone(),
            draining,
        ));
        entries.insert(
            key.clone(),
            Entry {
                addr,
                state,
                registered: true,
            },
        );
        drop(entries);
        tracing::info!(event = "backend_registered", pool = %key.pool, backend = %key.name,
            "backend {} registered", key.name);
        true
    }

    /// Remove a registration here; live sessions keep their state until they end.
    pub fn deregister_locally(&self, key: &BackendKey) -> bool {
        let removed = {
            let mut entries = self.entries();
            match entries.get(key) {
                Some(e) if e.registered => entries.remove(key).is_some(),
                _ => false,
            }
        };
        if removed {
            tracing::info!(event = "backend_deregistered", pool = %key.pool, backend = %key.name,
                "backend {} removed; its live sessions continue", key.name);
        }
        removed
    }

    /// Apply a drain mark here (every state with that key, static or dynamic).
    pub fn set_drained_locally(&self, health: &Health, key: &BackendKey, draining: bool) {
        match draining {
            true => self.drained_set().insert(key.clone()),
            false => self.drained_set().remove(key),
        };
        if let Some(state) = health.get(&key.pool, &key.name) {
            state.set_draining(draining);
        }
        if let Some(entry) = self.entries().get(key) {
            entry.state.set_draining(draining);
        }
    }

    /// Drain (or undrain) a backend cluster-wide: stored on the board, then applied here.
    pub async fn set_drain(
        &self,
        health: &Health,
        key: &BackendKey,
        draining: bool,
    ) -> Result<(), StoreError> {
        let _exclusive = self.exclusive.write().await;
        self.board.set_drain(key, draining).await?;
        self.set_drained_locally(health, key, draining);
        Ok(())
    }

    /// Register (or re-address) a backend of a registry pool cluster-wide.
    pub async fn register(
        &self,
        config: &Config,
        key: &BackendKey,
        addr: &str,
    ) -> Result<(), StoreError> {
        let _exclusive = self.exclusive.write().await;
        self.board.register(key, addr).await?;
        self.register_locally(config, key, addr);
        Ok(())
    }

    /// Remove a registered backend cluster-wide; whether it was registered (here or there).
    pub async fn deregister(&self, key: &BackendKey) -> Result<bool, StoreError> {
        let _exclusive = self.exclusive.write().await;
        let stored = self.board.deregister(key).await?;
        let here = self.deregister_locally(key);
        Ok(stored || here)
    }

    /// The live sessions here on a dynamic backend (for the answer to its removal).
    pub fn sessions_on(&self, key: &BackendKey) -> usize {
        self.entries().get(key).map_or(0, |e| e.state.sessions())
    }

    /// This replica's live sessions per backend, static and dynamic.
    fn local_counts(&self, health: &Health) -> Vec<(BackendKey, usize)> {
        let mut counts: Vec<(BackendKey, usize)> = health
            .all()
            .map(|s| (BackendKey::new(&s.pool, &s.name), s.sessions()))
            .collect();
        counts.extend(
            self.entries()
                .iter()
                .map(|(k, e)| (k.clone(), e.state.sessions())),
        );
        counts
    }

    /// One sync with the board: publish this replica's counts, then apply the cluster's drain
    /// marks and registry here and keep the summed counts for placement views and metrics.
    pub async fn sync(&self, config: &Config, health: &Health) {
        let _exclusive = self.exclusive.write().await;
        let counts = self.local_counts(health);
        match self.board.sync(&self.replica, &counts).await {
            Ok(view) => self.apply(config, health, view),
            Err(e) => {
                tracing::debug!(event = "store_error", op = "board_sync", error = %e,
                    "backend board not synced; keeping the last view");
                let mut stale = ClusterView::clone(&self.view.load());
                stale.fresh = false;
                self.view.store(Arc::new(stale));
            }
        }
        self.prune_named();
    }

    fn apply(&self, config: &Config, health: &Health, view: BoardView) {
        // Drain marks: set where newly marked, cleared where the mark is gone. Logged once
        // applied (below): whoever acts on the line finds the backend drained.
        let before = self.drained_set().clone();
        let drain_changes: Vec<(BackendKey, bool)> = view
            .drained
            .symmetric_difference(&before)
            .map(|key| (key.clone(), view.drained.contains(key)))
            .collect();
        *self.drained_set() = view.drained.clone();
        for state in health.all() {
            state.set_draining(
                view.drained
                    .contains(&BackendKey::new(&state.pool, &state.name)),
            );
        }
        // Registry: what the board holds for this replica's registry pools.
        let wanted: BTreeMap<&BackendKey, &String> = view
            .registered
            .iter()
            .filter(|(k, _)| {
                config
                    .pool(&k.pool)
                    .is_some_and(|p| matches!(p.discovery, Discovery::Registry { .. }))
            })
            .collect();
        for (key, addr) in &wanted {
            self.register_locally(config, key, addr);
        }
        let gone: Vec<BackendKey> = self
            .entries()
            .iter()
            .filter(|(k, e)| e.registered && !wanted.contains_key(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.deregister_locally(&key);
        }
        for (key, entry) in self.entries().iter() {
            entry.state.set_draining(view.drained.contains(key));
        }
        // Metrics.
        let m = &self.metrics.directory;
        m.cluster_replicas.set(view.replicas as i64);
        let mut per_pool: HashMap<&str, usize> = HashMap::new();
        for (key, n) in &view.sessions {
            *per_pool.entry(key.pool.as_str()).or_insert(0) += n;
        }
        for (pool, cfg) in &config.pools {
            m.cluster_sessions
                .with_label_values(&[pool])
                .set(per_pool.get(pool.as_str()).copied().unwrap_or(0) as i64);
            for b in &cfg.backends {
                let n = view
                    .sessions
                    .get(&BackendKey::new(pool, &b.name))
                    .copied()
                    .unwrap_or(0);
                m.cluster_backend_sessions
                    .with_label_values(&[pool, &b.name])
                    .set(n as i64);
            }
        }
        self.view.store(Arc::new(ClusterView {
            sessions: view.sessions,
            replicas: view.replicas,
            fresh: true,
        }));
        for (key, draining) in drain_changes {
            tracing::info!(event = "backend_drain", pool = %key.pool, backend = %key.name,
                draining, "backend {} draining={draining} (cluster-wide)", key.name);
        }
    }

    /// Forget token-named backends with no session (a sandbox that ended); update the gauge.
    fn prune_named(&self) {
        let mut entries = self.entries();
        entries.retain(|_, e| {
            e.registered || Arc::strong_count(&e.state) > 1 || e.state.sessions() > 0
        });
        let mut per_pool: HashMap<String, i64> = HashMap::new();
        for key in entries.keys() {
            *per_pool.entry(key.pool.clone()).or_insert(0) += 1;
        }
        drop(entries);
        let gauge = &self.metrics.directory.backends_registered;
        for (pool, n) in per_pool {
            gauge.with_label_values(&[&pool]).set(n);
        }
    }

    /// Sync for the life of the process: every [`SYNC_INTERVAL`], and at once when poked.
    pub async fn run(&self, gateway: impl Fn() -> (Arc<Config>, Arc<Health>)) {
        let mut tick = tokio::time::interval(SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.changed.notified() => {}
            }
            let (config, health) = gateway();
            // A pool whose dynamic backends all left has no series to reset otherwise.
            for (pool, cfg) in &config.pools {
                if cfg.discovery.is_dynamic() && !self.entries().keys().any(|k| k.pool == *pool) {
                    self.metrics
                        .directory
                        .backends_registered
                        .with_label_values(&[pool])
                        .set(0);
                }
            }
            self.sync(&config, &health).await;
        }
    }
}

/// A dynamic backend as the connect path sees it: raw RFB at `addr`, logged in with the pool's
/// credentials.
fn backend_config(pool: &PoolConfig, name: &str, addr: BackendAddr) -> BackendConfig {
    BackendConfig {
        name: name.to_owned(),
        addr,
        protocol: BackendProtocol::Rfb,
        credentials: pool.credentials.clone(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vncgate".to_owned())
}
