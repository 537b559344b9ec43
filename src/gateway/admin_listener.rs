//! The admin listener's accept loop, run by the process itself rather than as a Pingora
//! listening service: Pingora stops every listener it owns when SIGTERM arrives, and then
//! `/metrics` and `/readyz` went dark for the whole drain (up to `server.drain_seconds`), just
//! when an orchestrator and on-call need them. This loop keeps answering until the process exits.
//!
//! A binary upgrade has two processes on the address for a moment: both bind it with
//! `SO_REUSEPORT`. The old process gets SIGQUIT (the hand-over signal) before the new one is
//! started (OPERATIONS.md: "within 5 s"), so it keeps accepting for [`HANDOVER_GRACE`] more,
//! then leaves the address to the new process: probes and scrapes do not alternate between a
//! draining process and its successor for the whole drain. After a SIGTERM it keeps accepting
//! (503 `draining` on `/readyz`) until it exits.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{SignalKind, signal};

use super::Gateway;
use super::admin::AdminApp;
use super::connection::serve_admin_connection;

/// Twice the time the upgrade procedure gives the new process to start and take the sockets.
pub const HANDOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct AdminListener {
    pub gw: Arc<Gateway>,
    pub addr: SocketAddr,
}

/// Bind `addr` so that a second process (a binary upgrade) can bind it too.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[async_trait]
impl BackgroundService for AdminListener {
    async fn start(&self, shutdown: ShutdownWatch) {
        let listener = match bind(self.addr) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(event = "internal_error", addr = %self.addr, error = %e,
                    "cannot bind the admin listener");
                // As Pingora does for a listener it cannot bind: the process is not usable.
                std::process::exit(1);
            }
        };
        let mut handed_over = match signal(SignalKind::quit()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(event = "internal_error", error = %e,
                    "cannot watch SIGQUIT; the admin listener will serve until exit");
                None
            }
        };
        let app = Arc::new(AdminApp(Arc::clone(&self.gw)));
        let mut leave_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else {
                        // Out of descriptors, most likely: give the process a moment rather
                        // than spinning on the same error.
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    };
                    let limits = self.gw.config().limits.clone();
                    tokio::spawn(serve_admin_connection(Arc::clone(&app), tcp, limits, shutdown.clone()));
                }
                _ = async {
                    match handed_over.as_mut() {
                        Some(s) if leave_at.is_none() => { s.recv().await; }
                        _ => std::future::pending::<()>().await,
                    }
                } => {
                    leave_at = Some(tokio::time::Instant::now() + HANDOVER_GRACE);
                }
                _ = async {
                    match leave_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    tracing::info!(event = "admin_listener_closed",
                        "binary upgrade: the admin address is the new process's from now on");
                    return;
                }
            }
        }
    }
}
