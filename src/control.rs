//! Acting on live sessions on purpose: kick by session id, revocation by `jti`, and the input
//! mode switch (view-only / interactive), on this replica and, through the store's
//! `{prefix}events` channel, on every other one. Expiry and drain use the same per-session
//! control channels (see [`crate::sessions`]), without the broadcast.
//!
//! Kicks and revocations are also written to the store before they are published, so a replica
//! that was not listening when the event went out catches up when it subscribes again
//! ([`catch_up`]). Input-mode switches are not stored: a replica that missed one keeps the
//! connections' current mode.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bridge::CloseCode;
use crate::gateway::Gateway;
use crate::routing::StoreError;
use crate::routing::store::unix_ms;

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
    /// A backend was drained, undrained, registered or removed: sync with the board now
    /// rather than at the next tick.
    BackendsChanged,
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
            // Its event streams end too (not counted: the answer counts connections).
            gw.sessions
                .end_streams_where(crate::sessions::StreamEnd::Revoked, |s| {
                    s.jti.as_deref() == Some(jti.as_str())
                });
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
        ControlEvent::BackendsChanged => {
            gw.router.directory().poke();
            0
        }
    }
}

/// How long a kick is remembered for replicas that missed its event: longer than any outage of
/// one replica's subscription that the catch-up is meant to repair (an outage of Redis itself
/// stores no kick at all). One small key per kicked session.
pub const KICK_TTL: Duration = Duration::from_secs(24 * 3600);

/// What an admin action did: how many connections it reached here, whether what had to be
/// stored for replicas that miss the event was stored, and whether the event was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub here: usize,
    pub stored: bool,
    pub broadcast: bool,
}

/// Close every connection of `sid` with 4003, here and on every replica. The kick time is
/// stored first, so a replica whose subscription is down closes the session's connections that
/// started before it once it resubscribes.
pub async fn kick(gw: &Gateway, sid: &str) -> Outcome {
    let stored = match gw
        .router
        .store()
        .record_kick(sid, unix_ms(), KICK_TTL)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(event = "store_error", op = "kick", error = %e,
                "kick not stored: replicas that miss the event will not catch up on it");
            false
        }
    };
    let event = ControlEvent::Kick {
        session_id: sid.to_owned(),
    };
    let (here, broadcast) = broadcast_checked(gw, event).await;
    Outcome {
        here,
        stored,
        broadcast,
    }
}

/// Refuse the `jti` from now on (here, and through the store on every replica) and close its
/// live connections with 4003 everywhere.
pub async fn revoke(gw: &Gateway, jti: &str, ttl: Duration) -> Outcome {
    let stored = match gw.router.revoke(jti, ttl).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(event = "store_error", op = "revoke", error = %e,
                "revocation not stored: other replicas still accept the token");
            false
        }
    };
    let event = ControlEvent::Revoke {
        jti: jti.to_owned(),
        ttl_ms: ttl.as_millis() as u64,
    };
    let (here, broadcast) = broadcast_checked(gw, event).await;
    Outcome {
        here,
        stored,
        broadcast,
    }
}

/// Switch the input mode of a session's live connections here and on every replica. Nothing
/// is stored for it.
pub async fn switch_input(gw: &Gateway, event: ControlEvent) -> Outcome {
    let (here, broadcast) = broadcast_checked(gw, event).await;
    Outcome {
        here,
        stored: true,
        broadcast,
    }
}

/// Apply locally, then tell the other replicas; returns how many connections it reached here
/// and whether the event was published. A failed publish is logged, not fatal: the local part
/// already happened.
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

/// A message arriving on `{prefix}events`. Our own broadcasts come back too; applying them
/// again is harmless (a closing session keeps its first close code).
pub fn on_event(gw: &Arc<Gateway>, payload: &str) {
    match serde_json::from_str::<ControlEvent>(payload) {
        Ok(event) => {
            let gw = Arc::clone(gw);
            tokio::spawn(async move {
                let closed = apply(&gw, &event).await;
                tracing::debug!(event = "control_event", closed, "{event:?} applied");
            });
        }
        Err(e) => {
            tracing::warn!(event = "control_event_invalid", error = %e, "ignored an unreadable control event")
        }
    }
}

/// After a (re)subscription to `{prefix}events`: close the live connections whose `jti` the
/// store holds as revoked, and those of sessions kicked after they started. Returns how many
/// connections each closed.
pub async fn catch_up(gw: &Gateway) -> Result<(usize, usize), StoreError> {
    let live = gw.sessions.list();
    let mut jtis: Vec<String> = live.iter().filter_map(|s| s.jti.clone()).collect();
    jtis.sort_unstable();
    jtis.dedup();
    let mut sids: Vec<String> = live.iter().map(|s| s.session_id.clone()).collect();
    sids.sort_unstable();
    sids.dedup();
    let store = gw.router.store();
    let revoked = store.revoked_among(&jtis).await?;
    let kicked_at = store.kicked_at(&sids).await?;
    let mut revoked_closed = 0;
    for (jti, ttl) in &revoked {
        gw.router.revoke_locally(jti, *ttl).await;
        revoked_closed += gw.sessions.close_where(CloseCode::Kicked, |s| {
            s.jti.as_deref() == Some(jti.as_str())
        });
    }
    let kicks: HashMap<&str, u64> = sids
        .iter()
        .zip(kicked_at)
        .filter_map(|(sid, at)| at.map(|at| (sid.as_str(), at)))
        .collect();
    // Only connections that started before the kick: a reconnect after it is a new session.
    let kicked_closed = match kicks.is_empty() {
        true => 0,
        false => gw.sessions.close_where(CloseCode::Kicked, |s| {
            kicks
                .get(s.session_id.as_str())
                .is_some_and(|at| s.started_at_ms <= *at)
        }),
    };
    tracing::info!(
        event = "store_caught_up",
        live = live.len(),
        revoked_closed,
        kicked_closed,
        "checked live sessions against stored kicks and revocations"
    );
    Ok((revoked_closed, kicked_closed))
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
