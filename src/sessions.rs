//! The registry of live sessions: their ids (for `/admin/sessions` and logs) and a control
//! handle each, so drain, kick, revocation and expiry all reach a session the same way: one
//! watch channel per session carrying the close code to end it with. A second watch carries
//! the connection's input mode, which the admin switch changes while the session runs.
//! Every change of a session's connections also wakes its event streams ([`streams`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::bridge::CloseCode;

mod streams;
pub use streams::{EventStream, SessionSignal, StreamEnd, StreamInfo, StreamLimits, StreamRefused};

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
    pub role: Role,
    /// Whether the gateway filters this connection's input (terminate mode); a transparent
    /// session's input mode cannot be switched.
    pub input_switchable: bool,
    /// The 101 went out and the session relays (before: admission, placement, backend connect).
    pub connected: bool,
    /// This connection is recorded (contract §12).
    pub recorded: bool,
}

/// How a connection relates to its session (contract §7, §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The pin's owner.
    Owner,
    /// Joined with `share: view`.
    View,
    /// Joined with `share: control`.
    Control,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::View => "view",
            Role::Control => "control",
        }
    }
}

/// A live connection as `/admin/sessions` shows it.
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub info: SessionInfo,
    pub view_only: bool,
}

struct Entry {
    info: SessionInfo,
    control: watch::Sender<Option<CloseCode>>,
    view_only: watch::Sender<bool>,
}

/// What a registered session listens to.
pub struct Control {
    /// The close code to end with, once something asks.
    pub close: watch::Receiver<Option<CloseCode>>,
    /// `true` while the connection's input is dropped (view-only).
    pub view_only: watch::Receiver<bool>,
}

pub struct Registry {
    entries: Mutex<HashMap<u64, Entry>>,
    next_conn_id: AtomicU64,
    count: watch::Sender<usize>,
    /// Set by [`Registry::close_all_from_now`]: sessions registering afterwards (their upgrade
    /// was already under way) start closed with this code.
    closing: Mutex<Option<CloseCode>>,
    streams: streams::Streams,
}

/// Removes the session from the registry when the session task ends, however it ends.
pub struct Registration {
    registry: Arc<Registry>,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self.registry.lock();
        let gone = entries.remove(&self.conn_id);
        // Published under the lock: two sessions ending at once must not publish out of order
        // (a stale 1 after 0 would leave the drain waiting for a session that is gone).
        self.registry.count.send_replace(entries.len());
        if let Some(gone) = gone {
            self.registry.streams.touch(&gone.info.session_id, |_| {});
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            entries: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            count: watch::Sender::new(0),
            closing: Mutex::new(None),
            streams: streams::Streams::default(),
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

    /// Register a live connection that starts with the given input mode.
    pub fn register(
        self: &Arc<Self>,
        info: SessionInfo,
        view_only: bool,
    ) -> (Registration, Control) {
        let closing = *self.closing.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, rx) = watch::channel(closing);
        let (mode_tx, mode_rx) = watch::channel(view_only);
        let conn_id = info.conn_id;
        let session_id = info.session_id.clone();
        let mut entries = self.lock();
        entries.insert(
            conn_id,
            Entry {
                info,
                control: tx,
                view_only: mode_tx,
            },
        );
        self.count.send_replace(entries.len());
        // Lock order: entries, then streams (never the other way round).
        self.streams.touch(&session_id, |_| {});
        (
            Registration {
                registry: Arc::clone(self),
                conn_id,
            },
            Control {
                close: rx,
                view_only: mode_rx,
            },
        )
    }

    /// Fill in what became known after registration (the backend, the role once the pin's
    /// owner is known).
    pub fn update(&self, conn_id: u64, f: impl FnOnce(&mut SessionInfo)) {
        if let Some(entry) = self.lock().get_mut(&conn_id) {
            f(&mut entry.info);
            self.streams.touch(&entry.info.session_id, |_| {});
        }
    }

    /// The connection relays (its 101 went out): it shows in its session's events, and the
    /// session's backend is up again.
    pub fn connected(&self, conn_id: u64, recorded: bool) {
        if let Some(entry) = self.lock().get_mut(&conn_id) {
            entry.info.connected = true;
            entry.info.recorded = recorded;
            self.streams
                .touch(&entry.info.session_id, |s| s.backend_lost = false);
        }
    }

    /// Switch the input mode of every switchable connection matching `pred`; returns how many
    /// connections matched (switched or already in that mode). An admin may hand control to a
    /// `share: view` connection too (a hand-over without reconnecting); its later connections
    /// start view-only again, as the token says.
    pub fn set_view_only(&self, view_only: bool, pred: impl Fn(&SessionInfo) -> bool) -> usize {
        let entries = self.lock();
        let mut n = 0;
        for entry in entries
            .values()
            .filter(|e| pred(&e.info) && e.info.input_switchable)
        {
            n += 1;
            let changed = entry.view_only.send_if_modified(|current| {
                let changed = *current != view_only;
                *current = view_only;
                changed
            });
            if changed {
                self.streams.touch(&entry.info.session_id, |_| {});
                tracing::info!(
                    event = "input_mode_changed",
                    conn_id = entry.info.conn_id,
                    session_id = %entry.info.session_id,
                    user_id = %entry.info.user_id,
                    mode = if view_only { "view_only" } else { "interactive" },
                    "input mode changed"
                );
            }
        }
        n
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
        self.streams.end_all_from_now(StreamEnd::Draining);
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

    /// Every live connection with its current input mode.
    pub fn live(&self) -> Vec<LiveSession> {
        self.lock()
            .values()
            .map(|e| LiveSession {
                info: e.info.clone(),
                view_only: *e.view_only.borrow(),
            })
            .collect()
    }

    /// The live connections of one session with their input modes.
    pub fn session(&self, session_id: &str) -> Vec<LiveSession> {
        self.lock()
            .values()
            .filter(|e| e.info.session_id == session_id)
            .map(|e| LiveSession {
                info: e.info.clone(),
                view_only: *e.view_only.borrow(),
            })
            .collect()
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
impl SessionInfo {
    /// A connection of `user` on backend `a` of the default pool, for unit tests.
    pub(crate) fn for_test(conn_id: u64, user: &str) -> SessionInfo {
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
            role: Role::Owner,
            input_switchable: true,
            connected: true,
            recorded: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(conn_id: u64, user: &str) -> SessionInfo {
        SessionInfo::for_test(conn_id, user)
    }

    impl Registry {
        fn register_for_test(
            self: &Arc<Self>,
            info: SessionInfo,
        ) -> (Registration, watch::Receiver<Option<CloseCode>>) {
            let (reg, control) = self.register(info, false);
            (reg, control.close)
        }
    }

    #[tokio::test]
    async fn input_mode_switch_reaches_matching_connections_only() {
        let r = Registry::new();
        let (_g1, c1) = r.register(info(1, "alice"), false);
        let (_g2, c2) = r.register(info(2, "bob"), false);
        let viewer = SessionInfo {
            role: Role::View,
            ..info(3, "carol")
        };
        let (_g3, c3) = r.register(viewer, true);
        assert_eq!(r.set_view_only(true, |s| s.user_id == "alice"), 1);
        assert!(*c1.view_only.borrow());
        assert!(!*c2.view_only.borrow());
        // Hand-over: the viewer gets control, the owner becomes view-only.
        assert_eq!(r.set_view_only(false, |s| s.role == Role::View), 1);
        assert_eq!(r.set_view_only(true, |s| s.role == Role::Owner), 2);
        assert!(*c1.view_only.borrow() && *c2.view_only.borrow());
        assert!(!*c3.view_only.borrow());
    }

    #[tokio::test]
    async fn close_reaches_matching_sessions_and_first_code_sticks() {
        let r = Registry::new();
        let (_g1, rx1) = r.register_for_test(info(1, "alice"));
        let (_g2, rx2) = r.register_for_test(info(2, "bob"));
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
        let (_g, rx) = r.register_for_test(info(7, "alice"));
        let (_g2, other) = r.register_for_test(info(8, "alice"));
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
    async fn wait_empty_resolves_when_last_session_ends() {
        let r = Registry::new();
        let (g, _rx) = r.register_for_test(info(1, "alice"));
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
