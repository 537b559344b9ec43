//! The admin listener (contract §7): `/healthz`, `/readyz` and `/metrics` are open (probes and
//! Prometheus); `/admin/*` needs `Authorization: Bearer <admin token>`, compared in constant time.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::Gateway;
use crate::auth::mint::now_unix;
use crate::bridge::CloseCode;

pub struct AdminApp(pub Arc<Gateway>);

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    json_response(status, json!({ "error": code, "message": message }))
}

impl AdminApp {
    fn readyz(&self) -> Response<Vec<u8>> {
        let gw = &self.0;
        let (healthy, total) = gw.router.health().counts();
        let store_up = gw.router.store().is_up();
        let draining = gw.admission.is_draining();
        let status = if draining {
            "draining"
        } else if store_up {
            "ready"
        } else {
            "degraded"
        };
        let code = if draining || healthy == 0 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        json_response(
            code,
            json!({
                "status": status,
                "store": if store_up { "ok" } else { "unreachable" },
                "backends": { "healthy": healthy, "total": total },
            }),
        )
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(expected) = self.0.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
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
            .list()
            .into_iter()
            .map(|s| {
                json!({
                    "conn_id": s.conn_id,
                    "session_id": s.session_id,
                    "user_id": s.user_id,
                    "pool": s.pool,
                    "backend": s.backend,
                    "client_addr": s.client_addr.map(|a| a.to_string()),
                    "age_seconds": s.started.elapsed().as_secs(),
                })
            })
            .collect();
        json_response(StatusCode::OK, json!({ "sessions": list }))
    }
}

/// Admin request bodies are tiny JSON objects; a bound keeps a bad client from streaming
/// megabytes into memory.
const MAX_ADMIN_BODY: usize = 64 * 1024;

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "bad_request",
                        "body too large",
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "could not read the body",
                ));
            }
        }
    }
}

/// Revocations are kept until the token expires; when the caller does not say when that is and
/// no live session tells us, a day covers any sensible token lifetime.
const DEFAULT_REVOCATION_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    jti: String,
    /// The token's `exp` (unix seconds), when the caller knows it.
    #[serde(default)]
    exp: Option<u64>,
}

impl AdminApp {
    /// `DELETE /admin/sessions/{sid}`: close every connection of the session with 4003.
    fn kick(&self, sid: &str) -> Response<Vec<u8>> {
        let closed = self
            .0
            .sessions
            .close_where(CloseCode::Kicked, |s| s.session_id == sid);
        if closed == 0 {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no live session with that id",
            );
        }
        tracing::info!(
            event = "session_kicked",
            session_id = sid,
            connections = closed,
            "session kicked by admin"
        );
        json_response(
            StatusCode::OK,
            json!({ "session_id": sid, "closed": closed }),
        )
    }

    /// `POST /admin/revoke {"jti": "...", "exp": 1700000000}`: refuse the token from now on
    /// (403 `token_revoked`) and close its live sessions with 4003.
    async fn revoke(&self, body: &[u8]) -> Response<Vec<u8>> {
        let request: RevokeRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("expected {{\"jti\": \"...\"}}: {e}"),
                );
            }
        };
        if request.jti.is_empty() || request.jti.len() > 256 {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "jti must be 1 to 256 bytes",
            );
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
            Some(exp) => Duration::from_secs(exp.saturating_sub(now)) + gw.config.auth.leeway,
            None => DEFAULT_REVOCATION_TTL,
        };
        if let Err(e) = gw.router.store().revoke(&request.jti, ttl).await {
            tracing::warn!(event = "store_error", op = "revoke", error = %e, "revocation not stored");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the revocation could not be stored",
            );
        }
        let closed = gw.sessions.close_where(CloseCode::Kicked, |s| {
            s.jti.as_deref() == Some(&request.jti)
        });
        tracing::info!(event = "token_revoked", jti = %request.jti, closed, ttl_seconds = ttl.as_secs(), "token revoked by admin");
        json_response(
            StatusCode::OK,
            json!({ "jti": request.jti, "closed": closed, "ttl_seconds": ttl.as_secs() }),
        )
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => json_response(StatusCode::OK, json!({ "status": "ok" })),
            ("GET", "/readyz") => self.readyz(),
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
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin endpoints need the admin bearer token",
                    );
                }
                match (method.as_str(), p) {
                    ("GET", "/admin/sessions") => self.sessions(),
                    ("DELETE", p) if p.starts_with("/admin/sessions/") => {
                        self.kick(&p["/admin/sessions/".len()..])
                    }
                    ("POST", "/admin/revoke") => match read_body(session).await {
                        Ok(body) => self.revoke(&body).await,
                        Err(resp) => resp,
                    },
                    _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
}
