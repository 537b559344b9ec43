//! One WebSocket upgrade, from request to session end. Every check that can refuse runs before
//! the 101, so a refused client gets an HTTP status and a JSON code rather than a close frame.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::StatusCode;
use pingora_core::apps::ReusedHttpStream;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{Instrument, Span, field};

use super::handshake::{self, Handshake};
use super::refusal::{ErrorCode, Refusal};
use super::{Gateway, respond};
use crate::admission::Ticket;
use crate::auth::mint::now_unix;
use crate::auth::{Claims, authorize, extract};
use crate::bridge::client::{ClientSocket, Gated, TakeError};
use crate::bridge::{self, BridgeLimits, CloseCode, Meters, Splicer, backend};
use crate::config::{BackendConfig, BackendProtocol, OnExpiry};
use crate::metrics::GaugeGuard;
use crate::routing::health::BackendSessionGuard;
use crate::routing::{Pin, Placement};
use crate::sessions::SessionInfo;

const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_READ_BUFFER: usize = 4 * 1024;
/// Bytes taken along with the 101; a client has no reason to send more before the backend has
/// spoken, and the bound keeps this loop from copying an arbitrary burst.
const MAX_EARLY_BYTES: usize = 64 * 1024;
/// Room for any real JWT (a few KiB even with many claims) in any of the four token sources.
const MAX_UPGRADE_HEAD_BYTES: usize = 16 * 1024;

/// What a successful admission holds until the session ends.
struct Admitted {
    claims: Claims,
    handshake: Handshake,
    placement: Placement,
    backend: BackendConn,
    _ticket: Ticket,
    _backend_session: BackendSessionGuard,
}

enum BackendConn {
    Tcp(TcpStream),
    WebSocket(Box<WebSocketStream<TcpStream>>),
}

pub async fn handle(gw: &Arc<Gateway>, session: ServerSession) -> Option<ReusedHttpStream> {
    let conn_id = gw.sessions.next_conn_id();
    let client_addr: Option<SocketAddr> = session.client_addr().and_then(|a| a.as_inet()).copied();
    let span = tracing::info_span!(
        "conn",
        conn_id,
        client_addr = field::display(client_addr.map(|a| a.to_string()).unwrap_or_default()),
        session_id = field::Empty,
        user_id = field::Empty,
        pool = field::Empty,
        backend = field::Empty,
    );
    // Admission, refusal and the 101 run in their own box: they are over once the session
    // runs, and inline they (and the HTTP session they hold) would add their size to the
    // future that every live session keeps for hours.
    let upgraded = Box::pin(upgrade(gw, session, client_addr).instrument(span.clone())).await?;
    serve(gw, upgraded, conn_id, client_addr)
        .instrument(span)
        .await;
    None
}

/// A connection switched to WebSocket and admitted to its backend.
struct Upgraded {
    stream: pingora_core::protocols::Stream,
    /// Bytes the client sent right behind its request.
    early: Vec<u8>,
    admitted: Admitted,
}

async fn upgrade(
    gw: &Arc<Gateway>,
    mut session: ServerSession,
    client_addr: Option<SocketAddr>,
) -> Option<Upgraded> {
    let started = Instant::now();
    let ip = client_addr.map(|a| a.ip());
    match admit(gw, &session, ip).await {
        Err(refusal) => {
            refuse(gw, session, ip, refusal).await;
            None
        }
        Ok(admitted) => {
            gw.metrics
                .upgrade_duration
                .observe(started.elapsed().as_secs_f64());
            let early = switch_protocols(&mut session, &admitted.handshake).await?;
            gw.metrics.upgrades_total.with_label_values(&["ok"]).inc();
            let ServerSession::H1(h1) = session else {
                return None;
            };
            Some(Upgraded {
                stream: h1.into_inner(),
                early,
                admitted,
            })
        }
    }
}

/// Steps 1-7 of the upgrade path (see ARCHITECTURE.md); any refusal stops here.
async fn admit(
    gw: &Arc<Gateway>,
    session: &ServerSession,
    ip: Option<IpAddr>,
) -> Result<Admitted, Refusal> {
    // Only after the drain deadline: during the drain window an upgrade that still reaches this
    // process (accepted just before Pingora stopped its listeners, or during a binary upgrade's
    // hand-over) is served like any other and closed with 1001 at the deadline.
    if gw.admission.is_draining() {
        return Err(Refusal::new(
            ErrorCode::Draining,
            "the gateway is draining; reconnect",
        ));
    }
    let Some(h1) = session.as_http1() else {
        return Err(Refusal::new(
            ErrorCode::BadUpgrade,
            "WebSocket over HTTP/2 is not supported",
        ));
    };
    // Pingora accepts request heads up to 1 MiB; an upgrade needs a few hundred bytes plus a
    // token. Refusing big heads up front keeps oversized tokens away from the JWT parser.
    if h1.get_headers_raw_bytes().len() > MAX_UPGRADE_HEAD_BYTES {
        return Err(Refusal::new(
            ErrorCode::BadUpgrade,
            "request head is larger than 16 KiB",
        ));
    }
    let req = session.req_header();
    let handshake = handshake::validate(&req.method, req.version, &req.headers)
        .map_err(|e| Refusal::new(ErrorCode::BadUpgrade, e.to_string()))?;
    let config = gw.config();
    let origin = req.headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
    authorize::check_origin(origin, &config.auth.allowed_origins)?;
    if let Some(ip) = ip {
        gw.admission.check_auth_throttle(ip)?;
    }
    let (token, source) = extract::token(&req.headers, &req.uri, &handshake.protocols)?
        .ok_or(crate::auth::AuthError::Missing)?;
    let claims = gw.verifier().verify(&token).await?;
    drop(token);
    authorize::authorize(&claims, &config)?;
    if let Some(jti) = &claims.jti
        && gw.router.is_revoked(jti).await
    {
        return Err(crate::auth::AuthError::Revoked.into());
    }
    let span = Span::current();
    span.record("session_id", claims.session_id());
    span.record("user_id", claims.sub.as_str());
    span.record("pool", claims.pool_name());
    tracing::debug!(
        event = "token_accepted",
        source = source.as_str(),
        "token accepted"
    );

    let ticket = gw.admission.admit(&claims.sub)?;
    let placement = gw.router.place(&config, &claims).await?;
    span.record("backend", placement.backend.name.as_str());
    let connect_started = Instant::now();
    let backend = match connect(&placement.backend, config.limits.max_message_bytes).await {
        Ok(conn) => conn,
        Err(e) => {
            gw.router
                .health()
                .report_connect_failure(&placement.state, &e);
            gw.router
                .release_created(claims.session_id(), &placement)
                .await;
            tracing::warn!(event = "backend_connect_failed", error = %e, "backend connect failed");
            return Err(Refusal::new(
                ErrorCode::BackendConnectFailed,
                "could not connect to the backend",
            ));
        }
    };
    gw.metrics
        .backend_connect_duration
        .with_label_values(&[placement.pool.as_str()])
        .observe(connect_started.elapsed().as_secs_f64());
    let backend_session = placement.state.session_started();
    Ok(Admitted {
        claims,
        handshake,
        placement,
        backend,
        _ticket: ticket,
        _backend_session: backend_session,
    })
}

async fn connect(backend: &BackendConfig, max_message_bytes: usize) -> Result<BackendConn, String> {
    let target = (backend.addr.host.as_str(), backend.addr.port);
    let tcp = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    // RFB is interactive: a key press must not wait for Nagle's timer.
    let _ = tcp.set_nodelay(true);
    match &backend.protocol {
        BackendProtocol::Rfb => Ok(BackendConn::Tcp(tcp)),
        BackendProtocol::WebSocket { path } => {
            let url = format!("ws://{}{}", backend.addr, path);
            // The same limits as the client side: a backend's message is relayed as one frame,
            // so it must not be larger than what a client may send either.
            let config = WebSocketConfig::default()
                .max_message_size(Some(max_message_bytes))
                .max_frame_size(Some(max_message_bytes))
                .write_buffer_size(0);
            let handshake = tokio_tungstenite::client_async_with_config(url, tcp, Some(config));
            let (ws, _) = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, handshake)
                .await
                .map_err(|_| "websocket handshake timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok(BackendConn::WebSocket(Box::new(ws)))
        }
    }
}

async fn refuse(
    gw: &Arc<Gateway>,
    mut session: ServerSession,
    ip: Option<IpAddr>,
    refusal: Refusal,
) {
    let code = refusal.code;
    gw.metrics
        .upgrades_total
        .with_label_values(&[code.as_str()])
        .inc();
    if code.is_auth_failure() {
        gw.metrics
            .auth_failures_total
            .with_label_values(&[code.as_str()])
            .inc();
        if let Some(ip) = ip {
            gw.admission.record_auth_failure(ip);
        }
    }
    let target = extract::redacted_target(&session.req_header().uri);
    tracing::info!(
        event = "upgrade_rejected",
        code = code.as_str(),
        status = code.status().as_u16(),
        path = %target,
        "{}",
        refusal.message
    );
    let mut extra = Vec::new();
    if code == ErrorCode::BadUpgrade {
        extra.push(("sec-websocket-version", "13".to_owned()));
    }
    if code.status() == StatusCode::TOO_MANY_REQUESTS
        || code.status() == StatusCode::SERVICE_UNAVAILABLE
    {
        extra.push(("retry-after", "5".to_owned()));
    }
    session.set_keepalive(None);
    respond::send(
        session,
        code.status(),
        "application/json",
        refusal.body(),
        &extra,
    )
    .await;
}

/// Answer 101 and collect any bytes the client sent right behind the request (legal, and
/// `into_inner` would drop them): they are the start of the WebSocket stream.
async fn switch_protocols(session: &mut ServerSession, handshake: &Handshake) -> Option<Vec<u8>> {
    let mut resp = ResponseHeader::build(StatusCode::SWITCHING_PROTOCOLS, Some(4)).ok()?;
    resp.insert_header(http::header::UPGRADE, "websocket")
        .ok()?;
    resp.insert_header(http::header::CONNECTION, "Upgrade")
        .ok()?;
    resp.insert_header(
        http::header::SEC_WEBSOCKET_ACCEPT,
        handshake.accept.as_str(),
    )
    .ok()?;
    if handshake.protocols.offered {
        // Only ever `binary`: the bearer entry is a credential and is never echoed.
        resp.insert_header(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            extract::BINARY_PROTOCOL,
        )
        .ok()?;
    }
    session.write_response_header(Box::new(resp)).await.ok()?;
    let mut early = Vec::new();
    // After the 101 Pingora treats the rest of the stream as the body. Take only what is
    // already buffered or readable without waiting: RFB's server speaks first, so a client may
    // legitimately send nothing until the backend's greeting arrives.
    while early.len() < MAX_EARLY_BYTES {
        match session.read_request_body().now_or_never() {
            Some(Ok(Some(chunk))) => early.extend_from_slice(&chunk),
            _ => break,
        }
    }
    Some(early)
}

async fn serve(
    gw: &Arc<Gateway>,
    upgraded: Upgraded,
    conn_id: u64,
    client_addr: Option<SocketAddr>,
) {
    let Upgraded {
        stream,
        early,
        admitted,
    } = upgraded;
    let config = gw.config();
    let limits = &config.limits;
    let ws_config = WebSocketConfig::default()
        // Client->backend traffic is input events (a few bytes each); tungstenite's 128 KiB
        // default would be touched by its first read and cost 128 KiB per idle session. Larger
        // messages grow the buffer as needed.
        .read_buffer_size(CLIENT_READ_BUFFER)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes))
        // Frames go out as soon as they are written: RFB is latency-bound, and the bridge
        // already sends whole chunks.
        .write_buffer_size(0);
    // A plain-TCP client of a TCP backend gets the zero-copy path for bulk frames; TLS and
    // WebSocket backends copy (their bytes are transformed on the way anyway).
    let taken = match admitted.backend {
        BackendConn::Tcp(_) => ClientSocket::take(stream),
        BackendConn::WebSocket(_) => Err(TakeError::NotPlainTcp(stream)),
    };
    let client = match taken {
        Ok(socket) => Client::Spliceable(socket),
        // Handed back untouched: TLS, or a backend whose frames are re-framed anyway.
        Err(TakeError::NotPlainTcp(stream)) => Client::Copying(stream),
        Err(TakeError::Io(e)) => {
            // After the 101, so the upgrade counted as ok: count the end too (1011, as a
            // client sees a connection dropped by the gateway).
            tracing::warn!(event = "session_failed", error = %e, "could not take over the client socket");
            gw.metrics
                .disconnects_total
                .with_label_values(&[&CloseCode::Internal.as_u16().to_string()])
                .inc();
            return;
        }
    };
    // The ticket and backend-session guard are held (by name) until the session ends.
    let Admitted {
        claims,
        placement,
        backend,
        _ticket,
        _backend_session,
        ..
    } = admitted;
    let pool = placement.pool.as_str();
    let sid = claims.session_id().to_owned();
    let now = crate::routing::store::unix_ms();
    let pin = Pin {
        backend: placement.backend.name.clone(),
        pool: pool.to_owned(),
        owner: claims.sub.clone(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let (_registration, control) = gw.sessions.register(SessionInfo {
        conn_id,
        session_id: sid.clone(),
        user_id: claims.sub.clone(),
        pool: pool.to_owned(),
        backend: placement.backend.name.clone(),
        jti: claims.jti.clone(),
        token_exp: claims.exp,
        client_addr,
        started: Instant::now(),
        started_at_ms: now,
    });
    let _active = GaugeGuard::inc(gw.metrics.sessions_active.with_label_values(&[pool]));
    tracing::info!(
        event = "session_started",
        view_only = claims.view_only,
        "session started"
    );
    let started = Instant::now();
    let bridge_limits = BridgeLimits {
        ping_interval: limits.ping_interval,
        pong_timeout: limits.pong_timeout,
        idle_timeout: limits.idle_timeout,
    };
    let meters = meters(gw);
    let outcome = {
        let refresh = keep_pin_alive(gw, &sid, &pin);
        let relay = async {
            match client {
                Client::Spliceable(socket) => {
                    let splicer = Splicer::new(Arc::clone(&socket));
                    let ws = websocket(Gated(socket), early, ws_config).await;
                    relay(ws, backend, &bridge_limits, &meters, control, Some(splicer)).await
                }
                Client::Copying(stream) => {
                    let ws = websocket(stream, early, ws_config).await;
                    relay(ws, backend, &bridge_limits, &meters, control, None).await
                }
            }
        };
        let expiry = async {
            match config.auth.on_expiry {
                OnExpiry::Close => {
                    let deadline = claims.exp.saturating_add(config.auth.leeway.as_secs());
                    let left = Duration::from_secs(deadline.saturating_sub(now_unix()));
                    gw.sessions
                        .close_after(conn_id, left, CloseCode::TokenExpired)
                        .await
                }
                OnExpiry::Keep => std::future::pending().await,
            }
        };
        tokio::select! {
            outcome = relay => outcome,
            never = refresh => match never {},
            never = expiry => match never {},
        }
    };
    let code = outcome.end.code();
    gw.metrics
        .disconnects_total
        .with_label_values(&[&code.as_u16().to_string()])
        .inc();
    gw.metrics
        .session_duration
        .with_label_values(&[pool])
        .observe(started.elapsed().as_secs_f64());
    // The pin outlives the session by the idle TTL from now. A store error was already logged
    // and counted by the store; the local cache still holds the pin.
    let _ = Box::pin(gw.router.refresh_pin(&sid, &pin)).await;
    tracing::info!(
        event = "session_ended",
        close_code = code.as_u16(),
        closed_by = match outcome.end {
            bridge::EndReason::Client(_) => "client",
            bridge::EndReason::Gateway(_) => "gateway",
        },
        bytes_in = outcome.bytes_in,
        bytes_out = outcome.bytes_out,
        duration_ms = started.elapsed().as_millis() as u64,
        "session ended"
    );
}

/// The client's connection after the 101.
enum Client {
    /// Plain TCP to a TCP backend: bulk frames can be spliced.
    Spliceable(Arc<ClientSocket>),
    /// TLS (bytes are encrypted in user space) or a WebSocket backend (frames are re-framed):
    /// Pingora's stream, through tungstenite.
    Copying(pingora_core::protocols::Stream),
}

async fn websocket<S>(stream: S, early: Vec<u8>, config: WebSocketConfig) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WebSocketStream::from_partially_read(stream, early, Role::Server, Some(config)).await
}

async fn relay<S>(
    ws: WebSocketStream<S>,
    backend: BackendConn,
    limits: &BridgeLimits,
    meters: &Meters,
    control: tokio::sync::watch::Receiver<Option<CloseCode>>,
    splicer: Option<Splicer>,
) -> bridge::Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match backend {
        BackendConn::Tcp(tcp) => {
            let (r, w) = backend::tcp(tcp);
            bridge::run(ws, r, w, limits, meters, control, splicer).await
        }
        BackendConn::WebSocket(bws) => {
            let (r, w) = backend::websocket(*bws);
            bridge::run(ws, r, w, limits, meters, control, splicer).await
        }
    }
}

/// Refresh the pin while the session lives, so a session longer than the idle TTL keeps it.
async fn keep_pin_alive(gw: &Arc<Gateway>, sid: &str, pin: &Pin) -> std::convert::Infallible {
    let ttl = gw.router.idle_ttl();
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        // Boxed: inline, the store call's state would enlarge every live session's future.
        let _ = Box::pin(gw.router.refresh_pin(sid, pin)).await;
    }
}

fn meters(gw: &Gateway) -> Meters {
    let m = &gw.metrics;
    Meters {
        client_to_backend_bytes: m
            .relay_bytes_total
            .with_label_values(&["client_to_backend"]),
        backend_to_client_bytes: m
            .relay_bytes_total
            .with_label_values(&["backend_to_client"]),
        client_to_backend_wait: m
            .backpressure_wait_seconds_total
            .with_label_values(&["client_to_backend"]),
        backend_to_client_wait: m
            .backpressure_wait_seconds_total
            .with_label_values(&["backend_to_client"]),
        buffered: m.relay_buffered_bytes.clone(),
        spliced: m.relay_spliced_bytes_total.clone(),
    }
}
