//! Backend health: an active TCP connect check per backend, plus the live-session count per
//! backend that least-loaded placement reads.
//!
//! Why not pingora-load-balancing's `TcpHealthCheck`: placement here is by session pin and load,
//! not by a `LoadBalancer` selection, and the per-backend session counts live next to the health
//! bit; the check itself is one `TcpStream::connect` with a timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::net::TcpStream;

use crate::config::{BackendAddr, Config};
use crate::metrics::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive failed checks before a backend is marked down: one lost SYN should not move
/// sessions; two in a row is a real outage.
const FALL: u32 = 2;

#[derive(Debug)]
pub struct BackendState {
    pub pool: String,
    pub name: String,
    pub addr: BackendAddr,
    /// How often this backend's pool checks it; `None` = no active checks.
    check_interval: Option<Duration>,
    up: AtomicBool,
    /// Set by `POST /admin/backends/{name}/drain`: no new pins, existing sessions continue.
    draining: AtomicBool,
    failures: AtomicU32,
    sessions: AtomicUsize,
    up_gauge: IntGauge,
    sessions_gauge: IntGauge,
}

impl BackendState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Count a live session on this backend until the guard drops.
    pub fn session_started(self: &Arc<Self>) -> BackendSessionGuard {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.sessions_gauge.inc();
        BackendSessionGuard(Arc::clone(self))
    }

    fn set_up(&self, up: bool, why: &str) {
        let was = self.up.swap(up, Ordering::Relaxed);
        self.up_gauge.set(i64::from(up));
        if was != up {
            tracing::warn!(
                event = "backend_health_changed",
                pool = %self.pool,
                backend = %self.name,
                up,
                error = why,
                "backend {} is now {}",
                self.name,
                if up { "up" } else { "down" }
            );
        }
    }

    /// Record one check result, applying the fall threshold.
    fn record(&self, ok: bool, why: &str) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.set_up(true, "");
        } else if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FALL {
            self.set_up(false, why);
        }
    }
}

pub struct BackendSessionGuard(Arc<BackendState>);

impl Drop for BackendSessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
        self.0.sessions_gauge.dec();
    }
}

pub struct Health {
    backends: HashMap<(String, String), Arc<BackendState>>,
}

impl Health {
    /// Every configured backend, initially up: a fresh gateway serves at once, and the first
    /// check (run immediately) corrects that within a second.
    pub fn new(config: &Config, metrics: &Metrics) -> Health {
        Health::rebuild(config, metrics, None)
    }

    /// The health set for a reloaded config: backends that kept their pool, name, address and
    /// check interval keep their state (health, live-session count); the others start fresh,
    /// and the metric series of removed backends are dropped.
    pub fn rebuild(config: &Config, metrics: &Metrics, previous: Option<&Health>) -> Health {
        let mut backends = HashMap::new();
        for (pool_name, pool) in &config.pools {
            for b in &pool.backends {
                let key = (pool_name.clone(), b.name.clone());
                let kept = previous
                    .and_then(|p| p.backends.get(&key))
                    .filter(|s| s.addr == b.addr && s.check_interval == pool.health_check_interval);
                if let Some(state) = kept {
                    backends.insert(key, Arc::clone(state));
                    continue;
                }
                let labels = [pool_name.as_str(), b.name.as_str()];
                let state = BackendState {
                    pool: pool_name.clone(),
                    name: b.name.clone(),
                    addr: b.addr.clone(),
                    check_interval: pool.health_check_interval,
                    up: AtomicBool::new(true),
                    draining: AtomicBool::new(false),
                    failures: AtomicU32::new(0),
                    sessions: AtomicUsize::new(0),
                    up_gauge: metrics.backend_up.with_label_values(&labels),
                    sessions_gauge: metrics.backend_sessions.with_label_values(&labels),
                };
                state.up_gauge.set(1);
                backends.insert(key, Arc::new(state));
            }
        }
        if let Some(previous) = previous {
            for (pool, name) in previous
                .backends
                .keys()
                .filter(|k| !backends.contains_key(*k))
            {
                let labels = [pool.as_str(), name.as_str()];
                let _ = metrics.backend_up.remove_label_values(&labels);
                let _ = metrics.backend_sessions.remove_label_values(&labels);
            }
        }
        Health { backends }
    }

    pub fn get(&self, pool: &str, name: &str) -> Option<&Arc<BackendState>> {
        self.backends.get(&(pool.to_owned(), name.to_owned()))
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<BackendState>> {
        self.backends.values()
    }

    /// (healthy, total) over every pool, for `/readyz`.
    pub fn counts(&self) -> (usize, usize) {
        let healthy = self.backends.values().filter(|b| b.is_up()).count();
        (healthy, self.backends.len())
    }

    /// A failed connect on the data path counts as a failed check, so a dead backend stops
    /// receiving new sessions before the next periodic check. Without active checks nothing
    /// would ever mark it up again, so then the failure is only reported (as a 502).
    pub fn report_connect_failure(&self, state: &BackendState, why: &str) {
        if state.check_interval.is_some() {
            state.record(false, why);
        }
    }

    /// Check every actively checked backend at its pool's interval, forever (a background task).
    pub async fn run_checks(self: Arc<Self>) {
        let checks = self
            .backends
            .values()
            .filter_map(|b| b.check_interval.map(|every| (Arc::clone(b), every)));
        let loops = checks.map(|(backend, every)| async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let target = (backend.addr.host.as_str(), backend.addr.port);
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(_)) => backend.record(true, ""),
                    Ok(Err(e)) => backend.record(false, &e.to_string()),
                    Err(_) => backend.record(false, "connect timed out"),
                }
            }
        });
        futures_util::future::join_all(loops).await;
    }
}
