//! Build Pingora's `Server` from the resolved config and run it: the public listeners
//! ([`crate::gateway::App`], plain and TLS), the admin listener, and the background services of
//! [`crate::services`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

// Unbuffered L4 streams: after the 101 the WebSocket layer has its own buffer, and Pingora's
// default 64 KiB read buffer would add a copy on the data path and memory to every session.
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::Server;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::config::{Config, StoreKind};
use crate::gateway::admin_listener::AdminListener;
use crate::gateway::connection::ListenerSpec;
use crate::gateway::tls::CertSlot;
use crate::gateway::{App, Gateway};
use crate::metrics::Metrics;
use crate::readiness;
use crate::routing::board::{BackendBoard, LocalBoard};
use crate::routing::directory::Directory;
use crate::routing::redis::RedisStore;
use crate::routing::resolve::Resolver;
use crate::routing::{Health, MemoryStore, Router, SessionStore};
use crate::services::{
    Announcer, BoardSync, CLOSE_GRACE, Drain, HealthChecks, JwksRefresh, MemoryTrim,
    RecordingRetention, Reloader, StoreSupervisor,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Keys(#[from] crate::auth::verify::KeyError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{message}")]
    Tls { message: String },
    #[error("{0}")]
    Certificate(#[from] crate::gateway::tls::TlsError),
    #[error("store: {0}")]
    Store(String),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub upgrade: bool,
    pub daemon: bool,
    /// The file SIGHUP re-reads.
    pub config_path: Option<PathBuf>,
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
        StoreKind::Redis { topology } => {
            let redis = RedisStore::new(topology, &config.store.key_prefix, Arc::clone(&metrics))
                .map_err(|e| StartError::Store(e.to_string()))?;
            (Arc::clone(&redis) as Arc<dyn SessionStore>, Some(redis))
        }
    };
    // Certificates are loaded here, not by Pingora: a bad file is an error naming the key
    // (Pingora would panic), and the slots let a reload swap in renewed certificates.
    let mut tls = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        tls.push(match &listener.tls {
            Some(files) => Some(CertSlot::new(crate::gateway::tls::load(
                index,
                &files.cert,
                &files.key,
            )?)),
            None => None,
        });
    }
    let health = Arc::new(Health::new(&config, &metrics));
    let limits = &config.limits;
    let admission = Admission::new(
        limits.max_sessions,
        limits.max_sessions_per_user,
        limits.auth_failures_per_minute,
    );
    let board: Arc<dyn BackendBoard> = match &redis {
        Some(redis) => Arc::clone(redis) as Arc<dyn BackendBoard>,
        None => Arc::new(LocalBoard::default()),
    };
    let directory = Arc::new(Directory::new(board, Arc::clone(&metrics)));
    let resolver = Resolver::new(metrics.directory.discovery_lookups_total.clone());
    let router = Router::new(
        store,
        redis.is_some(),
        health,
        config.store.session_idle_ttl,
        directory,
        resolver,
    );
    let gw = Arc::new(Gateway::new(
        config, verifier, admission, router, metrics, tls,
    ));
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
    let config = gw.config();

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

    // Every public listener is plain TCP for Pingora: the PROXY header, TLS and the request
    // deadlines are handled by the app (`gateway::connection`).
    let listeners = ListenerSpec::from_config(&config, &gw.tls).map_err(|e| StartError::Tls {
        message: e.to_string(),
    })?;
    let app = App {
        gw: Arc::clone(&gw),
        listeners,
    };
    let mut public = Service::new("vncgate".to_owned(), app);
    for listener in &config.listeners {
        public.add_listener(
            ListenerConfig::tcp(&listener.addr.to_string()[..])
                .l4_buffer(L4BufferSettings::unbuffered()),
        );
    }
    server.add_service(public);

    let mut announce: Vec<(readiness::Kind, SocketAddr)> = config
        .listeners
        .iter()
        .map(|l| {
            (
                // A PROXY protocol listener takes a header before TLS: a TCP connect is the
                // probe (closing without a byte is not counted as a refusal).
                if l.tls.is_some() && l.proxy_protocol.is_none() {
                    readiness::Kind::Tls
                } else {
                    readiness::Kind::Plain
                },
                l.addr,
            )
        })
        .collect();
    if let Some(admin) = &config.admin {
        // A background service (its own runtime thread, so the data path keeps
        // `server.threads` to itself), not a Pingora listener: it must outlive SIGTERM.
        server.add_service(background_service(
            "admin",
            AdminListener {
                gw: Arc::clone(&gw),
                addr: admin.addr,
            },
        ));
        announce.push((readiness::Kind::Admin, admin.addr));
    }

    server.add_service(background_service(
        "health-checks",
        HealthChecks(Arc::clone(&gw)),
    ));
    server.add_service(background_service(
        "recording-retention",
        RecordingRetention(Arc::clone(&gw)),
    ));
    server.add_service(background_service(
        "backend-board",
        BoardSync(Arc::clone(&gw)),
    ));
    server.add_service(background_service(
        "jwks-refresh",
        JwksRefresh(Arc::clone(&gw)),
    ));
    if let Some(redis) = redis {
        server.add_service(background_service(
            "store-supervisor",
            StoreSupervisor(Arc::clone(&gw), redis),
        ));
    }
    let reloader = Reloader {
        gw: Arc::clone(&gw),
        path: opts.config_path.clone(),
    };
    server.add_service(background_service("reload", reloader));
    server.add_service(background_service("readiness", Announcer(announce)));
    server.add_service(background_service(
        "memory-trim",
        MemoryTrim(Arc::clone(&gw)),
    ));
    server.add_service(background_service("drain", Drain(Arc::clone(&gw))));
    server.run_forever();
}
