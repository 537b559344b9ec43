//! The admin listener (contract §7): `/healthz`, `/readyz` and `/metrics` are open (probes and
//! Prometheus); `/admin/*` needs `Authorization: Bearer <admin token>`, compared in constant time.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::Gateway;

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
                    _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
}
