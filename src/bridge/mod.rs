//! The bridge: after the 101, the only code that touches payload bytes.
//!
//! Two pumps run in one task: client -> backend and backend -> client. Each holds at most one
//! chunk (one client message, or one backend read of [`backend::READ_CHUNK`]) between reading it
//! and finishing the write on the other side, and reads the next one only after that write
//! completed. So a side that stops reading stalls the other side's reads (TCP backpressure all
//! the way to the sender) and memory per session stays bounded, whatever the peers do.
//! A client message that is still arriving sits in tungstenite before the pump sees it:
//! [`inbound`] keeps tungstenite's frames to 4 KiB and takes any unfinished message beyond
//! that from the process-wide [`budget::MessageBudget`], so that part is bounded per process.
//!
//! The backend -> client pump also owns the session's timers (ping, dead peer, idle) and its
//! control channel (drain, kick), because it holds the WebSocket sink that sends pings and the
//! final close frame.

pub mod backend;
pub mod budget;
pub mod client;
mod close;
mod fairness;
mod filter;
pub mod frames;
pub mod inbound;
pub mod session;
pub mod splice;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use prometheus::{Counter, IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub use backend::{BackendRead, BackendWrite};
use client::ClientSocket;
pub use close::{CloseCode, EndReason};
use fairness::Share;
pub use filter::RfbFilters;
use frames::FrameWriter;
use splice::Fill;
pub use splice::Splicer;

/// How long the closing handshake may take before the connection is simply dropped.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-session settings, copied from the config when the session starts (a reload does not
/// change a live session).
#[derive(Debug, Clone)]
pub struct BridgeLimits {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub idle_timeout: Option<Duration>,
}

/// Pre-resolved metric handles, so the hot path never looks a label up.
#[derive(Clone)]
pub struct Meters {
    pub client_to_backend_bytes: IntCounter,
    pub backend_to_client_bytes: IntCounter,
    pub client_to_backend_wait: Counter,
    pub backend_to_client_wait: Counter,
    pub buffered: IntGauge,
    pub spliced: IntCounter,
}

impl Meters {
    pub fn new(m: &crate::metrics::Metrics) -> Meters {
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
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: EndReason,
    /// Client -> backend payload bytes.
    pub bytes_in: u64,
    /// Backend -> client payload bytes.
    pub bytes_out: u64,
}

/// Bytes held between read and write; subtracted when dropped so a cancelled write (the other
/// pump ended the session) cannot leave the gauge high.
struct Held<'a> {
    gauge: &'a IntGauge,
    n: i64,
}

impl<'a> Held<'a> {
    fn new(gauge: &'a IntGauge, n: usize) -> Self {
        let n = n as i64;
        gauge.add(n);
        Held { gauge, n }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.sub(self.n);
    }
}

/// Milliseconds since the session started, the unit of the pumps' shared timestamps.
struct Clock {
    start: Instant,
}

impl Clock {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Relay until one side ends or the control channel says to close; then close both sides.
/// `rfb`: terminate mode's filters (input policy, and the server stream where the clipboard
/// policy needs it delimited); `None` relays bytes untouched.
#[allow(clippy::too_many_arguments)]
pub async fn run<S, R, W>(
    ws: WebSocketStream<S>,
    mut backend_read: R,
    mut backend_write: W,
    limits: &BridgeLimits,
    meters: &Meters,
    mut control: watch::Receiver<Option<CloseCode>>,
    writes: ClientWrites,
    rfb: Option<RfbFilters>,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: BackendRead,
    W: BackendWrite,
{
    let (mut splicer, mut frames) = match writes {
        ClientWrites::Tungstenite => (None, None),
        ClientWrites::Splice(splicer) => (Some(splicer), None),
        ClientWrites::Frames(frames) => (None, Some(frames)),
    };
    let (mut sink, mut stream) = ws.split();
    let clock = Clock {
        start: Instant::now(),
    };
    // Shared by the two pumps (two futures of one task); atomics only because the task must be
    // `Send`, never contended.
    let last_seen = AtomicU64::new(0);
    // While a backend write is pending the client pump reads nothing, pongs included; that
    // silence is the backend's backpressure, not a dead client.
    let writing_backend = AtomicBool::new(false);
    let last_input = AtomicU64::new(0);
    let bytes_in = AtomicU64::new(0);
    let bytes_out = AtomicU64::new(0);
    // A peer that neither answers a ping nor accepts a byte for this long is treated as dead
    // (half-open sockets never error on their own).
    let dead_after = limits.ping_interval + limits.pong_timeout;
    let (mut inbound, mut outbound, recording) = match rfb {
        Some(f) => (Some(f.inbound), f.outbound, f.recording),
        None => (None, None, None),
    };

    let client_to_backend = async {
        // Terminate mode: what the browser sent right behind its ClientInit comes first.
        let mut pending = inbound.as_mut().and_then(|f| f.take_leftover());
        loop {
            let msg = match pending.take() {
                Some(data) => Message::Binary(data),
                None => match stream.next().await {
                    None => return EndReason::Client(CloseCode::Abnormal),
                    Some(Err(e)) => return classify_read_error(&e),
                    Some(Ok(msg)) => msg,
                },
            };
            last_seen.store(clock.now_ms(), Ordering::Relaxed);
            match msg {
                Message::Binary(data) => {
                    last_input.store(clock.now_ms(), Ordering::Relaxed);
                    let data = match inbound.as_mut() {
                        None => data,
                        Some(f) => match f.apply(data) {
                            Ok(kept) if kept.is_empty() => continue,
                            Ok(kept) => kept,
                            Err(end) => return end,
                        },
                    };
                    let n = data.len();
                    let _held = Held::new(&meters.buffered, n);
                    let started = Instant::now();
                    writing_backend.store(true, Ordering::Relaxed);
                    let written = backend_write.write_chunk(data).await;
                    writing_backend.store(false, Ordering::Relaxed);
                    last_seen.store(clock.now_ms(), Ordering::Relaxed);
                    meters
                        .client_to_backend_wait
                        .inc_by(started.elapsed().as_secs_f64());
                    if written.is_err() {
                        return EndReason::Gateway(CloseCode::TryAgain);
                    }
                    bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    meters.client_to_backend_bytes.inc_by(n as u64);
                }
                Message::Text(_) => return EndReason::Gateway(CloseCode::Unsupported),
                Message::Close(frame) => {
                    let code = frame.map(|f| CloseCode::from_client(u16::from(f.code)));
                    return EndReason::Client(code.unwrap_or(CloseCode::NoStatus));
                }
                // Pings are answered by tungstenite; a pong only proves liveness (recorded above).
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    };

    let backend_to_client = async {
        // A session that registered after a drain (or a kick) already asked it to close starts
        // with that code: a watch channel's initial value is never reported as a change.
        if let Some(code) = *control.borrow_and_update() {
            return EndReason::Gateway(code);
        }
        let mut buf = BytesMut::new();
        let mut share = Share::new();
        // The client socket whose spliced bytes show a long send's progress.
        let progress = splicer.as_ref().map(|s| Arc::clone(s.client()));
        let mut moved_since_tick = false;
        let mut ping = tokio::time::interval(limits.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate; the first ping goes one interval in
        let idle = limits.idle_timeout.unwrap_or(Duration::MAX);
        let idle_timer = tokio::time::sleep(idle.min(Duration::from_secs(86400 * 365)));
        tokio::pin!(idle_timer);
        loop {
            tokio::select! {
                read = next_chunk(&mut backend_read, &mut buf, splicer.as_mut(), &mut share) => {
                    moved_since_tick = true;
                    let chunk = match read {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => return EndReason::Gateway(CloseCode::Normal),
                        Err(_) => return EndReason::Gateway(CloseCode::TryAgain),
                    };
                    // Only copied chunks reach here when the server stream is filtered: the
                    // session does not splice then.
                    let chunk = match (chunk, outbound.as_mut()) {
                        (Chunk::Copied(data), Some(f)) => match f.apply(data) {
                            Ok(kept) if kept.is_empty() => continue,
                            Ok(kept) => Chunk::Copied(kept),
                            Err(end) => return end,
                        },
                        (chunk, _) => chunk,
                    };
                    // A recorded session is never spliced: every chunk is a copy. Handing it
                    // over never waits for the disk (the recorder drops what it cannot queue).
                    if let (Some(rec), Chunk::Copied(data)) = (&recording, &chunk) {
                        rec.server_data(data);
                    }
                    let n = chunk.len();
                    let spliced = matches!(chunk, Chunk::Piped(_));
                    let held = Held::new(&meters.buffered, n);
                    let started = Instant::now();
                    let sent = match (chunk, splicer.as_mut()) {
                        (Chunk::Copied(data), _) => match frames.as_mut() {
                            Some(frames) => {
                                // As before a spliced frame: tungstenite's pending bytes first.
                                let frame = async {
                                    sink.flush().await.map_err(io::Error::other)?;
                                    frames.send(data).await
                                };
                                within_stall(frame, dead_after, &mut control, None).await
                            }
                            None => {
                                within_stall(sink.send(Message::Binary(data)), dead_after, &mut control, None).await
                            }
                        },
                        (Chunk::Piped(n), Some(splicer)) => {
                            // tungstenite may hold the rest of a pong it began; it must go out
                            // before the frame opens.
                            let frame = async {
                                sink.flush().await.map_err(io::Error::other)?;
                                splicer.send_frame(n).await
                            };
                            within_stall(frame, dead_after, &mut control, progress.as_deref()).await
                        }
                        (Chunk::Piped(_), None) => Err(EndReason::Gateway(CloseCode::Internal)),
                    };
                    if let Err(end) = sent {
                        return end;
                    }
                    meters.backend_to_client_wait.inc_by(started.elapsed().as_secs_f64());
                    bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    meters.backend_to_client_bytes.inc_by(n as u64);
                    if spliced {
                        meters.spliced.inc_by(n as u64);
                    }
                    drop(held);
                    share.after_chunk(n).await;
                }
                _ = ping.tick() => {
                    // Quiet for a whole interval: the pipe's two descriptors go back.
                    if !moved_since_tick && let Some(splicer) = splicer.as_mut() {
                        splicer.release_pipe();
                    }
                    moved_since_tick = false;
                    let silent = clock.now_ms().saturating_sub(last_seen.load(Ordering::Relaxed));
                    if Duration::from_millis(silent) > dead_after && !writing_backend.load(Ordering::Relaxed) {
                        return EndReason::Client(CloseCode::Abnormal);
                    }
                    if let Err(end) = within_stall(sink.send(Message::Ping(Bytes::new())), dead_after, &mut control, None).await {
                        return end;
                    }
                }
                _ = &mut idle_timer, if limits.idle_timeout.is_some() => {
                    let quiet = Duration::from_millis(
                        clock.now_ms().saturating_sub(last_input.load(Ordering::Relaxed)),
                    );
                    if quiet >= idle {
                        return EndReason::Gateway(CloseCode::Idle);
                    }
                    idle_timer.as_mut().reset(tokio::time::Instant::now() + (idle - quiet));
                }
                changed = control.changed() => {
                    match (changed, *control.borrow()) {
                        (_, Some(code)) => return EndReason::Gateway(code),
                        // The registry dropped its sender: nobody can close us any more, which
                        // only happens at process teardown.
                        (Err(_), None) => return EndReason::Gateway(CloseCode::GoingAway),
                        (Ok(()), None) => {}
                    }
                }
            }
        }
    };

    let end = tokio::select! {
        end = client_to_backend => end,
        end = backend_to_client => end,
    };

    // A frame the cancelled pump left half-sent is completed first: anything written inside it
    // would corrupt the stream. If the client does not take it, no close frame can be sent.
    let stream_whole = match (splicer.as_mut(), frames.as_mut()) {
        (Some(splicer), _) if splicer.frame_open() => {
            matches!(
                tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, splicer.finish_frame()).await,
                Ok(Ok(()))
            )
        }
        (_, Some(frames)) if frames.frame_open() => {
            matches!(
                tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, frames.finish()).await,
                Ok(Ok(()))
            )
        }
        _ => true,
    };
    if stream_whole {
        finish(&mut sink, &mut stream, end).await;
    }
    // Bounded: a WebSocket backend that stopped reading would otherwise hold the session (and
    // its slots and gauges) forever while its close waits to flush.
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, backend_write.shutdown()).await;
    Outcome {
        end,
        bytes_in: bytes_in.load(Ordering::Relaxed),
        bytes_out: bytes_out.load(Ordering::Relaxed),
    }
}

/// How the relay's data frames reach the client besides tungstenite, which writes the rest.
pub enum ClientWrites {
    /// Every frame through tungstenite.
    Tungstenite,
    /// Plain TCP: backend bytes spliced, copied ones through tungstenite.
    Splice(Splicer),
    /// Everything else: copied bytes framed without tungstenite's copy ([`frames`]).
    Frames(FrameWriter),
}

impl ClientWrites {
    /// For a backend whose bytes cannot be spliced: the splice writer goes, tungstenite (which
    /// shares the socket with it) writes everything.
    pub fn without_splice(self) -> ClientWrites {
        match self {
            ClientWrites::Splice(_) => ClientWrites::Tungstenite,
            other => other,
        }
    }
}

/// One backend chunk between its read and its write to the client.
enum Chunk {
    /// Read into user space; sent through tungstenite.
    Copied(Bytes),
    /// This many bytes wait in the splicer's pipe.
    Piped(usize),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Copied(data) => data.len(),
            Chunk::Piped(n) => *n,
        }
    }
}

/// The next backend chunk: spliced while the backend streams in bulk and the client socket
/// allows it, read into `buf` otherwise. A stream that has to wait for its backend leaves the
/// bulk count while it waits.
async fn next_chunk<R: BackendRead>(
    backend: &mut R,
    buf: &mut BytesMut,
    splicer: Option<&mut Splicer>,
    share: &mut Share,
) -> io::Result<Option<Chunk>> {
    let mut read = pin!(read_chunk(backend, buf, splicer));
    if let Poll::Ready(chunk) = poll_once(read.as_mut()).await {
        return chunk;
    }
    share.pause();
    read.await
}

async fn read_chunk<R: BackendRead>(
    backend: &mut R,
    buf: &mut BytesMut,
    splicer: Option<&mut Splicer>,
) -> io::Result<Option<Chunk>> {
    if let (Some(splicer), Some(tcp)) = (splicer, backend.as_tcp()) {
        if tcp.is_bulk() {
            match splicer.fill(tcp.socket()).await? {
                Fill::Moved(n) => {
                    tcp.adapt(n);
                    return Ok(Some(Chunk::Piped(n)));
                }
                Fill::Closed => return Ok(None),
                Fill::Unsupported => {}
            }
        } else {
            splicer.release_pipe();
        }
    }
    Ok(backend.read_chunk(buf).await?.map(Chunk::Copied))
}

/// Run one send to the client, giving up when the client accepts nothing for `stall` (a dead
/// or stalled reader) or when the control channel closes the session meanwhile. `progress`
/// grows while a long send advances (a spliced frame of up to 1 MiB to a slow client): the
/// deadline counts from the last progress, not from the start.
async fn within_stall<F, E>(
    send: F,
    stall: Duration,
    control: &mut watch::Receiver<Option<CloseCode>>,
    progress: Option<&ClientSocket>,
) -> Result<(), EndReason>
where
    F: Future<Output = Result<(), E>>,
{
    let mut send = pin!(send);
    // Most sends complete on their first poll (the socket has room). Only a send that has to
    // wait gets a timer: a timer per message was a wheel insert and removal on every frame.
    if let Poll::Ready(sent) = poll_once(send.as_mut()).await {
        return sent.map_err(|_| EndReason::Client(CloseCode::Abnormal));
    }
    let progressed = || progress.map_or(0, ClientSocket::progress);
    let mut seen = progressed();
    let deadline = tokio::time::sleep(stall);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            sent = &mut send => return sent.map_err(|_| EndReason::Client(CloseCode::Abnormal)),
            changed = control.changed() => {
                if let Some(code) = *control.borrow() {
                    return Err(EndReason::Gateway(code));
                }
                if changed.is_err() {
                    return Err(EndReason::Gateway(CloseCode::GoingAway));
                }
            }
            _ = &mut deadline => {
                let now = progressed();
                if now == seen {
                    return Err(EndReason::Client(CloseCode::Abnormal));
                }
                seen = now;
                deadline.as_mut().reset(tokio::time::Instant::now() + stall);
            }
        }
    }
}

/// Poll `fut` once with the task's own context (so a pending future is registered for its
/// wake-up) and say what it returned.
async fn poll_once<F: Future>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

fn classify_read_error(e: &WsError) -> EndReason {
    // What `inbound` refused at a frame header, before tungstenite buffered the frame.
    if let Some(refused) = inbound::InboundError::from_ws(e) {
        return EndReason::Gateway(refused.close_code());
    }
    match e {
        WsError::Capacity(_) => EndReason::Gateway(CloseCode::TooBig),
        // The browser's TCP connection ended without a close frame (a tab killed, a network
        // gone): an abnormal closure by the client, not a protocol error of the gateway's.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            EndReason::Client(CloseCode::Abnormal)
        }
        WsError::Protocol(_) => EndReason::Gateway(CloseCode::ProtocolError),
        WsError::Utf8(_) => EndReason::Gateway(CloseCode::Unsupported),
        _ => EndReason::Client(CloseCode::Abnormal),
    }
}

/// The close frame the gateway sends for `end`, when it sends one (1005/1006 never are).
fn close_frame(end: EndReason) -> Option<CloseFrame> {
    match end {
        EndReason::Gateway(code) if code.is_sendable() => Some(CloseFrame {
            code: code.as_u16().into(),
            reason: code.reason().into(),
        }),
        _ => None,
    }
}

/// Close a WebSocket that never reached the pumps (the browser's RFB handshake failed).
pub(crate) async fn close_websocket<S>(ws: &mut WebSocketStream<S>, end: EndReason)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(frame) = close_frame(end) {
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, ws.close(Some(frame))).await;
    }
}

/// The closing handshake: send our close frame (or flush tungstenite's reply to the client's),
/// then wait briefly for the peer's answer so the client sees a clean close, not a reset.
async fn finish<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    stream: &mut futures_util::stream::SplitStream<WebSocketStream<S>>,
    end: EndReason,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match (close_frame(end), end) {
        (Some(frame), _) => {
            let closing = async {
                if sink.send(Message::Close(Some(frame))).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = stream.next().await {
                    if msg.is_close() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, closing).await;
        }
        (None, EndReason::Client(CloseCode::Abnormal)) => {}
        (None, _) => {
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, sink.close()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn limits() -> BridgeLimits {
        BridgeLimits {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(20),
            idle_timeout: None,
        }
    }

    fn meters() -> Meters {
        let yaml = "listeners: [{ addr: \"127.0.0.1:1\" }]\npaths: [\"/w\"]\n\
                    auth: { algorithms: [HS256], secret_env: S }\n\
                    pools: { default: { backends: [{ name: a, addr: \"127.0.0.1:2\" }] } }\n";
        let config =
            crate::config::Config::from_yaml(yaml, &|_| Some("x".repeat(40))).expect("config");
        Meters::new(&crate::metrics::Metrics::new(&config).expect("metrics"))
    }

    /// A session registered after the drain began is born closing (its control channel's
    /// initial value, which a watch channel never reports as a change): the bridge closes it at
    /// once with 1001 instead of relaying until the process exits (and the client sees 1006).
    #[tokio::test]
    async fn a_session_registered_after_the_drain_started_closes_1001() {
        let (client_io, gateway_io) = tokio::io::duplex(64 * 1024);
        let (backend_io, _backend_peer) = tokio::io::duplex(64 * 1024);
        let ws = WebSocketStream::from_raw_socket(gateway_io, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let (r, w) = backend::stream(backend_io);
        let registry = crate::sessions::Registry::new();
        registry.close_all_from_now(CloseCode::GoingAway);
        let (_registration, control) =
            registry.register(crate::sessions::SessionInfo::for_test(1, "late"), false);
        let (limits, meters) = (limits(), meters());
        let run = run(
            ws,
            r,
            w,
            &limits,
            &meters,
            control.close,
            ClientWrites::Tungstenite,
            None,
        );
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let (outcome, frame) = tokio::join!(run, async {
                loop {
                    match client.next().await {
                        Some(Ok(Message::Close(frame))) => return frame,
                        Some(Ok(_)) => {}
                        _ => return None,
                    }
                }
            });
            (outcome, frame)
        })
        .await
        .expect("the session ran on although it was born closing");
        assert_eq!(outcome.0.end, EndReason::Gateway(CloseCode::GoingAway));
        assert_eq!(outcome.1.map(|f| u16::from(f.code)), Some(1001));
    }
}
