//! The registry of live sessions: their ids (for `/admin/sessions` and logs) and a control
//! handle each, so drain, kick, revocation and expiry all reach a session the same way: one
//! watch channel per session carrying the close code to end it with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::bridge::CloseCode;

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub conn_id: u64,
    pub session_id: String,
    pub user_id: String,
    pub pool: String,
    pub backend: String,
    pub jti: Option<String>,
    /// The token's `exp` (unix seconds): when the session's authorization runs out.
    pub token_exp: u64,
    pub client_addr: Option<SocketAddr>,
    pub started: Instant,
    /// Wall-clock start (unix ms), for the pin written back to a store that lost it.
    pub started_at_ms: u64,
}

struct Entry {
    info: SessionInfo,
    control: watch::Sender<Option<CloseCode>>,
}

pub struct Registry {
    entries: Mutex<HashMap<u64, Entry>>,
    next_conn_id: AtomicU64,
    count: watch::Sender<usize>,
    /// Set by [`Registry::close_all_from_now`]: sessions registering afterwards (their upgrade
    /// was already under way) start closed with this code.
    closing: Mutex<Option<CloseCode>>,
}

/// Removes the session from the registry when the session task ends, however it ends.
pub struct Registration {
    registry: Arc<Registry>,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self.registry.lock();
        entries.remove(&self.conn_id);
        // Published under the lock: two sessions ending at once must not publish out of order
        // (a stale 1 after 0 would leave the drain waiting for a session that is gone).
        self.registry.count.send_replace(entries.len());
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            entries: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            count: watch::Sender::new(0),
            closing: Mutex::new(None),
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A process-unique connection id for logs, taken when the request arrives.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// How many connection ids were handed out so far: changes with every new connection.
    pub fn conn_ids_issued(&self) -> u64 {
        self.next_conn_id.load(Ordering::Relaxed)
    }

    pub fn register(
        self: &Arc<Self>,
        info: SessionInfo,
    ) -> (Registration, watch::Receiver<Option<CloseCode>>) {
        let closing = *self.closing.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, rx) = watch::channel(closing);
        let conn_id = info.conn_id;
        let mut entries = self.lock();
        entries.insert(conn_id, Entry { info, control: tx });
        self.count.send_replace(entries.len());
        (
            Registration {
                registry: Arc::clone(self),
                conn_id,
            },
            rx,
        )
    }

    /// Ask every session matching `pred` to close with `code`; returns how many were asked.
    pub fn close_where(&self, code: CloseCode, pred: impl Fn(&SessionInfo) -> bool) -> usize {
        let entries = self.lock();
        let mut n = 0;
        for entry in entries.values().filter(|e| pred(&e.info)) {
            // Only the first reason sticks: a session already closing keeps its code.
            entry.control.send_if_modified(|current| {
                if current.is_none() {
                    *current = Some(code);
                    true
                } else {
                    false
                }
            });
            n += 1;
        }
        n
    }

    pub fn close_all(&self, code: CloseCode) -> usize {
        self.close_where(code, |_| true)
    }

    /// Close every session with `code`, including those that register later (drain).
    pub fn close_all_from_now(&self, code: CloseCode) -> usize {
        *self.closing.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
        self.close_all(code)
    }

    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// Close one connection with `code` once `after` has passed (token expiry); never returns,
    /// so it can sit in a `select!` next to the relay.
    pub async fn close_after(
        &self,
        conn_id: u64,
        after: Duration,
        code: CloseCode,
    ) -> std::convert::Infallible {
        tokio::time::sleep(after).await;
        self.close_where(code, |s| s.conn_id == conn_id);
        std::future::pending().await
    }

    /// Resolves once no session is live.
    pub async fn wait_empty(&self) {
        let mut rx = self.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(conn_id: u64, user: &str) -> SessionInfo {
        SessionInfo {
            conn_id,
            session_id: format!("s{conn_id}"),
            user_id: user.into(),
            pool: "default".into(),
            backend: "a".into(),
            jti: None,
            token_exp: 0,
            client_addr: None,
            started: Instant::now(),
            started_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn close_reaches_matching_sessions_and_first_code_sticks() {
        let r = Registry::new();
        let (_g1, rx1) = r.register(info(1, "alice"));
        let (_g2, rx2) = r.register(info(2, "bob"));
        assert_eq!(
            r.close_where(CloseCode::Kicked, |s| s.user_id == "alice"),
            1
        );
        assert_eq!(*rx1.borrow(), Some(CloseCode::Kicked));
        assert_eq!(*rx2.borrow(), None);
        r.close_all(CloseCode::GoingAway);
        assert_eq!(*rx1.borrow(), Some(CloseCode::Kicked));
        assert_eq!(*rx2.borrow(), Some(CloseCode::GoingAway));
    }

    #[tokio::test(start_paused = true)]
    async fn close_after_fires_at_the_deadline_only() {
        let r = Registry::new();
        let (_g, rx) = r.register(info(7, "alice"));
        let (_g2, other) = r.register(info(8, "alice"));
        let timer = tokio::spawn({
            let r = Arc::clone(&r);
            async move {
                r.close_after(7, Duration::from_secs(300), CloseCode::TokenExpired)
                    .await
            }
        });
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert_eq!(*rx.borrow(), None, "closed before the token expired");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*rx.borrow(), Some(CloseCode::TokenExpired));
        assert_eq!(*other.borrow(), None, "only the expired connection closes");
        timer.abort();
    }

    #[tokio::test]
    async fn sessions_registering_after_a_drain_start_closed() {
        let r = Registry::new();
        r.close_all_from_now(CloseCode::GoingAway);
        let (_g, rx) = r.register(info(1, "late"));
        assert_eq!(*rx.borrow(), Some(CloseCode::GoingAway));
    }

    #[tokio::test]
    async fn wait_empty_resolves_when_last_session_ends() {
        let r = Registry::new();
        let (g, _rx) = r.register(info(1, "alice"));
        assert_eq!(r.len(), 1);
        let waiter = tokio::spawn({
            let r = Arc::clone(&r);
            async move { r.wait_empty().await }
        });
        drop(g);
        waiter.await.expect("waiter");
        assert!(r.is_empty());
    }
}
