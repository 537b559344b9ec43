//! Pingora background services: everything that runs beside the listeners.
//!
//! - [`HealthChecks`]: active backend checks, restarted with the new backend set after a reload.
//! - [`JwksRefresh`]: the scheduled JWKS fetch, following the verifier a reload installs.
//! - [`StoreSupervisor`]: Redis reconnection, pin write-back, and the `{prefix}events` feed.
//! - [`Reloader`]: SIGHUP re-reads the config file and swaps what can change live.
//! - [`Announcer`]: logs `listening` once each listener accepts.
//! - [`MemoryTrim`]: hands memory freed after a burst of connections back to the system.
//! - [`Drain`]: on SIGTERM or upgrade, refuse new sessions, give live ones
//!   `server.drain_seconds`, close the rest with 1001, exit 0 as soon as none is left.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::bridge::CloseCode;
use crate::config::Config;
use crate::control;
use crate::gateway::Gateway;
use crate::readiness;
use crate::routing::redis::{RedisStore, Replica};
use crate::routing::{Pin, StoreError};
use crate::sessions::Role;

/// After the drain deadline, how long closing handshakes may take before the process exits.
pub const CLOSE_GRACE: Duration = Duration::from_secs(6);

pub struct HealthChecks(pub Arc<Gateway>);

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let health = self.0.router.health();
            tokio::select! {
                _ = health.run_checks() => return,
                _ = self.0.reloaded.notified() => continue,
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The backend board's sync loop (cluster-wide drain marks, registry, session counts). It
/// keeps running through a drain: the replica's sessions still count until they end, and its
/// counts expire on their own once the process is gone.
pub struct BoardSync(pub Arc<Gateway>);

#[async_trait]
impl BackgroundService for BoardSync {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let gw = &self.0;
        gw.router
            .directory()
            .run(|| (gw.config(), gw.router.health()))
            .await;
    }
}

/// Deletes recordings past `recording.retention_days`: at start, then hourly (day directories
/// are the unit, so an hour late is at most an hour of extra disk). Reads the config at each
/// sweep, so a reload that turns recording on or changes the retention applies.
pub struct RecordingRetention(pub Arc<Gateway>);

const RETENTION_SWEEP_EVERY: Duration = Duration::from_secs(3600);

#[async_trait]
impl BackgroundService for RecordingRetention {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(RETENTION_SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let recording = self.0.config().recording.clone();
            let Some(dir) = recording.dir else {
                continue;
            };
            let days = recording.retention_days;
            let swept = tokio::task::spawn_blocking(move || {
                crate::recording::retention::sweep(&dir, days, std::time::SystemTime::now())
            })
            .await;
            match swept {
                Ok(Ok(removed)) if !removed.is_empty() => {
                    tracing::info!(
                        event = "recordings_swept",
                        removed = removed.len(),
                        retention_days = days,
                        "old recordings removed"
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(event = "recordings_sweep_failed", error = %e,
                        "could not sweep the recordings directory");
                }
                Err(e) => {
                    tracing::warn!(event = "recordings_sweep_failed", error = %e,
                        "the recordings sweep did not finish");
                }
            }
        }
    }
}

pub struct JwksRefresh(pub Arc<Gateway>);

#[async_trait]
impl BackgroundService for JwksRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let reloaded = &self.0.reloaded;
        loop {
            // Registered before the verifier is read: a reload that swaps it in between still
            // wakes this loop (`notify_waiters` reaches registered waiters only). A JWKS cache
            // whose refresh never ran would stay `loading`, and the process unready.
            let mut notified = std::pin::pin!(reloaded.notified());
            notified.as_mut().enable();
            let jwks = self.0.verifier().jwks().cloned();
            let runner = jwks.clone();
            let mut refresh = std::pin::pin!(async move {
                match runner {
                    Some(j) => j.run_refresh().await,
                    None => std::future::pending().await,
                }
            });
            loop {
                tokio::select! {
                    _ = &mut refresh => return,
                    _ = &mut notified => {}
                    _ = shutdown.changed() => return,
                }
                notified.set(reloaded.notified());
                notified.as_mut().enable();
                // A reload that kept this cache (same settings) keeps its schedule: restarting
                // it would refetch at once on every SIGHUP.
                let kept = match (self.0.verifier().jwks(), &jwks) {
                    (Some(now), Some(before)) => Arc::ptr_eq(now, before),
                    (None, None) => true,
                    _ => false,
                };
                if !kept {
                    break;
                }
            }
        }
    }
}

/// Keeps the Redis connection (liveness, reconnect, write-back) and the `{prefix}events`
/// subscription (liveness, resubscription, catch-up).
pub struct StoreSupervisor(pub Arc<Gateway>, pub Arc<RedisStore>);

#[async_trait]
impl BackgroundService for StoreSupervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let replica = Arc::new(GatewayReplica(Arc::clone(&self.0)));
        tokio::select! {
            _ = Arc::clone(&self.1).run(replica) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// This replica as the store's background tasks see it.
struct GatewayReplica(Arc<Gateway>);

#[async_trait]
impl Replica for GatewayReplica {
    /// One pin per live session: the one this replica holds for it (right owner and creation
    /// time, also when only shares of it are live here), else one made from an owner's
    /// connection.
    async fn live_pins(&self) -> Vec<(String, Pin)> {
        let gw = &self.0;
        let mut pins = BTreeMap::new();
        for s in gw.sessions.list() {
            // Registered before placement: no backend yet, nothing to write back.
            if pins.contains_key(&s.session_id) || s.backend.is_empty() {
                continue;
            }
            let pin = match gw.router.cached(&s.session_id).await {
                Some(pin) => pin,
                None if s.role == Role::Owner => Pin {
                    backend: s.backend,
                    pool: s.pool,
                    owner: s.user_id,
                    created_at_ms: s.started_at_ms,
                    updated_at_ms: s.started_at_ms,
                },
                None => continue,
            };
            pins.insert(s.session_id, pin);
        }
        pins.into_iter().collect()
    }

    async fn adopt_pin(&self, sid: &str, pin: Pin) {
        self.0.router.adopt(sid, &pin).await;
    }

    fn on_event(&self, payload: &str) {
        control::on_event(&self.0, payload);
    }

    async fn catch_up(&self) -> Result<(), StoreError> {
        // Drain marks and registrations missed while not listening: the board has them.
        self.0.router.directory().poke();
        control::catch_up(&self.0).await.map(|_| ())
    }
}

/// SIGHUP: load the config file again; apply it if valid, else keep the running one and log
/// every problem with its key.
pub struct Reloader {
    pub gw: Arc<Gateway>,
    /// `None` for `vncgate demo`, which has no file to re-read.
    pub path: Option<PathBuf>,
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(event = "internal_error", error = %e, "cannot listen for SIGHUP; reload disabled");
                return;
            }
        };
        loop {
            tokio::select! {
                got = hangups.recv() => if got.is_none() { return },
                _ = shutdown.changed() => return,
            }
            self.reload();
        }
    }
}

impl Reloader {
    fn reload(&self) {
        let gw = &self.gw;
        let Some(path) = &self.path else {
            tracing::warn!(
                event = "config_reload_failed",
                "SIGHUP ignored: no config file (demo mode)"
            );
            return;
        };
        let failed = |errors: Vec<String>| {
            gw.metrics
                .config_reloads_total
                .with_label_values(&["error"])
                .inc();
            for error in &errors {
                tracing::error!(event = "config_reload_failed", error = %error, "config reload refused; the running config stays");
            }
        };
        let config = match Config::load(path) {
            Ok(c) => c,
            Err(errors) => return failed(errors.iter().map(|e| e.to_string()).collect()),
        };
        let hash = config.hash.clone();
        match gw.reload(config) {
            Ok(ignored) => {
                gw.metrics
                    .config_reloads_total
                    .with_label_values(&["ok"])
                    .inc();
                for key in &ignored {
                    tracing::warn!(
                        event = "config_warning",
                        key = *key,
                        "{key} changed: this takes effect only after a restart or upgrade"
                    );
                }
                tracing::info!(event = "config_reloaded", hash = %hash, "config reloaded");
            }
            Err(e) => failed(vec![e.to_string()]),
        }
    }
}

pub struct Announcer(pub Vec<(readiness::Kind, SocketAddr)>);

#[async_trait]
impl BackgroundService for Announcer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        readiness::announce(&self.0).await;
    }
}

/// glibc's allocator keeps what a burst of connections freed: short-lived handshake buffers
/// sit between long-lived session state, so the heap cannot shrink from its top, and freed
/// pages stay resident. With 9,950 idle sessions the live heap was 18 KiB per session and the
/// RSS 43.5 KiB; one `malloc_trim(0)` brought it to 28.5 KiB (BENCHMARKS.md). So: trim at most
/// every [`TRIM_EVERY`], and only when connections came or went since the last trim.
pub struct MemoryTrim(pub Arc<Gateway>);

const TRIM_EVERY: Duration = Duration::from_secs(10);

#[async_trait]
impl BackgroundService for MemoryTrim {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let sessions = &self.0.sessions;
        let mut trimmed_at = None;
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let state = (sessions.conn_ids_issued(), sessions.len());
            if trimmed_at == Some(state) {
                continue;
            }
            trimmed_at = Some(state);
            let started = std::time::Instant::now();
            // Off the workers: it locks each arena while it walks it.
            let released = tokio::task::spawn_blocking(release_freed_memory).await;
            tracing::debug!(
                event = "memory_trimmed",
                released = released.unwrap_or(false),
                duration_us = started.elapsed().as_micros() as u64,
                "returned freed heap pages to the system"
            );
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() -> bool {
    // SAFETY: malloc_trim only walks glibc's own arenas (under their locks) and madvises free
    // pages away; it has no preconditions.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() -> bool {
    false
}

pub struct Drain(pub Arc<Gateway>);

/// Every session has ended and logged it: tickets cover upgrades still connecting to their
/// backend; registrations are dropped only after the `session_ended` line is written.
async fn sessions_gone(gw: &Gateway) {
    gw.admission.wait_idle().await;
    gw.sessions.wait_empty().await;
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = &self.0;
        if shutdown.wait_for(|down| *down).await.is_err() {
            return;
        }
        gw.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let live = gw.sessions.len();
        let drain = gw.config().server.drain;
        tracing::info!(
            event = "draining",
            sessions = live,
            drain_seconds = drain.as_secs(),
            "shutting down: {live} live sessions get up to {}s",
            drain.as_secs()
        );
        // Tickets, not registry entries: an upgrade still connecting to its backend holds a
        // ticket before it registers, and must get its 1001 too.
        if tokio::time::timeout(drain, sessions_gone(gw))
            .await
            .is_err()
        {
            // From here on new upgrades are refused (503 `draining`) and live ones closed.
            gw.admission.set_draining();
            let closed = gw.sessions.close_all_from_now(CloseCode::GoingAway);
            tracing::info!(
                event = "draining",
                sessions = closed,
                "drain deadline reached: closing with 1001"
            );
            let _ = tokio::time::timeout(CLOSE_GRACE, sessions_gone(gw)).await;
        }
        // Other replicas stop counting this one's sessions now rather than when they expire.
        let directory = gw.router.directory();
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            directory.board().leave(directory.replica()),
        )
        .await;
        tracing::info!(event = "shutdown_complete", "all sessions closed; exiting");
        std::process::exit(0);
    }
}
