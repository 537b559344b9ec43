//! Build Pingora's `Server` from the resolved config and run it.
//!
//! Services: the public listeners ([`gateway::App`]), the admin listener, and three background
//! tasks: backend health checks, the readiness announcer (logs `listening` once each socket
//! accepts), and the drain supervisor (on SIGTERM/upgrade: refuse new sessions, give live ones
//! `server.drain_seconds`, close the rest with 1001, exit 0 as soon as none is left).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::protocols::ALPN;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{BackgroundService, background_service};
use pingora_core::services::listening::Service;

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::auth::jwks::Jwks;
use crate::bridge::CloseCode;
use crate::config::{Config, StoreKind};
use crate::control;
use crate::gateway::admin::AdminApp;
use crate::gateway::{App, Gateway};
use crate::metrics::Metrics;
use crate::readiness;
use crate::routing::redis::{LivePins, RedisStore};
use crate::routing::{Health, MemoryStore, Pin, Router, SessionStore};

/// After the drain deadline, how long closing handshakes may take before the process exits.
const CLOSE_GRACE: Duration = Duration::from_secs(6);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Keys(#[from] crate::auth::verify::KeyError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listeners[{index}].tls: {message}")]
    Tls { index: usize, message: String },
    #[error("store.redis_url_env: {0}")]
    Store(String),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    pub upgrade: bool,
    pub daemon: bool,
}

/// Everything the process shares, built from the config; plus the Redis store when configured,
/// whose supervisor and event subscriber run as background services.
pub fn build_gateway(
    config: Config,
) -> Result<(Arc<Gateway>, Option<Arc<RedisStore>>), StartError> {
    let metrics = Arc::new(Metrics::new(&config)?);
    let verifier = Verifier::new(&config.auth)?;
    let (store, redis): (Arc<dyn SessionStore>, _) = match &config.store.kind {
        StoreKind::Memory => (Arc::new(MemoryStore::new()), None),
        StoreKind::Redis { url } => {
            let redis =
                RedisStore::new(url.expose(), &config.store.key_prefix, Arc::clone(&metrics))
                    .map_err(|e| StartError::Store(e.to_string()))?;
            (Arc::clone(&redis) as Arc<dyn SessionStore>, Some(redis))
        }
    };
    let health = Arc::new(Health::new(&config, &metrics));
    let limits = &config.limits;
    let admission = Admission::new(
        limits.max_sessions,
        limits.max_sessions_per_user,
        limits.auth_failures_per_minute,
    );
    let router = Router::new(
        store,
        redis.is_some(),
        health,
        config.store.session_idle_ttl,
    );
    let gw = Arc::new(Gateway {
        config: Arc::new(config),
        verifier,
        admission,
        router,
        sessions: crate::sessions::Registry::new(),
        metrics,
    });
    Ok((gw, redis))
}

/// Run until shut down. Returns only on a start-up error; otherwise Pingora exits the process.
pub fn run(config: Config, opts: RunOptions) -> Result<(), StartError> {
    if config.auth.allowed_origins.is_empty() {
        tracing::warn!(
            event = "config_warning",
            key = "auth.allowed_origins",
            "auth.allowed_origins is empty: any web page may open sessions with a user's token"
        );
    }
    let (gw, redis) = build_gateway(config)?;
    let config = Arc::clone(&gw.config);

    let conf = ServerConf {
        threads: config.server.threads,
        pid_file: config.server.pid_file.display().to_string(),
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        daemon: opts.daemon,
        // Pingora sleeps this long after the shutdown flag flips; the drain supervisor exits
        // earlier as soon as the sessions are gone, so this is only the outer bound.
        grace_period_seconds: Some(config.server.drain.as_secs() + CLOSE_GRACE.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut public = Service::new("vncgate".to_owned(), App(Arc::clone(&gw)));
    for (index, listener) in config.listeners.iter().enumerate() {
        let addr = listener.addr.to_string();
        match &listener.tls {
            None => public.add_tcp(&addr),
            Some(tls) => {
                let cert = tls.cert.display().to_string();
                let key = tls.key.display().to_string();
                let mut settings =
                    TlsSettings::intermediate(&cert, &key).map_err(|e| StartError::Tls {
                        index,
                        message: e.to_string(),
                    })?;
                // HTTP/1.1 only: WebSocket over HTTP/2 (RFC 8441) is not what noVNC speaks.
                settings.set_alpn(ALPN::H1);
                public.add_tls_with_settings(&addr, None, settings);
            }
        }
    }
    server.add_service(public);

    let mut announce: Vec<(readiness::Kind, SocketAddr)> = config
        .listeners
        .iter()
        .map(|l| {
            (
                if l.tls.is_some() {
                    readiness::Kind::Tls
                } else {
                    readiness::Kind::Plain
                },
                l.addr,
            )
        })
        .collect();
    if let Some(admin) = &config.admin {
        let mut service = Service::new("vncgate-admin".to_owned(), AdminApp(Arc::clone(&gw)));
        // Probes and scrapes are light; the data path keeps `server.threads` to itself.
        service.threads = Some(1);
        service.add_tcp(&admin.addr.to_string());
        server.add_service(service);
        announce.push((readiness::Kind::Admin, admin.addr));
    }

    server.add_service(background_service(
        "health-checks",
        HealthChecks(Arc::clone(&gw)),
    ));
    if let Some(redis) = redis {
        server.add_service(background_service(
            "store-supervisor",
            StoreSupervisor(Arc::clone(&gw), redis),
        ));
    }
    if let Some(jwks) = gw.verifier.jwks() {
        server.add_service(background_service(
            "jwks-refresh",
            JwksRefresh(Arc::clone(jwks)),
        ));
    }
    server.add_service(background_service("readiness", Announcer(announce)));
    server.add_service(background_service("drain", Drain(Arc::clone(&gw))));
    server.run_forever();
}

struct HealthChecks(Arc<Gateway>);

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let health = Arc::clone(self.0.router.health());
        tokio::select! {
            _ = health.run_checks() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Keeps the Redis connection (reconnect, write-back) and the `{prefix}events` subscription.
struct StoreSupervisor(Arc<Gateway>, Arc<RedisStore>);

#[async_trait]
impl BackgroundService for StoreSupervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = Arc::clone(&self.0);
        let sessions = Arc::clone(&gw.sessions);
        let live_pins: LivePins = Arc::new(move || {
            sessions
                .list()
                .into_iter()
                .map(|s| {
                    let pin = Pin {
                        backend: s.backend,
                        pool: s.pool,
                        owner: s.user_id,
                        created_at_ms: s.started_at_ms,
                        updated_at_ms: s.started_at_ms,
                    };
                    (s.session_id, pin)
                })
                .collect()
        });
        tokio::select! {
            _ = Arc::clone(&self.1).run_supervisor(live_pins) => {}
            _ = Arc::clone(&self.1).run_subscriber(control::subscriber(gw)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

struct JwksRefresh(Arc<Jwks>);

#[async_trait]
impl BackgroundService for JwksRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = Arc::clone(&self.0).run_refresh() => {}
            _ = shutdown.changed() => {}
        }
    }
}

struct Announcer(Vec<(readiness::Kind, SocketAddr)>);

#[async_trait]
impl BackgroundService for Announcer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        readiness::announce(&self.0).await;
    }
}

struct Drain(Arc<Gateway>);

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = &self.0;
        if shutdown.wait_for(|down| *down).await.is_err() {
            return;
        }
        gw.admission.set_draining();
        let live = gw.sessions.len();
        let drain = gw.config.server.drain;
        tracing::info!(
            event = "draining",
            sessions = live,
            drain_seconds = drain.as_secs(),
            "shutting down: {live} live sessions get up to {}s",
            drain.as_secs()
        );
        // Tickets, not registry entries: an upgrade still connecting to its backend holds a
        // ticket before it registers, and must get its 1001 too.
        if tokio::time::timeout(drain, gw.admission.wait_idle())
            .await
            .is_err()
        {
            let closed = gw.sessions.close_all_from_now(CloseCode::GoingAway);
            tracing::info!(
                event = "draining",
                sessions = closed,
                "drain deadline reached: closing with 1001"
            );
            let _ = tokio::time::timeout(CLOSE_GRACE, gw.admission.wait_idle()).await;
        }
        tracing::info!(event = "shutdown_complete", "all sessions closed; exiting");
        std::process::exit(0);
    }
}
