//! The Pingora app: one [`Gateway`] shared by every connection of the public listeners.
//!
//! - [`connection`] takes each accepted connection (PROXY header, pre-auth caps in
//!   [`pre_auth`], TLS, request heads under a deadline in `head`) and hands each request to
//!   [`App::serve`], which routes it: a WebSocket upgrade on a configured path ([`upgrade`]),
//!   the session events stream ([`events`]), `/healthz`, a static file from `web_root`
//!   ([`static_files`]), or 404.
//! - [`refusal`] is the one table from any refusal to its HTTP status and contract code.
//! - [`admin`] is the separate admin listener (`/healthz`, `/readyz`, `/metrics`, `/admin/*`).

pub mod admin;
mod admin_backends;
pub mod admin_listener;
mod admin_recordings;
pub mod connection;
pub mod events;
pub mod handshake;
mod head;
pub mod pre_auth;
mod proxy_header;
pub mod refusal;
pub mod reload;
mod respond;
pub mod static_files;
pub mod tls;
mod upgrade;

use std::sync::Arc;

use http::StatusCode;
use pingora_core::apps::ReusedHttpStream;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::sessions::Registry;
use arc_swap::ArcSwap;
use refusal::{ErrorCode, Refusal};
use std::sync::atomic::AtomicBool;
use tokio::sync::Notify;

/// How long an idle keep-alive connection may wait for its next request.
pub(crate) const KEEPALIVE_SECONDS: u64 = 60;

/// Everything a connection needs. The config and the verifier are swapped whole by a reload
/// (each request reads one snapshot of each); the rest lives for the whole process.
pub struct Gateway {
    config: ArcSwap<Config>,
    verifier: ArcSwap<Verifier>,
    pub admission: Arc<Admission>,
    pub router: Arc<Router>,
    pub sessions: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// One certificate slot per listener (`None` for plain ones), in config order.
    pub tls: Vec<Option<Arc<tls::CertSlot>>>,
    /// Woken after every successful reload (background tasks that follow the config restart).
    pub reloaded: Notify,
    /// Set when the drain starts (SIGTERM or upgrade): `/readyz` answers 503 from then on.
    pub shutting_down: AtomicBool,
    /// Open connections without a verified token, per client address.
    pub pre_auth: Arc<pre_auth::PreAuth>,
}

impl Gateway {
    pub fn new(
        config: Config,
        verifier: Verifier,
        admission: Arc<Admission>,
        router: Router,
        metrics: Arc<Metrics>,
        tls: Vec<Option<Arc<tls::CertSlot>>>,
    ) -> Gateway {
        let pre_auth = pre_auth::PreAuth::new(metrics.edge.pre_auth_connections.clone());
        Gateway {
            pre_auth,
            config: ArcSwap::from_pointee(config),
            verifier: ArcSwap::from_pointee(verifier),
            admission,
            router: Arc::new(router),
            sessions: Registry::new(),
            metrics,
            tls,
            reloaded: Notify::new(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The current config (a snapshot: a reload does not change it under the caller).
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn verifier(&self) -> Arc<Verifier> {
        self.verifier.load_full()
    }

    /// What every refused request counts, whatever it asked for (an upgrade, the events
    /// stream): an authentication failure in `vncgate_auth_failures_total`, and against the
    /// client address's throttle when the code counts toward it.
    pub(crate) fn count_refusal(&self, code: ErrorCode, ip: Option<std::net::IpAddr>) {
        if code.is_auth_failure() {
            self.metrics
                .auth_failures_total
                .with_label_values(&[code.as_str()])
                .inc();
        }
        if code.counts_toward_throttle()
            && let Some(ip) = ip
        {
            self.admission.record_auth_failure(ip);
        }
    }
}

/// The public listeners' app (its accept path is in [`connection`]).
pub struct App {
    pub gw: Arc<Gateway>,
    pub listeners: Vec<connection::ListenerSpec>,
}

/// Where [`App::serve`] sends one request.
enum Route {
    Upgrade,
    Events,
    /// `/healthz`, a static file, or 404: answered in [`App::answer`].
    Other {
        path: String,
    },
}

impl App {
    /// One request whose head has been read.
    pub async fn serve(
        &self,
        session: ServerSession,
        conn: &mut connection::Connection,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Every step but the upgrade is boxed: this future lives as long as the connection
        // (a whole session), and an inline step would add its own size to every session. The
        // request is read and routed in a box that hands the session back by value: borrowed
        // here, it would keep its storage (680 bytes) in this future beside the upgrade's.
        let (session, route) = Box::pin(self.route(session, shutdown)).await?;
        let gw = &self.gw;
        match route {
            Route::Upgrade => upgrade::handle(gw, session, conn).await,
            Route::Events => Box::pin(events::handle(gw, session, conn)).await,
            Route::Other { path } => Box::pin(self.answer(session, path)).await,
        }
    }

    /// Read the request's head and find its route; `None` once the request was refused.
    async fn route(
        &self,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<(ServerSession, Route)> {
        if !respond::read_request(&mut session, shutdown).await {
            return None;
        }
        let path = session.req_header().uri.path().to_owned();
        let config = self.gw.config();
        let route = if config.paths.contains(&path) {
            Route::Upgrade
        } else if path == config.events_path {
            Route::Events
        } else {
            Route::Other { path }
        };
        Some((session, route))
    }

    /// `/healthz`, a static file from `web_root`, or 404.
    async fn answer(&self, session: ServerSession, path: String) -> Option<ReusedHttpStream> {
        let config = self.gw.config();
        let method = session.req_header().method.clone();
        let readable = method == http::Method::GET || method == http::Method::HEAD;
        if readable && path == "/healthz" {
            return respond::json(
                session,
                StatusCode::OK,
                serde_json::json!({"status": "ok"}),
                &[],
            )
            .await;
        }
        let session = match &config.web_root {
            Some(root) if readable => match static_files::serve(session, root, &path).await {
                Ok(answered) => return answered,
                Err(not_found) => not_found,
            },
            _ => session,
        };
        let refusal = Refusal::new(ErrorCode::NotFound, "no such path");
        respond::send(
            session,
            StatusCode::NOT_FOUND,
            "application/json",
            refusal.body(),
            &[],
        )
        .await
    }
}
