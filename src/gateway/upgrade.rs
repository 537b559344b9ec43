//! One WebSocket upgrade, from request to session end. Every check that can refuse runs before
//! the 101, so a refused client gets an HTTP status and a JSON code rather than a close frame.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::StatusCode;
use pingora_core::apps::ReusedHttpStream;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{Instrument, Span, field};

use super::connection::Connection;
use super::handshake::{self, Handshake};
use super::refusal::{ErrorCode, Refusal};
use super::{Gateway, respond};
use crate::admission::Ticket;
use crate::auth::claims::Share;
use crate::auth::mint::now_unix;
use crate::auth::{Claims, authorize, extract};
use crate::bridge::BridgeLimits;
use crate::bridge::session::{self, Backend, SessionEnv, SessionSettings, SessionStart};
use crate::config::{BackendConfig, BackendProtocol, Config, OnExpiry, RfbMode};
use crate::rfb::handshake::{self as rfb_handshake, Credentials, HandshakeError};
use crate::rfb::policy::Clipboard;
use crate::rfb::transport::{Transport, WsIo};
use crate::routing::Placement;
use crate::routing::health::BackendSessionGuard;
use crate::sessions::{Control, Registration, Role, SessionInfo};

const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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
    role: Role,
    backend: Backend,
    registration: Registration,
    control: Control,
    held: Held,
}

/// Slots held for the session's whole life; dropping them frees the slots.
struct Held {
    _ticket: Ticket,
    _backend_session: Arc<BackendSessionGuard>,
}

pub async fn handle(
    gw: &Arc<Gateway>,
    session: ServerSession,
    conn: &mut Connection,
) -> Option<ReusedHttpStream> {
    let conn_id = gw.sessions.next_conn_id();
    let client_addr = conn.client_addr;
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
    let upgraded = Box::pin(upgrade(gw, session, conn_id, conn).instrument(span.clone())).await?;
    let start = session_start(gw, upgraded, conn_id);
    session::serve(start).instrument(span).await;
    None
}

/// What the bridge needs to run the session: nothing of the gateway itself.
fn session_start(gw: &Arc<Gateway>, upgraded: Upgraded, conn_id: u64) -> SessionStart {
    let Upgraded {
        stream,
        early,
        admitted,
    } = upgraded;
    let config = gw.config();
    let limits = &config.limits;
    let expires_in = match config.auth.on_expiry {
        OnExpiry::Close => {
            let deadline = admitted
                .claims
                .exp
                .saturating_add(config.auth.leeway.as_secs());
            Some(Duration::from_secs(deadline.saturating_sub(now_unix())))
        }
        OnExpiry::Keep => None,
    };
    let pool_clipboard = config
        .pool(&admitted.placement.pool)
        .map_or(Clipboard::None, |p| p.clipboard);
    let clipboard = match admitted.claims.clipboard {
        Some(claim) => pool_clipboard.narrow(claim.into()),
        None => pool_clipboard,
    };
    // Built per session from the config it started under (a reload applies to new sessions);
    // a recorder is a few settings and handles, its writer task starts with the recording.
    let recorder = crate::recording::recorder::Recorder::new(
        config.recording.clone(),
        gw.metrics.recording.clone(),
    );
    let recorder = recorder
        .should_record(admitted.claims.record)
        .then_some(recorder);
    gw.sessions.connected(conn_id, recorder.is_some());
    SessionStart {
        created_pin: admitted.placement.created.clone(),
        conn_id,
        client: stream,
        early,
        pool: admitted.placement.pool.clone(),
        backend_name: admitted.placement.backend.name.clone(),
        owner: admitted.placement.owner.clone(),
        claims: admitted.claims,
        backend: admitted.backend,
        role: admitted.role,
        registration: admitted.registration,
        control: admitted.control,
        settings: SessionSettings {
            bridge: BridgeLimits {
                ping_interval: limits.ping_interval,
                pong_timeout: limits.pong_timeout,
                idle_timeout: limits.idle_timeout,
            },
            max_message_bytes: limits.max_message_bytes,
            expires_in,
            clipboard,
            recorder,
        },
        held: Box::new(admitted.held),
        env: SessionEnv {
            registry: Arc::clone(&gw.sessions),
            metrics: Arc::clone(&gw.metrics),
            router: Arc::clone(&gw.router),
        },
    }
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
    conn_id: u64,
    conn: &mut Connection,
) -> Option<Upgraded> {
    let started = Instant::now();
    let ip = conn.client_addr.map(|a| a.ip());
    match admit(gw, &session, conn_id, conn).await {
        Err(refusal) => {
            refuse(gw, session, ip, refusal).await;
            None
        }
        Ok(admitted) => {
            gw.metrics
                .upgrade_duration
                .observe(started.elapsed().as_secs_f64());
            let switched = switch_protocols(&mut session, &admitted.handshake).await;
            let (Some(early), ServerSession::H1(h1)) = (switched, session) else {
                // The client is gone before its session started: a pin this upgrade created
                // would otherwise hold the sid (and its owner) for the whole idle TTL.
                tracing::info!(
                    event = "upgrade_aborted",
                    "the client left before the 101 could be written"
                );
                gw.router
                    .release_created(admitted.claims.session_id(), &admitted.placement)
                    .await;
                return None;
            };
            gw.metrics.upgrades_total.with_label_values(&["ok"]).inc();
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
    conn_id: u64,
    conn: &mut Connection,
) -> Result<Admitted, Refusal> {
    let client_addr = conn.client_addr;
    let ip = client_addr.map(|a| a.ip());
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
    conn.authenticated();
    authorize::authorize(&claims, &config)?;
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
    // Registered from here on, before placement, the backend connect and the 101: a kick or a
    // revocation that arrives meanwhile reaches this connection (it starts closed with 4003)
    // instead of falling between the revocation check above and a later registration.
    let terminate = config
        .pool(claims.pool_name())
        .is_some_and(|p| p.rfb.mode == RfbMode::Terminate);
    let (registration, control) = gw.sessions.register(
        SessionInfo {
            conn_id,
            session_id: claims.session_id().to_owned(),
            user_id: claims.sub.clone(),
            pool: claims.pool_name().to_owned(),
            backend: String::new(),
            jti: claims.jti.clone(),
            token_exp: claims.exp,
            client_addr,
            started: Instant::now(),
            started_at_ms: crate::routing::store::unix_ms(),
            role: Role::Owner,
            input_switchable: terminate,
            connected: false,
            recorded: false,
        },
        terminate && claims.starts_view_only(),
    );
    // The revocation check comes after the registration, never before: a revocation is stored
    // before it is broadcast, so one stored before this read is seen here and one stored after
    // it reaches the registration. Checked before registering, a revocation landing between
    // the two was lost and the revoked token got its session.
    if let Some(jti) = &claims.jti
        && gw.router.is_revoked(jti).await
    {
        return Err(crate::auth::AuthError::Revoked.into());
    }
    let mut placement = gw.router.place(&config, &claims).await?;
    span.record("backend", placement.backend.name.as_str());
    let role = match claims.share {
        // Joining one's own session is not a share: the owner stays the owner.
        Some(_) if placement.owner == claims.sub => Role::Owner,
        Some(Share::View) => Role::View,
        Some(Share::Control) => Role::Control,
        None => Role::Owner,
    };
    gw.sessions.update(conn_id, |info| {
        info.backend = placement.backend.name.clone();
        info.role = role;
    });
    // Counted from the placement on, not from the connect: the least-loaded choice of the next
    // session (here, or on another replica through the board) must see this one.
    let backend_session = gw.router.count_session(&mut placement).await;
    let backend = match connect_backend(gw, &config, &placement).await {
        Ok(backend) => backend,
        Err(refusal) => {
            gw.router
                .release_failed(&config, claims.session_id(), &placement)
                .await;
            return Err(refusal);
        }
    };
    Ok(Admitted {
        claims,
        handshake,
        placement,
        role,
        backend,
        registration,
        control,
        held: Held {
            _ticket: ticket,
            _backend_session: backend_session,
        },
    })
}

/// Step 7: the TCP connect, and in terminate mode the RFB handshake through ServerInit.
async fn connect_backend(
    gw: &Arc<Gateway>,
    config: &Config,
    placement: &Placement,
) -> Result<Backend, Refusal> {
    let pool = placement.pool.as_str();
    let mode = config
        .pool(pool)
        .map_or(RfbMode::Transparent, |p| p.rfb.mode);
    // Terminate mode: the gateway's own login takes one of the backend's slots, from the TCP
    // connect to ServerInit (routing::health::HANDSHAKE_SLOTS says why). In transparent mode
    // the browser logs in, at its own pace: nothing to hold.
    let _slot = match mode {
        RfbMode::Terminate => match placement.state.handshake_slot().await {
            Some(slot) => Some(slot),
            None => {
                tracing::warn!(event = "backend_connect_failed", backend = %placement.backend.name,
                    "no login slot to the backend within 10 s");
                return Err(Refusal::new(
                    ErrorCode::BackendConnectFailed,
                    "the backend has too many logins in progress; try again",
                ));
            }
        },
        RfbMode::Transparent => None,
    };
    let connect_started = Instant::now();
    let resolved = match gw.router.connect_addr(config, placement).await {
        Ok(resolved) => resolved,
        Err(e) => {
            tracing::warn!(event = "backend_connect_failed", error = %e, "backend address lookup failed");
            return Err(Refusal::new(
                ErrorCode::BackendConnectFailed,
                "could not connect to the backend",
            ));
        }
    };
    let tcp = match connect_tcp(&placement.backend, resolved).await {
        Ok(tcp) => tcp,
        Err(e) => {
            gw.router
                .health()
                .report_connect_failure(&placement.state, &e);
            tracing::warn!(event = "backend_connect_failed", error = %e, "backend connect failed");
            return Err(Refusal::new(
                ErrorCode::BackendConnectFailed,
                "could not connect to the backend",
            ));
        }
    };
    gw.metrics
        .backend_connect_duration
        .with_label_values(&[pool])
        .observe(connect_started.elapsed().as_secs_f64());
    let transport = match &placement.backend.protocol {
        BackendProtocol::Rfb => Transport::Tcp(tcp),
        BackendProtocol::WebSocket { path } => {
            let ws = websocket_backend(&placement.backend, tcp, path, config.limits.max_message_bytes)
                .await
                .map_err(|e| {
                    tracing::warn!(event = "backend_connect_failed", error = %e, "backend connect failed");
                    Refusal::new(ErrorCode::BackendConnectFailed, "could not connect to the backend")
                })?;
            match mode {
                RfbMode::Transparent => return Ok(Backend::WebSocket(Box::new(ws))),
                RfbMode::Terminate => Transport::WebSocket(Box::new(WsIo::new(ws))),
            }
        }
    };
    let tcp = match (transport, mode) {
        (Transport::Tcp(tcp), RfbMode::Transparent) => return Ok(Backend::Tcp(tcp)),
        (transport, _) => transport,
    };
    let started = Instant::now();
    let tls = config.pool(pool).and_then(|p| p.rfb.tls.as_ref());
    let creds = Credentials {
        secrets: &placement.backend.credentials,
        tls,
        host: &placement.backend.addr.host,
    };
    match rfb_handshake::connect(tcp, &creds).await {
        Ok(done) => {
            gw.metrics
                .backend_handshake_duration
                .with_label_values(&[pool])
                .observe(started.elapsed().as_secs_f64());
            Ok(Backend::Rfb(done))
        }
        Err(e) => Err(handshake_refusal(placement, e)),
    }
}

/// A failed backend handshake as the client sees it, logged and counted for the operator.
fn handshake_refusal(placement: &Placement, e: HandshakeError) -> Refusal {
    let backend = placement.backend.name.as_str();
    match e {
        HandshakeError::AuthFailed(_) => {
            // The state's own counter: a dynamic backend counts in its pool's shared series.
            placement.state.count_auth_failure();
            tracing::warn!(event = "backend_auth_failed", backend, error = %e,
                "the backend refused the gateway's VNC credentials");
            Refusal::new(
                ErrorCode::BackendAuthFailed,
                "the backend refused the gateway's credentials",
            )
        }
        HandshakeError::Refused(_) | HandshakeError::Io(_) => {
            tracing::warn!(event = "backend_connect_failed", backend, error = %e, "backend refused the connection");
            Refusal::new(
                ErrorCode::BackendConnectFailed,
                "the backend refused the connection",
            )
        }
        HandshakeError::NotRfb(_)
        | HandshakeError::NoSecurityType(_)
        | HandshakeError::Tls(_)
        | HandshakeError::Timeout => {
            tracing::warn!(event = "backend_protocol_error", backend, error = %e, "backend RFB handshake failed");
            Refusal::new(
                ErrorCode::BackendProtocolError,
                "the backend did not complete the RFB handshake",
            )
        }
    }
}

/// A backend that vanishes without a FIN or RST (its VM gone, a NAT entry expired) would leave
/// the session on a frozen screen: RFB has no keep-alive of its own and the browser side keeps
/// answering pings. Kernel keep-alive probes an idle connection after 15 s (3 probes, 5 s
/// apart) and `TCP_USER_TIMEOUT` gives up on unacknowledged input after 30 s; the backend read
/// then fails and the session closes with 1013. Best effort: a socket option the kernel refuses
/// leaves the connection as it was.
fn detect_dead_peer(tcp: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(tcp, sockopt::KeepAlive, &true);
    let _ = setsockopt(tcp, sockopt::TcpKeepIdle, &15);
    let _ = setsockopt(tcp, sockopt::TcpKeepInterval, &5);
    let _ = setsockopt(tcp, sockopt::TcpKeepCount, &3);
    let _ = setsockopt(tcp, sockopt::TcpUserTimeout, &30_000);
}

/// `resolved`: the address already looked up (`discovery: dns`); otherwise the backend's host
/// is resolved by the connect itself.
async fn connect_tcp(
    backend: &BackendConfig,
    resolved: Option<std::net::SocketAddr>,
) -> Result<TcpStream, String> {
    let connect = async {
        match resolved {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((backend.addr.host.as_str(), backend.addr.port)).await,
        }
    };
    let tcp = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    // RFB is interactive: a key press must not wait for Nagle's timer.
    let _ = tcp.set_nodelay(true);
    detect_dead_peer(&tcp);
    Ok(tcp)
}

async fn websocket_backend(
    backend: &BackendConfig,
    tcp: TcpStream,
    path: &str,
    max_message_bytes: usize,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, String> {
    let url = format!("ws://{}{}", backend.addr, path);
    // The same limits as the client side: a backend's message is relayed as one frame, so it
    // must not be larger than what a client may send either.
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
        .write_buffer_size(0);
    let handshake = tokio_tungstenite::client_async_with_config(url, tcp, Some(config));
    let (ws, _) = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| "websocket handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(ws)
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
    gw.count_refusal(code, ip);
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
