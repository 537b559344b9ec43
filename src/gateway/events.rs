//! `GET {events_path}` (default `/vncgate/events`, contract §14): Server-Sent Events for the
//! token's session: `viewers`, `input_mode`, `backend`, `expiring`, `recording`, and a last
//! `end` (`{"reason"}`) when the gateway closes the stream.
//!
//! Authorized like an upgrade, before the 200: the Origin allowlist, the token from the header,
//! the query or the cookie (an `EventSource` cannot send a subprotocol or a header), its
//! verification and revocation, the `sid`/pool checks, and the owner/share rule against the
//! session's pin; every refusal goes through [`refusal`](super::refusal). Streams are bounded
//! per session, per user and per process ([`limits`]). A stream ends when its token expires
//! (with the same leeway an upgrade gets), when its `jti` is revoked, or at the drain.
//!
//! What it shows is this process's view of the session: the connections relaying through this
//! gateway (the input-mode switch reaches every replica, so a replica's streams see it for the
//! connections it holds).

mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use pingora_core::apps::ReusedHttpStream;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use prometheus::IntGauge;
use serde_json::json;
use tokio::time::{Instant as TokioInstant, MissedTickBehavior};
use tracing::{Instrument, field};

use super::connection::Connection;
use super::refusal::{ErrorCode, Refusal};
use super::{Gateway, respond};
use crate::auth::extract::{self, Subprotocols};
use crate::auth::mint::now_unix;
use crate::auth::{AuthError, Claims, authorize};
use crate::config::Config;
use crate::routing::RoutingError;
use crate::sessions::{EventStream, StreamEnd, StreamInfo, StreamLimits};
use snapshot::{Snapshot, Viewer, event};

/// A comment line this often: proxies and load balancers close a response that stays silent
/// (nginx's `proxy_read_timeout` and AWS ALB's idle timeout are 60 s by default).
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The `retry:` the stream asks an `EventSource` to wait before reconnecting after a drop.
const RETRY_MS: u64 = 5_000;
/// `expiring` is sent this long before the token's `exp` (at once for a token with less left).
const EXPIRING_NOTICE: Duration = Duration::from_secs(60);
/// How often the session backend's health is looked at (an atomic load, no I/O).
const HEALTH_LOOK: Duration = Duration::from_secs(1);

/// The contract names no keys for these bounds, so they are constants: a user's tabs (each
/// opens a stream) stay well below 16, a session's owner and viewers below 32. The process
/// bound is `limits.max_sessions`: a stream is much cheaper than a session, and a deployment
/// sized for that many sessions has one stream per session to spare.
pub mod limits {
    pub const PER_SESSION: usize = 32;
    pub const PER_USER: usize = 16;
}

/// `vncgate_event_streams`: open event streams (the owning module registers it).
#[derive(Clone)]
pub struct EventMetrics {
    pub streams: IntGauge,
}

impl EventMetrics {
    pub fn register(registry: &prometheus::Registry) -> Result<EventMetrics, prometheus::Error> {
        let streams = IntGauge::new(
            "vncgate_event_streams",
            "Open session event streams (GET /vncgate/events).",
        )?;
        registry.register(Box::new(streams.clone()))?;
        Ok(EventMetrics { streams })
    }
}

/// An authorized stream, before its first byte.
struct Admitted {
    claims: Claims,
    stream: EventStream,
    /// Echoed in `Access-Control-Allow-Origin` (a cross-origin `EventSource` needs it).
    cors_origin: Option<String>,
    /// The session's pin as admission saw it (pool, backend), for health before a connection.
    pinned: Option<(String, String)>,
    /// The token's `exp` as an instant, and the end of its validity (plus the leeway).
    expires: TokioInstant,
    ends: TokioInstant,
}

pub async fn handle(
    gw: &Arc<Gateway>,
    session: ServerSession,
    conn: &mut Connection,
) -> Option<ReusedHttpStream> {
    let conn_id = gw.sessions.next_conn_id();
    let span = tracing::info_span!(
        "events",
        conn_id,
        client_addr = field::display(conn.client_addr.map(|a| a.to_string()).unwrap_or_default()),
        session_id = field::Empty,
        user_id = field::Empty,
    );
    async {
        if session.req_header().method == http::Method::OPTIONS {
            return match preflight(gw, &session) {
                Ok(headers) => {
                    respond::send(
                        session,
                        StatusCode::NO_CONTENT,
                        "text/plain",
                        Vec::new(),
                        &headers,
                    )
                    .await
                }
                Err(refusal) => refuse(gw, session, conn, refusal).await,
            };
        }
        match admit(gw, &session, conn_id, conn).await {
            Err(refusal) => refuse(gw, session, conn, refusal).await,
            Ok(admitted) => serve(gw, session, admitted).await,
        }
    }
    .instrument(span)
    .await
}

async fn admit(
    gw: &Arc<Gateway>,
    session: &ServerSession,
    conn_id: u64,
    conn: &mut Connection,
) -> Result<Admitted, Refusal> {
    let req = session.req_header();
    if req.method != http::Method::GET {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            "the events stream answers GET only",
        ));
    }
    if gw.admission.is_draining() {
        return Err(Refusal::new(
            ErrorCode::Draining,
            "the gateway is draining; reconnect",
        ));
    }
    let config = gw.config();
    let origin = request_origin(session);
    authorize::check_origin(
        origin.as_deref().map(str::as_bytes),
        &config.auth.allowed_origins,
    )?;
    if let Some(ip) = conn.client_addr.map(|a| a.ip()) {
        gw.admission.check_auth_throttle(ip)?;
    }
    let (token, _) = extract::token(&req.headers, &req.uri, &Subprotocols::default())?
        .ok_or(AuthError::Missing)?;
    let claims = gw.verifier().verify(&token).await?;
    drop(token);
    conn.authenticated();
    authorize::authorize(&claims, &config)?;
    if let Some(jti) = &claims.jti
        && gw.router.is_revoked(jti).await
    {
        return Err(AuthError::Revoked.into());
    }
    let span = tracing::Span::current();
    span.record("session_id", claims.session_id());
    span.record("user_id", claims.sub.as_str());
    let pinned = check_owner(gw, &claims).await?;
    let stream = gw.sessions.open_stream(
        conn_id,
        StreamInfo {
            session_id: claims.session_id().to_owned(),
            user_id: claims.sub.clone(),
            jti: claims.jti.clone(),
        },
        StreamLimits {
            per_session: limits::PER_SESSION,
            per_user: limits::PER_USER,
            total: config.limits.max_sessions,
        },
    )?;
    let (expires, ends) = deadlines(&claims, &config);
    Ok(Admitted {
        claims,
        stream,
        cors_origin: origin,
        pinned,
        expires,
        ends,
    })
}

/// The CORS preflight of a cross-origin page's `fetch` with `Authorization: Bearer` (what
/// `@vncgate/client` sends): allowed for an Origin on the allowlist, for GET, with at most the
/// `authorization` header. Without it the browser never sends the GET. The answer is cached by
/// the browser for 10 minutes.
fn preflight(
    gw: &Gateway,
    session: &ServerSession,
) -> Result<[(&'static str, String); 6], Refusal> {
    let headers = &session.req_header().headers;
    let denied = || Refusal::new(ErrorCode::OriginDenied, "CORS preflight refused");
    let origin = headers
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .ok_or_else(denied)?;
    let config = gw.config();
    if config.auth.allowed_origins.is_empty() {
        return Err(denied());
    }
    authorize::check_origin(Some(origin.as_bytes()), &config.auth.allowed_origins)?;
    let method_ok = headers
        .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        .is_some_and(|m| m.as_bytes() == b"GET");
    let headers_ok = headers
        .get(http::header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|h| h.to_str().ok())
        .is_none_or(|h| {
            h.split(',')
                .map(str::trim)
                .all(|name| name.is_empty() || name.eq_ignore_ascii_case("authorization"))
        });
    if !method_ok || !headers_ok {
        return Err(denied());
    }
    Ok([
        ("access-control-allow-origin", origin.to_owned()),
        ("access-control-allow-credentials", "true".to_owned()),
        ("access-control-allow-methods", "GET".to_owned()),
        ("access-control-allow-headers", "authorization".to_owned()),
        ("access-control-max-age", "600".to_owned()),
        ("vary", "Origin".to_owned()),
    ])
}

/// The request's Origin. A browser sends none on a same-origin GET (an `EventSource` on the
/// page vncgate serves itself); `Sec-Fetch-Site: same-origin`, which no page script can set,
/// then stands for the page's origin, rebuilt from the scheme and `Host`. Anything else without
/// an Origin is not a browser page, and passes only an empty allowlist, as an upgrade does.
fn request_origin(session: &ServerSession) -> Option<String> {
    let headers = &session.req_header().headers;
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        return origin.to_str().ok().map(str::to_owned);
    }
    let same_origin = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"same-origin");
    let host = headers.get(http::header::HOST)?.to_str().ok()?;
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    same_origin.then(|| format!("{}://{host}", if tls { "https" } else { "http" }))
}

/// The owner/share rule of an upgrade (contract §4, §11), against the pin the session has:
/// another user's session needs a `share` claim, and a share needs a session to look at.
/// Returns the pin's pool and backend. With the store unreachable, this replica's cached pin
/// decides; without one, the stream is let through (it shows only what the connections here
/// show, and [`serve`] re-checks the owner on every change).
async fn check_owner(gw: &Gateway, claims: &Claims) -> Result<Option<(String, String)>, Refusal> {
    let sid = claims.session_id();
    let pin = match gw.router.store().get(sid).await {
        Ok(pin) => pin,
        Err(_) => gw.router.cached(sid).await,
    };
    match pin {
        Some(pin) if pin.owner != claims.sub && claims.share.is_none() => {
            Err(RoutingError::OwnedByOtherUser.into())
        }
        Some(pin) => Ok(Some((pin.pool, pin.backend))),
        None if claims.share.is_some() && gw.sessions.session(sid).is_empty() => {
            Err(RoutingError::NothingToJoin.into())
        }
        None => Ok(None),
    }
}

/// When `expiring` is due (the token's `exp`) and when the stream ends (`exp` plus the leeway
/// that verification grants, so a reconnecting `EventSource` is refused, not readmitted).
fn deadlines(claims: &Claims, config: &Config) -> (TokioInstant, TokioInstant) {
    let now = TokioInstant::now();
    let left = Duration::from_secs(claims.exp.saturating_sub(now_unix()));
    (now + left, now + left + config.auth.leeway)
}

async fn refuse(
    gw: &Arc<Gateway>,
    mut session: ServerSession,
    conn: &Connection,
    refusal: Refusal,
) -> Option<ReusedHttpStream> {
    let code = refusal.code;
    gw.count_refusal(code, conn.client_addr.map(|a| a.ip()));
    tracing::info!(
        event = "events_rejected",
        code = code.as_str(),
        status = code.status().as_u16(),
        path = %extract::redacted_target(&session.req_header().uri),
        "{}",
        refusal.message
    );
    let retry = [("retry-after", "5".to_owned())];
    let extra: &[(&'static str, String)] = match code.status() {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => &retry,
        _ => &[],
    };
    session.set_keepalive(None);
    respond::send(
        session,
        code.status(),
        "application/json",
        refusal.body(),
        extra,
    )
    .await
}

/// What woke the stream.
enum Wake {
    ClientGone,
    Ended,
    Expired,
    Changed,
    Health,
    Expiring,
    Heartbeat,
}

async fn serve(
    gw: &Arc<Gateway>,
    mut session: ServerSession,
    mut a: Admitted,
) -> Option<ReusedHttpStream> {
    session.set_keepalive(None);
    let header = response_header(a.cors_origin.as_deref())?;
    session.write_response_header(header).await.ok()?;
    let _open = crate::metrics::GaugeGuard::inc(gw.metrics.events.streams.clone());
    tracing::info!(event = "events_started", "session events stream opened");
    let viewer_user = a.claims.sub.clone();
    let viewer = Viewer {
        user: &viewer_user,
        token_view_only: a.claims.starts_view_only(),
    };
    let mut out = format!("retry: {RETRY_MS}\n\n");
    let (mut shown, mut backend) = current(gw, &a, &viewer);
    shown.write_changes(None, &mut out);
    let mut expiring_sent = false;
    let notice_at = a.expires.checked_sub(EXPIRING_NOTICE).unwrap_or(a.expires);
    let mut heartbeat = tokio::time::interval_at(TokioInstant::now() + HEARTBEAT, HEARTBEAT);
    let mut health = tokio::time::interval_at(TokioInstant::now() + HEALTH_LOOK, HEALTH_LOOK);
    health.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let reason = loop {
        if !out.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut out));
            session.write_response_body(chunk, false).await.ok()?;
        }
        let wake = tokio::select! {
            // A client that goes away (a closed tab, a reload) frees its slots at once, not at
            // the next heartbeat's failed write.
            _ = session.read_body_or_idle(true) => Wake::ClientGone,
            _ = a.stream.end.wait_for(Option::is_some) => Wake::Ended,
            _ = tokio::time::sleep_until(a.ends) => Wake::Expired,
            _ = tokio::time::sleep_until(notice_at), if !expiring_sent => Wake::Expiring,
            changed = a.stream.signal.changed() => match changed {
                Ok(()) => Wake::Changed,
                Err(_) => Wake::Ended,
            },
            _ = health.tick() => Wake::Health,
            _ = heartbeat.tick() => Wake::Heartbeat,
        };
        match wake {
            Wake::ClientGone => return None,
            Wake::Ended => break a.stream.end.borrow().map_or("draining", StreamEnd::as_str),
            Wake::Expired => break "token_expired",
            Wake::Heartbeat => out.push_str(": ping\n\n"),
            Wake::Expiring => {
                expiring_sent = true;
                let left = a.expires.saturating_duration_since(TokioInstant::now());
                event(&mut out, "expiring", &json!({ "seconds": left.as_secs() }));
            }
            Wake::Changed => {
                if owned_by_other(gw, &a) {
                    break "session_owned_by_other_user";
                }
                let now;
                (now, backend) = current(gw, &a, &viewer);
                now.write_changes(Some(&shown), &mut out);
                shown = now;
            }
            // Only the backend's state: a look at its health, not a walk over the registry.
            Wake::Health => {
                let lost = a.stream.signal.borrow().backend_lost || backend_down(gw, &backend);
                let now = Snapshot {
                    backend: if lost { "lost" } else { "up" },
                    ..shown.clone()
                };
                now.write_changes(Some(&shown), &mut out);
                shown = now;
            }
        }
    };
    event(&mut out, "end", &json!({ "reason": reason }));
    tracing::info!(
        event = "events_ended",
        reason,
        "session events stream closed"
    );
    session
        .write_response_body(Bytes::from(out), true)
        .await
        .ok()?;
    respond::finish(session).await
}

fn response_header(cors_origin: Option<&str>) -> Option<Box<ResponseHeader>> {
    let mut header = ResponseHeader::build(StatusCode::OK, Some(8)).ok()?;
    header
        .insert_header(
            http::header::CONTENT_TYPE,
            "text/event-stream; charset=utf-8",
        )
        .ok()?;
    header
        .insert_header(http::header::CACHE_CONTROL, "no-store")
        .ok()?;
    header
        .insert_header(http::header::TRANSFER_ENCODING, "chunked")
        .ok()?;
    // nginx buffers proxied responses unless told otherwise; an event must not wait in it.
    header.insert_header("x-accel-buffering", "no").ok()?;
    header
        .insert_header("x-content-type-options", "nosniff")
        .ok()?;
    if let Some(origin) = cors_origin {
        // The origin passed the allowlist: a cross-origin EventSource may read the stream,
        // with its cookie (`withCredentials`) as the token source.
        header
            .insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)
            .ok()?;
        header
            .insert_header(http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")
            .ok()?;
        header.insert_header(http::header::VARY, "Origin").ok()?;
    }
    Some(Box::new(header))
}

/// The session's backend: (pool, name).
type BackendKey = Option<(String, String)>;

/// The snapshot now, and the backend it was taken for (a relaying connection's, else the pin's).
fn current(gw: &Gateway, a: &Admitted, viewer: &Viewer<'_>) -> (Snapshot, BackendKey) {
    let connections = gw.sessions.session(a.claims.session_id());
    let backend = connections
        .iter()
        .find(|c| c.info.connected)
        .map(|c| (c.info.pool.clone(), c.info.backend.clone()))
        .or_else(|| a.pinned.clone());
    let signal = *a.stream.signal.borrow();
    let down = backend_down(gw, &backend);
    (Snapshot::of(&connections, viewer, signal, down), backend)
}

/// Whether the health checks say the backend is down; one they do not know (a dynamic
/// backend, never checked) counts as up.
fn backend_down(gw: &Gateway, backend: &BackendKey) -> bool {
    backend.as_ref().is_some_and(|(pool, name)| {
        gw.router
            .health()
            .get(pool, name)
            .is_some_and(|state| !state.is_up())
    })
}

/// The session turned out to be another user's (it had no pin when the stream was admitted and
/// its owner connected since): a token without `share` may not watch it. Only relaying
/// connections count: one still being admitted has not got its role yet.
fn owned_by_other(gw: &Gateway, a: &Admitted) -> bool {
    a.claims.share.is_none()
        && gw.sessions.session(a.claims.session_id()).iter().any(|c| {
            c.info.connected
                && c.info.role == crate::sessions::Role::Owner
                && c.info.user_id != a.claims.sub
        })
}
