//! Backend health: an active check per backend (a TCP connect, or the RFB handshake through
//! ServerInit with the pool's credentials), plus the live-session count per backend that
//! least-loaded placement reads.
//!
//! Why RFB checks by default in terminate mode: TigerVNC counts every connection that closes
//! before authenticating against the peer's address, and a TCP check is exactly such a
//! connection; after five of them the gateway's address (every user's) is blacklisted. A check
//! that authenticates and closes after ServerInit is a normal, short VNC session.
//!
//! Why not pingora-load-balancing's `TcpHealthCheck`: placement here is by session pin and load,
//! not by a `LoadBalancer` selection, and the per-backend session counts live next to the health
//! bit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{BackendAddr, Config, HealthCheck, RfbCredentials, RfbTls};
use crate::metrics::Metrics;
use crate::rfb::handshake::{self, Credentials, HandshakeError, Handshaken};

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
    /// What a check does; swapped by a reload (a rotated password applies to the next check).
    probe: ArcSwap<Probe>,
    auth_failures: IntCounter,
    up: AtomicBool,
    /// Set by `POST /admin/backends/{name}/drain`: no new pins, existing sessions continue.
    draining: AtomicBool,
    failures: AtomicU32,
    sessions: AtomicUsize,
    up_gauge: IntGauge,
    sessions_gauge: IntGauge,
    /// Logins to this backend in flight (upgrades and health checks): see [`HANDSHAKE_SLOTS`].
    handshakes: tokio::sync::Semaphore,
}

/// Logins one backend may have in flight from the gateway at once. TigerVNC (default
/// `BlacklistThreshold` 5) black-marks the peer address for every connection it accepts and
/// clears the marks only when a login from that address succeeds; at the sixth mark it refuses
/// the address ("Too many security failures") for `BlacklistTimeout` (10 s, doubling). Behind
/// the gateway every user has its address: 12 users opening one desktop at once got 2-7
/// refusals in 7 runs (tests/reliability.rs). Four, plus a health check waiting its turn, stay
/// below the threshold; each login takes milliseconds, so the queue is short.
pub const HANDSHAKE_SLOTS: usize = 4;

/// How long an upgrade or a check waits for a login slot before giving up.
pub const HANDSHAKE_SLOT_WAIT: Duration = Duration::from_secs(10);

/// The `backend` label under which a pool's dynamic backends (registry, dns) are counted
/// together: one series per sandbox would leave thousands of dead series behind.
pub const DYNAMIC_LABEL: &str = "(dynamic)";

impl BackendState {
    /// A backend found at run time (`discovery: registry` or `dns`): never actively checked
    /// (it counts as up; a failed connect answers 502), counted in its pool's
    /// [`DYNAMIC_LABEL`] series.
    pub fn dynamic(
        metrics: &Metrics,
        pool: &str,
        name: &str,
        addr: BackendAddr,
        draining: bool,
    ) -> BackendState {
        let labels = [pool, DYNAMIC_LABEL];
        let up_gauge = metrics.backend_up.with_label_values(&labels);
        up_gauge.set(1);
        BackendState {
            pool: pool.to_owned(),
            name: name.to_owned(),
            addr,
            check_interval: None,
            probe: ArcSwap::from_pointee(Probe::Tcp),
            auth_failures: metrics
                .backend_auth_failures_total
                .with_label_values(&labels),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(draining),
            failures: AtomicU32::new(0),
            sessions: AtomicUsize::new(0),
            up_gauge,
            sessions_gauge: metrics.backend_sessions.with_label_values(&labels),
            handshakes: tokio::sync::Semaphore::new(HANDSHAKE_SLOTS),
        }
    }

    /// The backend refused the gateway's credentials (`vncgate_backend_auth_failures_total`).
    pub fn count_auth_failure(&self) {
        self.auth_failures.inc();
    }

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

    /// Wait for a login slot (held from the TCP connect to the end of the RFB login); `None`
    /// when none frees up within [`HANDSHAKE_SLOT_WAIT`].
    pub async fn handshake_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        tokio::time::timeout(HANDSHAKE_SLOT_WAIT, self.handshakes.acquire())
            .await
            .ok()?
            .ok()
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

/// What one check of a backend does.
#[derive(Debug)]
pub enum Probe {
    Tcp,
    Rfb {
        credentials: RfbCredentials,
        tls: Option<RfbTls>,
    },
}

impl Probe {
    fn for_backend(config: &Config, pool: &str, backend: &crate::config::BackendConfig) -> Probe {
        // A WebSocket-native backend's front (websockify) keeps no blacklist: a TCP check.
        let rfb_port = backend.protocol == crate::config::BackendProtocol::Rfb;
        match config.pool(pool) {
            Some(p) if p.health_check == HealthCheck::Rfb && rfb_port => Probe::Rfb {
                credentials: backend.credentials.clone(),
                tls: p.rfb.tls.clone(),
            },
            _ => Probe::Tcp,
        }
    }

    fn same_kind(&self, other: &Probe) -> bool {
        matches!(
            (self, other),
            (Probe::Tcp, Probe::Tcp) | (Probe::Rfb { .. }, Probe::Rfb { .. })
        )
    }
}

/// How one check ended.
enum Checked {
    Up,
    Down(String),
    /// The backend wants a password the gateway does not have (the browser's user types it):
    /// every further check would close before authenticating, which a blacklisting server
    /// counts against the gateway. Active checks of this backend stop.
    CannotAuthenticate,
}

#[derive(Debug)]
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
                let probe = Probe::for_backend(config, pool_name, b);
                let kept = previous.and_then(|p| p.backends.get(&key)).filter(|s| {
                    s.addr == b.addr
                        && s.check_interval == pool.health_check_interval
                        && s.probe.load().same_kind(&probe)
                });
                if let Some(state) = kept {
                    state.probe.store(Arc::new(probe));
                    backends.insert(key, Arc::clone(state));
                    continue;
                }
                let labels = [pool_name.as_str(), b.name.as_str()];
                let state = BackendState {
                    pool: pool_name.clone(),
                    name: b.name.clone(),
                    addr: b.addr.clone(),
                    check_interval: pool.health_check_interval,
                    probe: ArcSwap::from_pointee(probe),
                    auth_failures: metrics
                        .backend_auth_failures_total
                        .with_label_values(&labels),
                    up: AtomicBool::new(true),
                    draining: AtomicBool::new(false),
                    failures: AtomicU32::new(0),
                    sessions: AtomicUsize::new(0),
                    up_gauge: metrics.backend_up.with_label_values(&labels),
                    sessions_gauge: metrics.backend_sessions.with_label_values(&labels),
                    handshakes: tokio::sync::Semaphore::new(HANDSHAKE_SLOTS),
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
                match backend.check().await {
                    Checked::Up => backend.record(true, ""),
                    Checked::Down(why) => backend.record(false, &why),
                    Checked::CannotAuthenticate => {
                        backend.record(true, "");
                        tracing::warn!(
                            event = "health_check_stopped",
                            pool = %backend.pool,
                            backend = %backend.name,
                            "the backend asks for a VNC password the gateway does not have: \
                             active checks stop (they would count as failed logins); configure \
                             rfb.password_env for authenticated checks"
                        );
                        return;
                    }
                }
            }
        });
        futures_util::future::join_all(loops).await;
    }
}

impl BackendState {
    async fn check(&self) -> Checked {
        let probe = self.probe.load_full();
        // An RFB check is a login like any other (a TCP check is a bare connect, which a
        // server with a blacklist counts the same way, but it never logs in to clear it).
        let _slot = match probe.as_ref() {
            Probe::Rfb { .. } => match self.handshake_slot().await {
                Some(slot) => Some(slot),
                None => return Checked::Down("no login slot within 10 s".into()),
            },
            Probe::Tcp => None,
        };
        let target = (self.addr.host.as_str(), self.addr.port);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Checked::Down(e.to_string()),
            Err(_) => return Checked::Down("connect timed out".into()),
        };
        let Probe::Rfb { credentials, tls } = probe.as_ref() else {
            return Checked::Up;
        };
        let creds = Credentials {
            secrets: credentials,
            tls: tls.as_ref(),
            host: &self.addr.host,
        };
        match handshake::connect(handshake::Transport::Tcp(tcp), &creds).await {
            Ok(Handshaken::Ready { mut stream, .. }) => {
                // A clean close after ServerInit: to the server, a short and normal session.
                let _ = stream.shutdown().await;
                Checked::Up
            }
            Ok(Handshaken::NeedsPassword(_)) => Checked::CannotAuthenticate,
            Err(e @ HandshakeError::AuthFailed(_)) => {
                self.auth_failures.inc();
                tracing::warn!(event = "backend_auth_failed", pool = %self.pool, backend = %self.name,
                    error = %e, "the backend refused the gateway's VNC credentials (health check)");
                Checked::Down(e.to_string())
            }
            Err(e) => Checked::Down(e.to_string()),
        }
    }
}
