//! What a session's event stream shows (contract §14), computed from the registry each time
//! the session's signal wakes the stream, and written as Server-Sent Events: one event per
//! field that changed since the last write.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::sessions::{LiveSession, SessionSignal};

/// The session as the token's holder sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `{"count", "connections": [{"id", "user", "role", "can_type"}]}`: every connection of the
    /// session that relays, on this gateway process, oldest first. Never an address or a token.
    pub viewers: Value,
    /// The input mode of the token holder's own connections: `interactive` when any of them may
    /// type, `view_only` when none may; without a connection, what the token itself starts with.
    pub input_mode: &'static str,
    /// `up`, or `lost`: a connection lost its backend (1013) and none has relayed since, or the
    /// backend's health checks say it is down.
    pub backend: &'static str,
    /// `on` while a connection of the session is recorded.
    pub recording: &'static str,
}

/// What a snapshot is computed from besides the registry.
pub struct Viewer<'a> {
    pub user: &'a str,
    /// The token starts view-only (`view_only` or `share: view`).
    pub token_view_only: bool,
}

impl Snapshot {
    /// `backend_down`: the session's backend fails its health checks.
    pub fn of(
        connections: &[LiveSession],
        viewer: &Viewer<'_>,
        signal: SessionSignal,
        backend_down: bool,
    ) -> Snapshot {
        let mut live: Vec<&LiveSession> = connections.iter().filter(|c| c.info.connected).collect();
        live.sort_by_key(|c| c.info.conn_id);
        let list: Vec<Value> = live
            .iter()
            .map(|c| {
                json!({
                    "id": c.info.conn_id,
                    "user": c.info.user_id,
                    "role": c.info.role.as_str(),
                    "can_type": !c.view_only,
                })
            })
            .collect();
        let mine: Vec<&&LiveSession> = live
            .iter()
            .filter(|c| c.info.user_id == viewer.user)
            .collect();
        let view_only = match mine.is_empty() {
            true => viewer.token_view_only,
            false => mine.iter().all(|c| c.view_only),
        };
        Snapshot {
            viewers: json!({ "count": list.len(), "connections": list }),
            input_mode: if view_only {
                "view_only"
            } else {
                "interactive"
            },
            backend: if signal.backend_lost || backend_down {
                "lost"
            } else {
                "up"
            },
            recording: if live.iter().any(|c| c.info.recorded) {
                "on"
            } else {
                "off"
            },
        }
    }

    /// The events that take a stream from `before` (`None`: nothing sent yet) to `self`.
    pub fn write_changes(&self, before: Option<&Snapshot>, out: &mut String) {
        if before.is_none_or(|b| b.viewers != self.viewers) {
            event(out, "viewers", &self.viewers);
        }
        if before.is_none_or(|b| b.input_mode != self.input_mode) {
            event(out, "input_mode", &json!({ "mode": self.input_mode }));
        }
        if before.is_none_or(|b| b.backend != self.backend) {
            event(out, "backend", &json!({ "state": self.backend }));
        }
        if before.is_none_or(|b| b.recording != self.recording) {
            event(out, "recording", &json!({ "state": self.recording }));
        }
    }
}

/// One event: its name and one `data:` line (compact JSON has no newline in it).
pub fn event(out: &mut String, name: &str, data: &Value) {
    let _ = write!(out, "event: {name}\ndata: {data}\n\n");
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::sessions::{Role, SessionInfo};

    fn conn(id: u64, user: &str, role: Role, view_only: bool, recorded: bool) -> LiveSession {
        LiveSession {
            info: SessionInfo {
                conn_id: id,
                session_id: "s".into(),
                user_id: user.into(),
                pool: "default".into(),
                backend: "a".into(),
                jti: None,
                token_exp: 0,
                client_addr: None,
                started: Instant::now(),
                started_at_ms: 0,
                role,
                input_switchable: true,
                connected: true,
                recorded,
            },
            view_only,
        }
    }

    const ALICE: Viewer<'static> = Viewer {
        user: "alice",
        token_view_only: false,
    };

    #[test]
    fn the_first_write_has_every_field_and_later_ones_only_changes() {
        let owner = conn(1, "alice", Role::Owner, false, false);
        let first = Snapshot::of(
            std::slice::from_ref(&owner),
            &ALICE,
            SessionSignal::default(),
            false,
        );
        let mut out = String::new();
        first.write_changes(None, &mut out);
        assert_eq!(
            out,
            "event: viewers\ndata: {\"connections\":[{\"can_type\":true,\"id\":1,\"role\":\"owner\",\"user\":\"alice\"}],\"count\":1}\n\n\
             event: input_mode\ndata: {\"mode\":\"interactive\"}\n\n\
             event: backend\ndata: {\"state\":\"up\"}\n\n\
             event: recording\ndata: {\"state\":\"off\"}\n\n"
        );
        let viewer = conn(2, "bob", Role::View, true, true);
        let second = Snapshot::of(&[viewer, owner], &ALICE, SessionSignal::default(), false);
        out.clear();
        second.write_changes(Some(&first), &mut out);
        assert!(out.starts_with("event: viewers\n"), "{out}");
        assert!(out.contains("\"user\":\"bob\""));
        assert!(
            out.ends_with("event: recording\ndata: {\"state\":\"on\"}\n\n"),
            "{out}"
        );
        assert!(
            !out.contains("input_mode"),
            "alice's mode did not change: {out}"
        );
        out.clear();
        second.write_changes(Some(&second), &mut out);
        assert_eq!(out, "");
    }

    #[test]
    fn input_mode_is_the_holders_own() {
        let (a1, a2) = (
            conn(1, "alice", Role::Owner, true, false),
            conn(2, "alice", Role::Owner, false, false),
        );
        let bob = conn(3, "bob", Role::Control, false, false);
        let s = |c: &[LiveSession], v: &Viewer<'_>| {
            Snapshot::of(c, v, SessionSignal::default(), false).input_mode
        };
        assert_eq!(s(&[a1.clone(), bob.clone()], &ALICE), "view_only");
        assert_eq!(
            s(&[a1, a2], &ALICE),
            "interactive",
            "one of her tabs may type"
        );
        let carol = Viewer {
            user: "carol",
            token_view_only: true,
        };
        assert_eq!(
            s(&[bob], &carol),
            "view_only",
            "no connection yet: the token's mode"
        );
    }

    #[test]
    fn backend_lost_by_signal_or_health_and_unconnected_ones_hidden() {
        let mut pending = conn(1, "alice", Role::Owner, false, true);
        pending.info.connected = false;
        let lost = SessionSignal {
            seq: 1,
            backend_lost: true,
        };
        let s = Snapshot::of(&[pending.clone()], &ALICE, lost, false);
        assert_eq!((s.backend, s.recording), ("lost", "off"));
        assert_eq!(s.viewers["count"], 0);
        let s = Snapshot::of(&[pending], &ALICE, SessionSignal::default(), true);
        assert_eq!(s.backend, "lost");
    }
}
