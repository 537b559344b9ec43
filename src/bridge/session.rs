//! One live session after the 101, from the RFB handshake with the browser (terminate mode) to
//! the `session_ended` line: registration (so kick, revocation, drain, expiry and input-mode
//! switches reach it), the relay, the pin kept alive, metrics and logs.
//!
//! The gateway hands over a [`SessionStart`] and calls [`serve`]; nothing here names the
//! gateway, so the arrows run gateway -> bridge -> rfb.

use std::any::Any;

use crate::recording::recorder::{Recorder, RecordingHandle};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};

use super::client::{ClientSocket, Gated, TakeError};
use super::filter::RfbFilters;
use super::frames;
use super::inbound::{self, Inbound};
use super::{BridgeLimits, ClientWrites, CloseCode, EndReason, Meters, Outcome, Splicer, backend};
use crate::auth::Claims;
use crate::metrics::{GaugeGuard, Metrics};
use crate::rfb::browser::{self, BrowserError};
use crate::rfb::handshake::{BackendStream, Handshaken, Transport};
use crate::rfb::policy::{Clipboard, Policy};
use crate::routing::{Pin, Router};
use crate::sessions::{Control, Registration, Registry, Role};

/// The backend connection as the gateway left it.
pub enum Backend {
    /// Transparent mode: raw RFB over TCP, relayed untouched.
    Tcp(TcpStream),
    /// Transparent mode: a WebSocket-native backend.
    WebSocket(Box<WebSocketStream<TcpStream>>),
    /// Terminate mode: the backend handshake is done (or waits for the browser's password).
    Rfb(Handshaken),
}

/// Per-session settings, taken from the config when the upgrade was admitted.
pub struct SessionSettings {
    pub bridge: BridgeLimits,
    pub max_message_bytes: usize,
    /// When the token's authorization runs out; `None` = sessions outlive their token.
    pub expires_in: Option<Duration>,
    /// The effective clipboard policy (pool ceiling narrowed by the claim); terminate mode.
    pub clipboard: Clipboard,
    /// Set when this connection is to be recorded (terminate mode only: the recording starts
    /// with the ServerInit the browser got).
    pub recorder: Option<Recorder>,
}

/// The process-wide handles a session reports to.
pub struct SessionEnv {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub router: Arc<Router>,
}

/// Everything [`serve`] needs, built by the gateway after the 101.
pub struct SessionStart {
    pub conn_id: u64,
    pub client: pingora_core::protocols::Stream,
    /// Bytes the client sent right behind its request.
    pub early: Vec<u8>,
    pub claims: Claims,
    pub pool: String,
    pub backend_name: String,
    /// The session's owner (the pin's): the viewer's own `sub` for a share.
    pub owner: String,
    pub backend: Backend,
    pub role: Role,
    /// The registry entry, made when the upgrade was authorized: a kick or revocation that
    /// arrived while the backend was being connected is already in `control`.
    pub registration: Registration,
    pub control: Control,
    pub settings: SessionSettings,
    /// Admission slots and counters held until the session ends (dropped with it).
    pub held: Box<dyn Any + Send + Sync>,
    pub env: SessionEnv,
    /// The pin this connection's upgrade created, if it did: released rather than kept for the
    /// idle TTL when the session never starts (the user's retry is then placed afresh).
    pub created_pin: Option<Pin>,
}

/// Serve one session to its end.
pub async fn serve(start: SessionStart) {
    let SessionStart {
        conn_id,
        client,
        early,
        claims,
        pool,
        backend_name,
        owner,
        backend,
        role,
        registration: _registration,
        control,
        settings,
        held,
        env,
        created_pin,
    } = start;
    let terminate = matches!(backend, Backend::Rfb(_));
    let view_only = *control.view_only.borrow();
    let policy = Policy {
        view_only,
        clipboard: settings.clipboard,
    };
    let sid = claims.session_id().to_owned();
    let user = claims.sub.clone();
    let now = crate::routing::store::unix_ms();
    let pin = Pin {
        backend: backend_name.clone(),
        pool: pool.clone(),
        // Refreshing recreates a pin the store lost: with its owner, never a viewer.
        owner,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let _active = GaugeGuard::inc(env.metrics.sessions_active.with_label_values(&[&pool]));
    tracing::info!(
        event = "session_started",
        view_only,
        role = role.as_str(),
        rfb_mode = if terminate {
            "terminate"
        } else {
            "transparent"
        },
        "session started"
    );
    let started = Instant::now();
    let meters = Meters::new(&env.metrics);
    let outcome = {
        let relay = relay(
            client,
            early,
            backend,
            Relay {
                settings: &settings,
                sid: &sid,
                conn_id,
                role: role.as_str(),
                user: &user,
                meters: &meters,
                control,
                policy,
                metrics: &env.metrics,
            },
        );
        let refresh = keep_pin_alive(&env.router, &sid, &pin);
        let expiry = async {
            match settings.expires_in {
                Some(left) => {
                    env.registry
                        .close_after(conn_id, left, CloseCode::TokenExpired)
                        .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            outcome = relay => outcome,
            never = refresh => match never {},
            never = expiry => match never {},
        }
    };
    let Some(outcome) = outcome else {
        // The 101 went out but the session could not start on this socket.
        env.metrics
            .disconnects_total
            .with_label_values(&[&CloseCode::Internal.as_u16().to_string()])
            .inc();
        if let Some(created) = &created_pin {
            Box::pin(env.router.release_pin(&sid, created)).await;
        }
        return;
    };
    let code = outcome.end.code();
    if code == CloseCode::TryAgain {
        // The session's event streams say `backend: lost` now, not two health checks later.
        env.registry.backend_lost(&sid);
    }
    env.metrics
        .disconnects_total
        .with_label_values(&[&outcome.end.counted_code().as_u16().to_string()])
        .inc();
    env.metrics
        .session_duration
        .with_label_values(&[&pool])
        .observe(started.elapsed().as_secs_f64());
    // The pin outlives the session by the idle TTL from now. A store error was already logged
    // and counted by the store; the local cache still holds the pin.
    let _ = Box::pin(env.router.refresh_pin(&sid, &pin)).await;
    // Slots first, then the log line: whoever acts on `session_ended` (a client reconnecting
    // at once, a test) finds the user's and the backend's slots free. The registration goes
    // last: the drain exits the process once the registry is empty, and must not cut this
    // line off (CI saw `shutdown_complete` with no `session_ended` before it).
    drop(held);
    tracing::info!(
        event = "session_ended",
        close_code = code.as_u16(),
        closed_by = match outcome.end {
            EndReason::Client(_) => "client",
            EndReason::Gateway(_) => "gateway",
        },
        bytes_in = outcome.bytes_in,
        bytes_out = outcome.bytes_out,
        duration_ms = started.elapsed().as_millis() as u64,
        "session ended"
    );
}

/// The client side, the RFB handshake with the browser where the gateway terminates RFB, and
/// the two pumps.
/// What the relay of one session works with, besides its two connections.
struct Relay<'a> {
    settings: &'a SessionSettings,
    /// The session and connection ids a recording is filed under.
    sid: &'a str,
    conn_id: u64,
    /// `owner`, or the kind of share this connection joined with (for the audit).
    role: &'a str,
    user: &'a str,
    meters: &'a Meters,
    control: Control,
    policy: Policy,
    metrics: &'a Metrics,
}

async fn relay(
    client: pingora_core::protocols::Stream,
    early: Vec<u8>,
    backend: Backend,
    r: Relay<'_>,
) -> Option<Outcome> {
    let (settings, policy) = (r.settings, r.policy);
    // tungstenite reads through `Inbound`, which hands it frames of at most one piece (larger
    // client frames are cut into fragments), so its read buffer is one piece, and a frame
    // above that is a bug of `Inbound`: tungstenite refuses it (1009) instead of buffering it.
    // The message limit applies to the fragments' sum, as before.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(inbound::PIECE)
        .max_frame_size(Some(inbound::PIECE))
        .max_message_size(Some(settings.max_message_bytes))
        // Frames go out as soon as they are written: RFB is latency-bound, and the bridge
        // already sends whole chunks.
        .write_buffer_size(0);
    let budget = Arc::clone(&r.metrics.message_budget);
    let max_message = settings.max_message_bytes;
    // Splicing moves backend bytes from a TCP socket without looking at them: only where
    // nothing needs to read the server stream (a clipboard policy that stops ServerCutText does).
    // A recorded session's server bytes are copied into the recording: none can be spliced.
    let spliceable = settings.recorder.is_none()
        && match &backend {
            Backend::Tcp(_) => true,
            Backend::Rfb(handshaken) => {
                handshaken.over_plain_tcp() && !policy.delimits_server_stream()
            }
            Backend::WebSocket(_) => false,
        };
    let taken = if spliceable {
        ClientSocket::take(client)
    } else {
        Err(TakeError::NotPlainTcp(client))
    };
    match taken {
        Ok(socket) => {
            let splicer = Splicer::new(Arc::clone(&socket));
            let ws = websocket(
                Inbound::new(Gated(socket), early, budget, max_message),
                ws_config,
            )
            .await;
            Some(relay_ws(ws, backend, r, ClientWrites::Splice(splicer)).await)
        }
        // Handed back untouched: TLS, or a backend whose bytes are re-framed or read anyway.
        Err(TakeError::NotPlainTcp(stream)) => {
            let (control, frames) = frames::share(stream);
            let ws = websocket(Inbound::new(control, early, budget, max_message), ws_config).await;
            Some(relay_ws(ws, backend, r, ClientWrites::Frames(frames)).await)
        }
        // Out of descriptors, most likely: the session never starts.
        Err(TakeError::Io(e)) => {
            tracing::warn!(event = "session_failed", error = %e, "could not take over the client socket");
            None
        }
    }
}

async fn relay_ws<S>(
    mut ws: WebSocketStream<S>,
    backend: Backend,
    r: Relay<'_>,
    writes: ClientWrites,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Relay {
        settings,
        sid,
        conn_id,
        role,
        user,
        meters,
        control,
        policy,
        metrics,
    } = r;
    let limits = &settings.bridge;
    match backend {
        Backend::Tcp(tcp) => {
            let (r, w) = backend::tcp(tcp);
            super::run(ws, r, w, limits, meters, control.close, writes, None).await
        }
        Backend::WebSocket(bws) => {
            let (r, w) = backend::websocket(*bws);
            super::run(ws, r, w, limits, meters, control.close, writes, None).await
        }
        Backend::Rfb(handshaken) => {
            // A kick, revocation or drain that came while the upgrade was under way (or comes
            // while the browser is still in its handshake) ends the session right there.
            let mut close = control.close.clone();
            let handshake = tokio::select! {
                served = browser::serve(&mut ws, handshaken) => Ok(served),
                code = close.wait_for(Option::is_some) => Err(code.ok().and_then(|c| *c)),
            };
            let served = match handshake {
                Ok(Ok(served)) => served,
                Ok(Err(e)) => return browser_failed(ws, e).await,
                Err(code) => {
                    let end = EndReason::Gateway(code.unwrap_or(CloseCode::GoingAway));
                    super::close_websocket(&mut ws, end).await;
                    return Outcome {
                        end,
                        bytes_in: 0,
                        bytes_out: 0,
                    };
                }
            };
            meters.client_to_backend_bytes.inc_by(served.bytes_in);
            meters.backend_to_client_bytes.inc_by(served.bytes_out);
            let handshake = (served.bytes_in, served.bytes_out);
            let recording = settings
                .recorder
                .as_ref()
                .and_then(|r| r.start(sid, conn_id, &served.server_init.bytes));
            if let Some(rec) = &recording {
                rec.event(serde_json::json!({
                    "event": "session_started",
                    "session_id": sid,
                    "conn_id": conn_id,
                    "user_id": user,
                    "role": role,
                    "view_only": *control.view_only.borrow(),
                }));
            }
            let filters = RfbFilters::new(
                policy.clipboard,
                control.view_only,
                served.server_init.pixel_format,
                settings.max_message_bytes,
                served.leftover,
                metrics,
                recording.clone(),
            );
            let (close, rfb) = (control.close, Some(filters));
            let outcome = match served.backend {
                BackendStream::Plain(Transport::Tcp(tcp)) => {
                    let (r, w) = backend::tcp(tcp);
                    super::run(ws, r, w, limits, meters, close, writes, rfb).await
                }
                // TLS, or a WebSocket backend: bytes a splice cannot move untouched.
                other => {
                    let (r, w) = backend::stream(other);
                    let writes = writes.without_splice();
                    super::run(ws, r, w, limits, meters, close, writes, rfb).await
                }
            };
            finish_recording(recording.as_ref(), &outcome);
            Outcome {
                bytes_in: outcome.bytes_in + handshake.0,
                bytes_out: outcome.bytes_out + handshake.1,
                ..outcome
            }
        }
    }
}

/// The session's end in its audit file, then the recording closed (its files are fsync'd by
/// the writer task, off the session's path).
fn finish_recording(recording: Option<&RecordingHandle>, outcome: &Outcome) {
    let Some(rec) = recording else {
        return;
    };
    let code = outcome.end.code().as_u16();
    rec.event(serde_json::json!({
        "event": "session_ended",
        "close_code": code,
        "closed_by": match outcome.end {
            EndReason::Client(_) => "client",
            EndReason::Gateway(_) => "gateway",
        },
    }));
    rec.finish(&format!("close_{code}"));
}

/// The browser's side of the RFB handshake failed: close with the code that says why.
async fn browser_failed<S>(mut ws: WebSocketStream<S>, e: BrowserError) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let end = match &e {
        BrowserError::Closed => EndReason::Client(CloseCode::NoStatus),
        BrowserError::Text => EndReason::Gateway(CloseCode::Unsupported),
        BrowserError::Protocol(_) => EndReason::Gateway(CloseCode::PolicyViolation),
        BrowserError::Timeout => EndReason::Gateway(CloseCode::PolicyViolation),
        // The user typed a wrong password: the backend ended the session, as it would have
        // without a gateway.
        BrowserError::PasswordRefused => EndReason::Gateway(CloseCode::Normal),
        BrowserError::Backend(_) => EndReason::Gateway(CloseCode::TryAgain),
        // A frame refused by `inbound` or tungstenite gets its code (1002, 1009) here as in
        // the relay; a vanished client is 1006.
        BrowserError::WebSocket(e) => super::classify_read_error(e),
    };
    tracing::info!(event = "rfb_handshake_failed", error = %e, "browser RFB handshake failed");
    super::close_websocket(&mut ws, end).await;
    Outcome {
        end,
        bytes_in: 0,
        bytes_out: 0,
    }
}

/// The server side of the client's WebSocket. The bytes the client sent with its request are
/// inside `stream` (an [`Inbound`]), which parses them before anything read later.
async fn websocket<S>(stream: S, config: WebSocketConfig) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WebSocketStream::from_raw_socket(stream, WsRole::Server, Some(config)).await
}

/// Refresh the pin while the session lives, so a session longer than the idle TTL keeps it.
async fn keep_pin_alive(router: &Router, sid: &str, pin: &Pin) -> std::convert::Infallible {
    let ttl = router.idle_ttl();
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        // Boxed: inline, the store call's state would enlarge every live session's future.
        let _ = Box::pin(router.refresh_pin(sid, pin)).await;
    }
}
