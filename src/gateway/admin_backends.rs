//! The admin API's backend endpoints (contract §7, §13): the cluster-wide view, drain, and the
//! registry of `discovery: registry` pools.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::admin::{AdminApp, error, json_response};
use super::refusal::ErrorCode;
use crate::config::Discovery;
use crate::control::{self, ControlEvent};
use crate::routing::board::BackendKey;
use crate::routing::health::BackendState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    /// `host:port` of the backend's RFB port.
    addr: String,
}

impl AdminApp {
    /// `GET /admin/backends`: every backend this replica knows (configured, registered, or
    /// named by a live session's token), with its health, drain mark, live sessions here and
    /// over every replica (`cluster_sessions`, as of the last sync with the store).
    pub(super) fn backends(&self) -> Response<Vec<u8>> {
        let gw = &self.0;
        let config = gw.config();
        let directory = gw.router.directory();
        let view = directory.view();
        let health = gw.router.health();
        let mut list: Vec<Arc<BackendState>> = health.all().cloned().collect();
        list.extend(directory.all());
        list.sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
        let list: Vec<_> = list
            .into_iter()
            .map(|b| {
                let key = BackendKey::new(&b.pool, &b.name);
                let discovery = config
                    .pool(&b.pool)
                    .map_or("static", |p| p.discovery.kind());
                json!({
                    "pool": b.pool,
                    "name": b.name,
                    "addr": b.addr.to_string(),
                    "discovery": discovery,
                    "up": b.is_up(),
                    "draining": b.is_draining(),
                    "sessions": b.sessions(),
                    // Before the first sync, this replica's own count is all that is known.
                    "cluster_sessions": view.sessions.get(&key).copied().unwrap_or(b.sessions()),
                })
            })
            .collect();
        json_response(
            StatusCode::OK,
            json!({
                "backends": list,
                "replicas": view.replicas,
                "cluster_view": if view.fresh { "current" } else { "stale" },
            }),
        )
    }

    /// `POST /admin/backends/{name}/drain` (and `DELETE` to undo): no new pins to the backend
    /// while its sessions continue. The name is matched in every pool. The mark is kept in the
    /// store: every replica applies it within a second, and it survives restarts.
    pub(super) async fn drain(&self, name: &str, draining: bool) -> Response<Vec<u8>> {
        let gw = &self.0;
        let health = gw.router.health();
        let directory = gw.router.directory();
        let mut keys: Vec<BackendKey> = health
            .all()
            .chain(directory.all().iter())
            .filter(|b| b.name == name)
            .map(|b| BackendKey::new(&b.pool, &b.name))
            .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return error(ErrorCode::NotFound, "no backend with that name");
        }
        for key in &keys {
            if let Err(e) = directory.set_drain(&health, key, draining).await {
                tracing::warn!(event = "store_error", op = "board_drain", error = %e,
                    "drain mark not stored");
                return error(
                    ErrorCode::StoreUnavailable,
                    "the drain mark could not be stored; nothing changed on the other replicas",
                );
            }
        }
        let pools: Vec<&str> = keys.iter().map(|k| k.pool.as_str()).collect();
        tracing::info!(
            event = "backend_drain",
            backend = name,
            draining,
            "backend {name} draining={draining}"
        );
        let (_, broadcast) = control::broadcast_checked(gw, ControlEvent::BackendsChanged).await;
        json_response(
            StatusCode::OK,
            json!({ "backend": name, "pools": pools, "draining": draining, "broadcast": broadcast }),
        )
    }

    /// `PUT /admin/pools/{pool}/backends/{name}` `{"addr": "host:port"}`: add (or re-address) a
    /// backend of a `discovery: registry` pool, on every replica.
    pub(super) async fn register(&self, pool: &str, name: &str, body: &[u8]) -> Response<Vec<u8>> {
        let gw = &self.0;
        let config = gw.config();
        if let Err((code, message)) = registry_pool(&config, pool, name) {
            return error(code, message);
        }
        let request: RegisterRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => {
                return error(ErrorCode::BadRequest, r#"expected {"addr": "host:port"}"#);
            }
        };
        if crate::config::parse_backend_addr(&request.addr).is_none() {
            return error(
                ErrorCode::BadRequest,
                "addr must be host:port (a DNS name, an IPv4 address or [IPv6])",
            );
        }
        let key = BackendKey::new(pool, name);
        if let Err(e) = gw
            .router
            .directory()
            .register(&config, &key, &request.addr)
            .await
        {
            tracing::warn!(event = "store_error", op = "board_register", error = %e,
                "backend not registered");
            return error(
                ErrorCode::StoreUnavailable,
                "the backend could not be stored; it is not registered",
            );
        }
        let (_, broadcast) = control::broadcast_checked(gw, ControlEvent::BackendsChanged).await;
        json_response(
            StatusCode::OK,
            json!({ "pool": pool, "name": name, "addr": request.addr, "broadcast": broadcast }),
        )
    }

    /// `DELETE /admin/pools/{pool}/backends/{name}`: remove a registered backend everywhere.
    /// Its live sessions continue until they end; new connections to it are refused, or
    /// re-pinned where the pool fails over.
    pub(super) async fn deregister(&self, pool: &str, name: &str) -> Response<Vec<u8>> {
        let gw = &self.0;
        let config = gw.config();
        if let Err((code, message)) = registry_pool(&config, pool, name) {
            return error(code, message);
        }
        let key = BackendKey::new(pool, name);
        let directory = gw.router.directory();
        let live_here = directory.sessions_on(&key);
        match directory.deregister(&key).await {
            Ok(true) => {}
            Ok(false) => return error(ErrorCode::NotFound, "no such registered backend"),
            Err(e) => {
                tracing::warn!(event = "store_error", op = "board_register", error = %e,
                    "backend not removed");
                return error(
                    ErrorCode::StoreUnavailable,
                    "the store could not be updated; the backend stays registered",
                );
            }
        }
        let (_, broadcast) = control::broadcast_checked(gw, ControlEvent::BackendsChanged).await;
        json_response(
            StatusCode::OK,
            json!({ "pool": pool, "name": name, "removed": true,
                    "live_sessions_here": live_here, "broadcast": broadcast }),
        )
    }
}

/// The pool must exist and take backends at run time, and the name must be one it allows.
fn registry_pool(
    config: &crate::config::Config,
    pool: &str,
    name: &str,
) -> Result<(), (ErrorCode, &'static str)> {
    let Some(p) = config.pool(pool) else {
        return Err((ErrorCode::NotFound, "no pool with that name"));
    };
    let Discovery::Registry { name_pattern } = &p.discovery else {
        return Err((
            ErrorCode::BadRequest,
            "only a pool with discovery kind registry takes backends at run time",
        ));
    };
    if !crate::config::is_valid_name(name) || !name_pattern.matches(name) {
        return Err((
            ErrorCode::BadRequest,
            "the backend name does not match the pool's name_pattern",
        ));
    }
    Ok(())
}
