//! Acting on live sessions on purpose: kick by session id, revocation by `jti`, and the input
//! mode switch (view-only / interactive), on this replica and, through the store's
//! `{prefix}events` channel, on every other one. Expiry and drain use the same per-session
//! control channels (see [`crate::sessions`]), without the broadcast.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bridge::CloseCode;
use crate::gateway::Gateway;

/// What travels on `{prefix}events` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlEvent {
    Kick {
        session_id: String,
    },
    Revoke {
        jti: String,
        ttl_ms: u64,
    },
    /// Switch the session's live connections (or one user's) to view-only or interactive.
    InputMode {
        session_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        view_only: bool,
    },
}

/// Apply an event to this replica's sessions; returns how many connections it reached.
pub async fn apply(gw: &Gateway, event: &ControlEvent) -> usize {
    match event {
        ControlEvent::Kick { session_id } => gw
            .sessions
            .close_where(CloseCode::Kicked, |s| s.session_id == *session_id),
        ControlEvent::Revoke { jti, ttl_ms } => {
            gw.router
                .revoke_locally(jti, Duration::from_millis(*ttl_ms))
                .await;
            gw.sessions.close_where(CloseCode::Kicked, |s| {
                s.jti.as_deref() == Some(jti.as_str())
            })
        }
        ControlEvent::InputMode {
            session_id,
            user,
            view_only,
        } => gw.sessions.set_view_only(*view_only, |s| {
            s.session_id == *session_id && user.as_ref().is_none_or(|u| *u == s.user_id)
        }),
    }
}

/// Apply locally, then tell the other replicas. A failed broadcast is logged, not fatal: the
/// local part already happened, and revocations are also in the store for new upgrades.
pub async fn broadcast(gw: &Gateway, event: ControlEvent) -> usize {
    broadcast_checked(gw, event).await.0
}

/// [`broadcast`], also saying whether the other replicas were told.
pub async fn broadcast_checked(gw: &Gateway, event: ControlEvent) -> (usize, bool) {
    let closed = apply(gw, &event).await;
    match serde_json::to_string(&event) {
        Ok(payload) => {
            if let Err(e) = gw.router.store().publish(&payload).await {
                tracing::warn!(event = "store_error", op = "publish", error = %e,
                    "control event not broadcast to other replicas");
                return (closed, false);
            }
            (closed, true)
        }
        Err(e) => {
            tracing::error!(event = "internal_error", error = %e, "control event not serializable");
            (closed, false)
        }
    }
}

/// The handler for messages arriving on `{prefix}events`. Our own broadcasts come back too;
/// applying them again is harmless (a closing session keeps its first close code).
pub fn subscriber(gw: Arc<Gateway>) -> Arc<dyn Fn(&str) + Send + Sync> {
    Arc::new(
        move |payload: &str| match serde_json::from_str::<ControlEvent>(payload) {
            Ok(event) => {
                let gw = Arc::clone(&gw);
                tokio::spawn(async move {
                    let closed = apply(&gw, &event).await;
                    tracing::debug!(event = "control_event", closed, "{event:?} applied");
                });
            }
            Err(e) => {
                tracing::warn!(event = "control_event_invalid", error = %e, "ignored an unreadable control event")
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_stable_wire_format() {
        let kick = ControlEvent::Kick {
            session_id: "s1".into(),
        };
        assert_eq!(
            serde_json::to_string(&kick).expect("json"),
            r#"{"type":"kick","session_id":"s1"}"#
        );
        let revoke: ControlEvent =
            serde_json::from_str(r#"{"type":"revoke","jti":"j","ttl_ms":5}"#).expect("parse");
        assert_eq!(
            revoke,
            ControlEvent::Revoke {
                jti: "j".into(),
                ttl_ms: 5
            }
        );
        let switch = ControlEvent::InputMode {
            session_id: "s1".into(),
            user: None,
            view_only: true,
        };
        assert_eq!(
            serde_json::to_string(&switch).expect("json"),
            r#"{"type":"input_mode","session_id":"s1","view_only":true}"#
        );
    }
}
