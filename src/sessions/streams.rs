//! The bookkeeping behind `GET /vncgate/events` (contract §14): one signal per session id that
//! has event streams open, bumped by the registry whenever that session's connections change
//! (join, leave, role, input mode, backend lost), and the open streams themselves, so their
//! limits hold and a revocation or a drain ends them. A session without streams costs one
//! lookup in an empty map per change.
//!
//! The signal carries no snapshot: a stream that wakes up reads the session's connections from
//! the registry, so a burst of changes coalesces into one look (a watch keeps the latest only)
//! and nothing can arrive out of order.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::Registry;

/// What a session's event streams wake up on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionSignal {
    /// Bumped on every change of the session's connections.
    pub seq: u64,
    /// A connection of the session lost its backend (1013) and none has connected since.
    pub backend_lost: bool,
}

/// Why the gateway ends a stream before its token expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The token's `jti` was revoked.
    Revoked,
    /// The gateway is shutting down or handing over to a new process.
    Draining,
}

impl StreamEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Revoked => "token_revoked",
            StreamEnd::Draining => "draining",
        }
    }
}

/// How many streams may be open: per session id, per user (`sub`), in the whole process.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub per_session: usize,
    pub per_user: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamRefused {
    #[error("too many event streams for this session")]
    PerSession,
    #[error("too many event streams for this user")]
    PerUser,
    #[error("the gateway has as many event streams as it takes")]
    Total,
}

/// Who an open stream is for.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub session_id: String,
    pub user_id: String,
    pub jti: Option<String>,
}

struct Topic {
    signal: watch::Sender<SessionSignal>,
    streams: usize,
}

struct Open {
    info: StreamInfo,
    end: watch::Sender<Option<StreamEnd>>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    per_user: HashMap<String, usize>,
    open: HashMap<u64, Open>,
    /// Set at the drain's start: streams opened afterwards start ended.
    ending: Option<StreamEnd>,
}

#[derive(Default)]
pub(super) struct Streams(Mutex<State>);

impl Streams {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bump the session's signal (and apply `f` to it) if it has streams.
    pub(super) fn touch(&self, session_id: &str, f: impl FnOnce(&mut SessionSignal)) {
        if let Some(topic) = self.lock().topics.get(session_id) {
            topic.signal.send_modify(|s| {
                s.seq = s.seq.wrapping_add(1);
                f(s);
            });
        }
    }

    pub(super) fn end_where(&self, end: StreamEnd, pred: impl Fn(&StreamInfo) -> bool) -> usize {
        let state = self.lock();
        let mut n = 0;
        for open in state.open.values().filter(|o| pred(&o.info)) {
            open.end.send_if_modified(|current| {
                let first = current.is_none();
                if first {
                    *current = Some(end);
                }
                first
            });
            n += 1;
        }
        n
    }

    pub(super) fn end_all_from_now(&self, end: StreamEnd) -> usize {
        self.lock().ending = Some(end);
        self.end_where(end, |_| true)
    }

    pub(super) fn len(&self) -> usize {
        self.lock().open.len()
    }
}

/// An open event stream: what it wakes up on. Dropping it frees its slots.
pub struct EventStream {
    registry: Arc<Registry>,
    id: u64,
    pub signal: watch::Receiver<SessionSignal>,
    pub end: watch::Receiver<Option<StreamEnd>>,
}

impl Registry {
    /// Open an event stream (`id`: its connection id) for `info.session_id`, within `limits`.
    pub fn open_stream(
        self: &Arc<Self>,
        id: u64,
        info: StreamInfo,
        limits: StreamLimits,
    ) -> Result<EventStream, StreamRefused> {
        let mut state = self.streams.lock();
        if state.open.len() >= limits.total {
            return Err(StreamRefused::Total);
        }
        if state.per_user.get(&info.user_id).copied().unwrap_or(0) >= limits.per_user {
            return Err(StreamRefused::PerUser);
        }
        let on_session = state.topics.get(&info.session_id).map_or(0, |t| t.streams);
        if on_session >= limits.per_session {
            return Err(StreamRefused::PerSession);
        }
        let signal = match state.topics.entry(info.session_id.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().streams += 1;
                e.get().signal.subscribe()
            }
            Entry::Vacant(e) => {
                let (signal, rx) = watch::channel(SessionSignal::default());
                e.insert(Topic { signal, streams: 1 });
                rx
            }
        };
        *state.per_user.entry(info.user_id.clone()).or_default() += 1;
        let (end, end_rx) = watch::channel(state.ending);
        state.open.insert(id, Open { info, end });
        Ok(EventStream {
            registry: Arc::clone(self),
            id,
            signal,
            end: end_rx,
        })
    }

    /// End the open streams matching `pred` with `end`; returns how many matched.
    pub fn end_streams_where(&self, end: StreamEnd, pred: impl Fn(&StreamInfo) -> bool) -> usize {
        self.streams.end_where(end, pred)
    }

    /// How many event streams are open.
    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// A connection of `session_id` lost its backend (the bridge closed it with 1013): its
    /// event streams say `backend: lost` until a connection of the session relays again.
    pub fn backend_lost(&self, session_id: &str) {
        self.streams.touch(session_id, |s| s.backend_lost = true);
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let mut state = self.registry.streams.lock();
        let Some(open) = state.open.remove(&self.id) else {
            return;
        };
        let StreamInfo {
            session_id,
            user_id,
            ..
        } = open.info;
        if let Entry::Occupied(mut e) = state.per_user.entry(user_id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if let Entry::Occupied(mut e) = state.topics.entry(session_id) {
            e.get_mut().streams -= 1;
            if e.get().streams == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: StreamLimits = StreamLimits {
        per_session: 2,
        per_user: 2,
        total: 3,
    };

    fn info(sid: &str, user: &str, jti: Option<&str>) -> StreamInfo {
        StreamInfo {
            session_id: sid.into(),
            user_id: user.into(),
            jti: jti.map(Into::into),
        }
    }

    #[test]
    fn limits_hold_and_dropping_a_stream_frees_its_slots() {
        let r = Registry::new();
        let a1 = r
            .open_stream(1, info("s", "alice", None), LIMITS)
            .expect("a1");
        let _a2 = r
            .open_stream(2, info("t", "alice", None), LIMITS)
            .expect("a2");
        let refused = r.open_stream(3, info("u", "alice", None), LIMITS).err();
        assert_eq!(refused, Some(StreamRefused::PerUser));
        let _b = r.open_stream(4, info("s", "bob", None), LIMITS).expect("b");
        let refused = r.open_stream(5, info("s", "carol", None), LIMITS).err();
        assert_eq!(refused, Some(StreamRefused::Total));
        drop(a1);
        assert_eq!(r.streams_open(), 2);
        let _d = r
            .open_stream(6, info("s", "dave", None), LIMITS)
            .expect("alice's slot on s was freed");
        let refused = r.open_stream(7, info("s", "erin", None), LIMITS).err();
        assert_eq!(refused, Some(StreamRefused::Total));
        let big = StreamLimits {
            total: 10,
            ..LIMITS
        };
        let refused = r.open_stream(8, info("s", "erin", None), big).err();
        assert_eq!(refused, Some(StreamRefused::PerSession));
    }

    #[tokio::test]
    async fn changes_reach_the_sessions_streams_only() {
        let r = Registry::new();
        let mut s = r
            .open_stream(1, info("s", "alice", None), LIMITS)
            .expect("s");
        let t = r
            .open_stream(2, info("t", "alice", None), LIMITS)
            .expect("t");
        r.backend_lost("s");
        assert!(s.signal.has_changed().expect("open"));
        assert!(s.signal.borrow_and_update().backend_lost);
        assert!(!t.signal.has_changed().expect("open"));
        r.backend_lost("nobody-listens");
        drop(s);
        r.backend_lost("s");
        assert!(!t.signal.has_changed().expect("open"));
    }

    #[test]
    fn revocation_ends_the_tokens_streams_and_a_drain_ends_later_ones_too() {
        let r = Registry::new();
        let a = r
            .open_stream(1, info("s", "alice", Some("j1")), LIMITS)
            .expect("a");
        let b = r
            .open_stream(2, info("s", "bob", Some("j2")), LIMITS)
            .expect("b");
        let n = r.end_streams_where(StreamEnd::Revoked, |s| s.jti.as_deref() == Some("j1"));
        assert_eq!(n, 1);
        assert_eq!(*a.end.borrow(), Some(StreamEnd::Revoked));
        assert_eq!(*b.end.borrow(), None);
        r.close_all_from_now(crate::bridge::CloseCode::GoingAway);
        assert_eq!(
            *a.end.borrow(),
            Some(StreamEnd::Revoked),
            "the first reason sticks"
        );
        assert_eq!(*b.end.borrow(), Some(StreamEnd::Draining));
        drop(a);
        let late = r
            .open_stream(3, info("s", "carol", None), LIMITS)
            .expect("late");
        assert_eq!(*late.end.borrow(), Some(StreamEnd::Draining));
    }
}
