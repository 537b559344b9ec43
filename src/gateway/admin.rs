//! The admin listener (contract §7): `/healthz`, `/readyz` and `/metrics` are open (probes and
//! Prometheus), and so are the playback page's static files (`admin_recordings`); `/admin/*`
//! needs `Authorization: Bearer <admin token>`, compared in constant time.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::{HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::refusal::ErrorCode;
use super::{Gateway, respond};
use crate::auth::mint::now_unix;
use crate::control::{self, ControlEvent};

pub struct AdminApp(pub Arc<Gateway>);

pub(super) fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

/// A refusal from the one table both listeners use.
pub(super) fn error(code: ErrorCode, message: &str) -> Response<Vec<u8>> {
    json_response(
        code.status(),
        json!({ "error": code.as_str(), "message": message }),
    )
}

impl AdminApp {
    /// 200 when this instance should get traffic; 503 (same shape) when no backend is healthy,
    /// it is draining, or its JWKS has not loaded yet (it could verify no token the provider
    /// signs). `status` is `degraded` while the session store or its event subscription is down;
    /// `subscriber` (`ok` | `down`) is there only with a shared store. `jwks` (`ok` |
    /// `loading` | `stale`) is there only when `auth.jwks_url` is set.
    fn readyz(&self) -> Response<Vec<u8>> {
        let gw = &self.0;
        let (healthy, total) = gw.router.health().counts();
        let store_up = gw.router.store().is_up();
        let draining = gw.shutting_down.load(std::sync::atomic::Ordering::SeqCst);
        let jwks = gw.verifier().jwks().map(|j| j.status());
        let jwks_loading = jwks == Some(crate::auth::jwks::Status::Loading);
        // A pool of dynamic backends (sandboxes registered or named at run time) has none
        // until the first one starts, and they are not checked: that is no reason to take
        // the replica out of the load balancer.
        let dynamic = gw.config().pools.values().any(|p| p.discovery.is_dynamic());
        let no_backend = healthy == 0 && !dynamic;
        let code = if draining || no_backend || jwks_loading {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        // Degraded too while only the event subscription is down: kicks and revocations from
        // other replicas do not arrive here until it is back (then they are caught up).
        let subscriber_up = gw.router.store().events_up();
        let mut body = json!({
            "status": if store_up && subscriber_up { "ready" } else { "degraded" },
            "store": if store_up { "ok" } else { "unreachable" },
            "backends": { "healthy": healthy, "total": total },
            "draining": draining,
        });
        // Only a shared store has a subscription (the embedded one has no other replicas).
        if !matches!(gw.config().store.kind, crate::config::StoreKind::Memory) {
            body["subscriber"] = json!(if subscriber_up { "ok" } else { "down" });
        }
        if let Some(jwks) = jwks {
            body["jwks"] = json!(jwks.as_str());
        }
        json_response(code, body)
    }

    pub(super) fn authorized(&self, session: &ServerSession) -> bool {
        let config = self.0.config();
        let Some(expected) = config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
            return false;
        };
        let Some(given) = session
            .get_header(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        given.as_bytes().ct_eq(expected.expose().as_bytes()).into()
    }

    fn sessions(&self) -> Response<Vec<u8>> {
        let list: Vec<_> = self
            .0
            .sessions
            .live()
            .into_iter()
            .map(|live| {
                let s = live.info;
                json!({
                    "conn_id": s.conn_id,
                    "session_id": s.session_id,
                    "user_id": s.user_id,
                    "pool": s.pool,
                    "backend": s.backend,
                    "client_addr": s.client_addr.map(|a| a.to_string()),
                    "age_seconds": s.started.elapsed().as_secs(),
                    "role": s.role.as_str(),
                    "input_mode": if live.view_only { "view_only" } else { "interactive" },
                })
            })
            .collect();
        json_response(StatusCode::OK, json!({ "sessions": list }))
    }
}

/// Admin request bodies are tiny JSON objects; a bound keeps a bad client from streaming
/// megabytes into memory.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub(super) async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(error(ErrorCode::BodyTooLarge, "body too large"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(error(ErrorCode::BadRequest, "could not read the body"));
            }
        }
    }
}

/// Revocations are kept until the token expires; when the caller does not say when that is and
/// no live session tells us, a day covers any sensible token lifetime.
const DEFAULT_REVOCATION_TTL: Duration = Duration::from_secs(24 * 3600);
const MAX_REVOCATION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputModeRequest {
    mode: InputMode,
    /// Only this user's connections of the session; all of them when absent.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum InputMode {
    ViewOnly,
    Interactive,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    jti: String,
    /// The token's `exp` (unix seconds), when the caller knows it.
    #[serde(default)]
    exp: Option<u64>,
}

impl AdminApp {
    /// `DELETE /admin/sessions/{sid}`: close every connection of the session with 4003, on
    /// every replica; answered by [`outcome_response`]. 404 when the session is neither live
    /// here nor pinned in the store.
    async fn kick(&self, sid: &str) -> Response<Vec<u8>> {
        let gw = &self.0;
        let outcome = control::kick(gw, sid).await;
        if outcome.here == 0 && matches!(gw.router.store().get(sid).await, Ok(None)) {
            return error(ErrorCode::NotFound, "no live session with that id");
        }
        tracing::info!(
            event = "session_kicked",
            session_id = sid,
            connections = outcome.here,
            stored = outcome.stored,
            broadcast = outcome.broadcast,
            "session kicked by admin"
        );
        outcome_response(
            &outcome,
            Action::Kick,
            json!({ "session_id": sid, "closed": outcome.here }),
        )
    }

    /// `PUT /admin/sessions/{sid}/input {"mode": "view_only"|"interactive", "user": "..."}`:
    /// switch live connections without reconnecting them, on every replica. `connections` is
    /// how many matched here; answered by [`outcome_response`] (nothing is stored for it).
    async fn input_mode(&self, sid: &str, body: &[u8]) -> Response<Vec<u8>> {
        let request: InputModeRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    ErrorCode::BadRequest,
                    &format!(
                        "expected {{\"mode\": \"view_only\" | \"interactive\", \"user\"?: \"...\"}}: {e}"
                    ),
                );
            }
        };
        if !crate::auth::authorize::valid_session_id(sid) {
            return error(ErrorCode::BadSessionId, "invalid session id");
        }
        let view_only = request.mode == InputMode::ViewOnly;
        let event = ControlEvent::InputMode {
            session_id: sid.to_owned(),
            user: request.user.clone(),
            view_only,
        };
        let gw = &self.0;
        let outcome = control::switch_input(gw, event).await;
        if outcome.here == 0 && matches!(gw.router.store().get(sid).await, Ok(None)) {
            return error(ErrorCode::NotFound, "no live session with that id");
        }
        outcome_response(
            &outcome,
            Action::InputMode,
            json!({
                "session_id": sid,
                "user": request.user,
                "mode": if view_only { "view_only" } else { "interactive" },
                "connections": outcome.here,
            }),
        )
    }

    /// `POST /admin/revoke {"jti": "...", "exp": 1700000000}`: refuse the token from now on
    /// (403 `token_revoked`) and close its live sessions with 4003.
    async fn revoke(&self, body: &[u8]) -> Response<Vec<u8>> {
        let request: RevokeRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    ErrorCode::BadRequest,
                    &format!("expected {{\"jti\": \"...\"}}: {e}"),
                );
            }
        };
        if request.jti.is_empty() || request.jti.len() > 256 {
            return error(ErrorCode::BadRequest, "jti must be 1 to 256 bytes");
        }
        let gw = &self.0;
        let live_exp = gw
            .sessions
            .list()
            .iter()
            .filter(|s| s.jti.as_deref() == Some(&request.jti))
            .map(|s| s.token_exp)
            .max();
        let now = now_unix();
        let ttl = match request.exp.or(live_exp) {
            // Capped: a revocation outliving any sane token must not be kept forever.
            Some(exp) => {
                Duration::from_secs(exp.saturating_sub(now).min(MAX_REVOCATION_TTL.as_secs()))
                    + gw.config().auth.leeway
            }
            None => DEFAULT_REVOCATION_TTL,
        };
        let outcome = control::revoke(gw, &request.jti, ttl).await;
        tracing::info!(event = "token_revoked", jti = %request.jti, closed = outcome.here,
            stored = outcome.stored, broadcast = outcome.broadcast,
            ttl_seconds = ttl.as_secs(), "token revoked by admin");
        // Never "nothing done": this replica refuses the jti from now on whatever the store says.
        outcome_response(
            &outcome,
            Action::Revoke,
            json!({ "jti": request.jti, "closed": outcome.here, "ttl_seconds": ttl.as_secs() }),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kick,
    Revoke,
    InputMode,
}

/// The one answer rule of the admin actions that reach every replica (kick, revoke, input
/// mode), from what was done (`stored` is only reported where something is stored):
/// - 200: done here, stored, and published to the other replicas (`broadcast: true`);
/// - 202: done on this replica only: the store did not take it (`stored: false`, other replicas
///   keep accepting a revoked token) or the event was not published (`broadcast: false`).
///   Retry once `/readyz` says ready;
/// - 503 `store_unavailable`: nothing was done anywhere (no connection here matched and the store
///   did not answer), so the call had no effect. A revocation always has one: this replica
///   refuses the token from then on.
fn outcome_response(
    outcome: &control::Outcome,
    action: Action,
    mut body: serde_json::Value,
) -> Response<Vec<u8>> {
    body["broadcast"] = json!(outcome.broadcast);
    if action != Action::InputMode {
        body["stored"] = json!(outcome.stored);
    }
    if outcome.stored && outcome.broadcast {
        return json_response(StatusCode::OK, body);
    }
    if outcome.here == 0 && action != Action::Revoke {
        let code = ErrorCode::StoreUnavailable;
        body["error"] = json!(code.as_str());
        body["message"] = json!("the session store is unreachable: nothing was done; retry");
        return json_response(code.status(), body);
    }
    body["message"] = json!(
        "done on this replica only: the session store is unreachable, other replicas were not told; retry"
    );
    json_response(StatusCode::ACCEPTED, body)
}

/// Not Pingora's `ServeHttp`: that one logs a malformed request's raw bytes at error level,
/// which would put the admin bearer token in the logs.
#[async_trait]
impl HttpServerApp for AdminApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !respond::read_request(&mut session, shutdown).await {
            return None;
        }
        // The playback page's files carry validators and may be answered 304.
        let mut session = match self.playback_asset(session).await {
            Ok(answered) => return answered,
            Err(session) => session,
        };
        // Recording downloads are streamed (they can be gigabytes), not built as a whole body.
        let response = match self.recording_download(&session).await {
            Some(Ok(download)) => {
                return super::admin_recordings::send_file(session, download).await;
            }
            Some(Err(refused)) => refused,
            None => self.route(&mut session).await,
        };
        let (parts, body) = response.into_parts();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        respond::send(session, parts.status, &content_type, body, &[]).await
    }
}

impl AdminApp {
    async fn route(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
            ("GET", "/readyz") => self.readyz(),
            ("GET" | "HEAD", p) if super::admin_recordings::is_playback_asset(p) => {
                // Not served above: no web_root, or no such file under it.
                error(
                    ErrorCode::NotFound,
                    "no such path (the playback page needs web_root)",
                )
            }
            ("GET", "/metrics") => {
                let body = self.0.metrics.render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            (_, p) if p.starts_with("/admin/") => {
                if !self.authorized(session) {
                    return error(
                        ErrorCode::Unauthorized,
                        "admin endpoints need the admin bearer token",
                    );
                }
                // Sub-paths by strip_prefix/strip_suffix: slicing by lengths panicked on a path
                // that is both prefix and suffix (`/admin/backends/drain`).
                let backend_drain = p
                    .strip_prefix("/admin/backends/")
                    .and_then(|rest| rest.strip_suffix("/drain"))
                    .filter(|name| !name.is_empty());
                let session_input = p
                    .strip_prefix("/admin/sessions/")
                    .and_then(|rest| rest.strip_suffix("/input"))
                    .filter(|sid| !sid.is_empty());
                // `/admin/pools/{pool}/backends/{name}`: names never contain `/`.
                let pool_backend = p
                    .strip_prefix("/admin/pools/")
                    .and_then(|rest| rest.split_once("/backends/"))
                    .filter(|(pool, name)| {
                        !pool.is_empty() && !name.is_empty() && !name.contains('/')
                    });
                let kicked = p
                    .strip_prefix("/admin/sessions/")
                    .filter(|sid| !sid.is_empty());
                match (method.as_str(), p) {
                    ("GET", "/admin/sessions") => self.sessions(),
                    ("GET", "/admin/backends") => self.backends(),
                    ("GET", "/admin/recordings") => {
                        let query = session.req_header().uri.query().map(str::to_owned);
                        self.recordings(query.as_deref()).await
                    }
                    ("POST", _) if backend_drain.is_some() => {
                        self.drain(backend_drain.unwrap_or_default(), true).await
                    }
                    ("DELETE", _) if backend_drain.is_some() => {
                        self.drain(backend_drain.unwrap_or_default(), false).await
                    }
                    ("PUT", _) if pool_backend.is_some() => {
                        let (pool, name) = pool_backend.unwrap_or_default();
                        match read_body(session).await {
                            Ok(body) => self.register(pool, name, &body).await,
                            Err(resp) => resp,
                        }
                    }
                    ("DELETE", _) if pool_backend.is_some() => {
                        let (pool, name) = pool_backend.unwrap_or_default();
                        self.deregister(pool, name).await
                    }
                    ("PUT", _) if session_input.is_some() => {
                        let sid = session_input.unwrap_or_default().to_owned();
                        match read_body(session).await {
                            Ok(body) => self.input_mode(&sid, &body).await,
                            Err(resp) => resp,
                        }
                    }
                    ("DELETE", _) if kicked.is_some() => {
                        let sid = kicked.unwrap_or_default().to_owned();
                        self.kick(&sid).await
                    }
                    ("POST", "/admin/revoke") => match read_body(session).await {
                        Ok(body) => self.revoke(&body).await,
                        Err(resp) => resp,
                    },
                    _ => error(ErrorCode::NotFound, "no such admin endpoint"),
                }
            }
            _ => error(ErrorCode::NotFound, "no such path"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Outcome;

    fn status(action: Action, here: usize, stored: bool, broadcast: bool) -> u16 {
        let outcome = Outcome {
            here,
            stored,
            broadcast,
        };
        outcome_response(&outcome, action, json!({}))
            .status()
            .as_u16()
    }

    #[test]
    fn the_answer_says_how_far_an_action_got() {
        for action in [Action::Kick, Action::Revoke, Action::InputMode] {
            assert_eq!(status(action, 0, true, true), 200);
            assert_eq!(status(action, 2, true, false), 202);
            assert_eq!(status(action, 1, false, false), 202);
        }
        assert_eq!(status(Action::Kick, 0, false, false), 503);
        assert_eq!(status(Action::InputMode, 0, true, false), 503);
        // This replica refuses the token from now on: never "nothing done".
        assert_eq!(status(Action::Revoke, 0, false, false), 202);
    }
}
