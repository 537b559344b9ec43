//! The bridge through the real gateway: bulk integrity both ways, bounded buffering under a
//! slow reader, close codes, bytes that arrive together with the upgrade request, wss://, and
//! the SIGTERM drain.

mod common;

use std::time::Instant;

use common::rfb_client::{self, WsConnect};
use common::rfb_server::{FLOOD_SEED, FloodGen, Mode, RfbServer, flood_stream_sha256};
use common::{BackendSpec, Gateway, GatewayConfig, raw_upgrade, token};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1024 * 1024;

async fn gateway_for(backend: &RfbServer) -> Gateway {
    Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", backend,
    )]))
    .await
}

/// A gateway whose listener speaks TLS with a certificate made by the test for 127.0.0.1.
struct TlsGateway {
    gw: Gateway,
    ca: Vec<u8>,
    _files: tempfile::TempDir,
}

impl TlsGateway {
    async fn start(backend: &RfbServer) -> TlsGateway {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).expect("cert");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key");
        let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", backend)]);
        cfg.tls = Some((cert, key));
        TlsGateway {
            gw: Gateway::start(cfg).await,
            ca: certified.cert.der().to_vec(),
            _files: dir,
        }
    }

    /// A wss:// client for user `sub` that trusts the test's certificate.
    fn client(&self, sub: &str) -> WsConnect {
        let mut c = WsConnect::new(format!(
            "wss://127.0.0.1:{}/websockify?token={}",
            self.gw.port,
            token(sub, None)
        ));
        c.tls = Some(rfb_client::tls_client_config(&self.ca));
        c
    }
}

async fn open(gw: &Gateway, sub: &str) -> rfb_client::WsClient {
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", token(sub, None))));
    rfb_client::connect(&c).await.expect("upgrade").0
}

#[tokio::test]
async fn bulk_256_mib_each_way_arrives_intact() {
    let total = 256 * MIB;
    let backend = RfbServer::start(Mode::Flood { total })
        .await
        .expect("fixture");
    let gw = gateway_for(&backend).await;
    let ws = open(&gw, "bulk").await;
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    let (sent, received) = tokio::join!(
        rfb_client::send_all_and_hash(&mut tx, total, 64 * 1024),
        rfb_client::recv_exact_and_hash(&mut rx, total),
    );
    let elapsed = started.elapsed();
    let sent = sent.expect("send");
    assert_eq!(
        received.expect("receive"),
        flood_stream_sha256(total),
        "backend -> client corrupted"
    );
    tx.close().await.expect("close");
    assert_eq!(
        backend.stats().wait_read_digest().await,
        sent,
        "client -> backend corrupted"
    );
    // A figure for the record, never asserted: debug build, both directions at once.
    eprintln!(
        "bulk: {} MiB each way in {:.2?} ({:.0} MB/s per direction, debug build)",
        total / MIB,
        elapsed,
        total as f64 / 1e6 / elapsed.as_secs_f64()
    );
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["bytes_in"], total);
    assert_eq!(ended["bytes_out"], total);
    assert_eq!(
        gw.metric("vncgate_relay_bytes_total{direction=\"client_to_backend\"}")
            .await,
        total as f64
    );
    assert_eq!(
        gw.metric("vncgate_relay_bytes_total{direction=\"backend_to_client\"}")
            .await,
        total as f64
    );
    // Plain TCP on both sides: the bulk of the stream took the zero-copy path. (The first
    // reads of a burst are copied while the read size grows, so not all of it.)
    let spliced = gw.metric("vncgate_relay_spliced_bytes_total").await;
    assert!(
        spliced > (total / 2) as f64 && spliced <= total as f64,
        "spliced {spliced} of {total} bytes"
    );
}

/// The gateway's answers to client pings go out on the same socket as spliced data frames:
/// every pong must arrive whole, between frames, and the data around them intact. A ping after
/// every message keeps one arriving while a frame is open.
#[tokio::test]
async fn pongs_interleave_with_spliced_frames_without_corrupting_them() {
    let total = 64 * MIB;
    let backend = RfbServer::start(Mode::Flood { total })
        .await
        .expect("fixture");
    let gw = gateway_for(&backend).await;
    let ws = open(&gw, "pings").await;
    let (mut tx, mut rx) = ws.split();
    let mut expected = FloodGen::new(FLOOD_SEED);
    let (mut got, mut pings, mut pongs) = (0u64, 0u32, 0u32);
    while got < total || pongs < pings {
        match rx.next().await.expect("stream open").expect("valid frames") {
            Message::Binary(data) => {
                let mut want = vec![0u8; data.len()];
                expected.fill(&mut want);
                assert!(data[..] == want[..], "data corrupted after {got} bytes");
                got += data.len() as u64;
                if got < total {
                    tx.send(Message::Ping(pings.to_be_bytes().to_vec().into()))
                        .await
                        .expect("ping");
                    pings += 1;
                }
            }
            Message::Pong(payload) => {
                assert_eq!(payload[..], pongs.to_be_bytes()[..], "pongs out of order");
                pongs += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, total);
    assert!(pings > 100, "only {pings} pings sent");
    assert!(gw.metric("vncgate_relay_spliced_bytes_total").await > 0.0);
}

/// TLS listeners encrypt in user space: the same bulk stream is copied, never spliced, and
/// arrives intact.
#[tokio::test]
async fn bulk_over_wss_is_copied_and_arrives_intact() {
    let total = 32 * MIB;
    let backend = RfbServer::start(Mode::Flood { total })
        .await
        .expect("fixture");
    let tls = TlsGateway::start(&backend).await;
    let gw = &tls.gw;
    let (ws, _) = rfb_client::connect(&tls.client("tls-bulk"))
        .await
        .expect("wss upgrade");
    let (_tx, mut rx) = ws.split();
    assert_eq!(
        rfb_client::recv_exact_and_hash(&mut rx, total)
            .await
            .expect("receive"),
        flood_stream_sha256(total)
    );
    assert_eq!(
        gw.metric("vncgate_relay_bytes_total{direction=\"backend_to_client\"}")
            .await,
        total as f64
    );
    assert_eq!(gw.metric("vncgate_relay_spliced_bytes_total").await, 0.0);
}

#[tokio::test]
async fn slow_reader_stalls_the_backend_without_buffering() {
    let total = 64 * MIB;
    let backend = RfbServer::start(Mode::Flood { total })
        .await
        .expect("fixture");
    let gw = gateway_for(&backend).await;
    let mut ws = open(&gw, "slow").await;
    // The client reads nothing; the backend writes until its socket buffer is full.
    backend.stats().wait_write_blocked(1).await;
    let buffered = gw.metric("vncgate_relay_buffered_bytes").await;
    let relayed = gw
        .metric("vncgate_relay_bytes_total{direction=\"backend_to_client\"}")
        .await;
    // One chunk at most: 64 KiB read into the gateway, or up to 1 MiB of page references in
    // the splice pipe while few sessions stream (src/bridge/fairness.rs).
    assert!(
        buffered <= MIB as f64,
        "gateway holds {buffered} bytes for a client that does not read"
    );
    let written = backend
        .stats()
        .bytes_written
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        written < total,
        "the backend could write everything: nothing pushed back"
    );
    eprintln!(
        "slow reader: backend blocked after {} KiB, gateway holds {buffered} bytes, relayed {relayed}",
        written / 1024
    );
    // Reading resumes: every byte still arrives, in order.
    let digest = rfb_client::recv_exact_and_hash(&mut ws, total)
        .await
        .expect("receive");
    assert_eq!(digest, flood_stream_sha256(total));
}

#[tokio::test]
async fn backend_close_is_1000() {
    let backend = RfbServer::start(Mode::CloseAfterHandshake {
        name: "brief".into(),
    })
    .await
    .expect("fixture");
    let gw = gateway_for(&backend).await;
    let mut ws = open(&gw, "alice").await;
    rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
    let frame = rfb_client::read_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1000);
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["close_code"], 1000);
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1000\"}").await,
        1.0
    );
}

#[tokio::test]
async fn backend_unreachable_is_502() {
    let dead = format!("127.0.0.1:{}", common::free_port());
    // Active checks are off in the test config: this is the data path's own connect failure.
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::rfb("gone", dead)])).await;
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", token("alice", None))));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    assert_eq!(
        rfb_client::error_code(&err),
        Some((502, "backend_connect_failed".into()))
    );
}

#[tokio::test]
async fn text_frames_and_oversized_messages_are_refused_with_their_codes() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("echo", &backend)]);
    cfg.extra = "limits:\n  max_message_bytes: 1024\n".into();
    let gw = Gateway::start(cfg).await;

    let mut ws = open(&gw, "texter").await;
    ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(
        u16::from(rfb_client::read_close(&mut ws).await.expect("close").code),
        1003
    );

    let mut ws = open(&gw, "bigger").await;
    ws.send(Message::binary(vec![7u8; 100]))
        .await
        .expect("send small");
    let echoed = ws.next().await.expect("echo").expect("message");
    assert_eq!(echoed.into_data().len(), 100, "small messages pass");
    ws.send(Message::binary(vec![7u8; 2048]))
        .await
        .expect("send big");
    let frame = rfb_client::read_close(&mut ws).await.expect("close");
    assert_eq!(u16::from(frame.code), 1009);
    gw.wait_logs(2, |v| v["event"] == "session_ended").await;
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1003\"}").await,
        1.0
    );
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1009\"}").await,
        1.0
    );
}

/// Mask a client frame (RFC 6455 §5.3) by hand: the point is to put it in the same TCP write
/// as the upgrade request, which no WebSocket client library does.
fn masked_binary_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x82, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_are_not_lost() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = gateway_for(&backend).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let request = format!(
        "GET /websockify?token={} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("early", None)
    );
    let mut bytes = request.into_bytes();
    bytes.extend(masked_binary_frame(b"RFB 003.008\n"));
    tcp.write_all(&bytes).await.expect("one write");

    // Read the 101, then the echoed frame (unmasked, from the server).
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let want_tail = b"RFB 003.008\n";
    while !got.ends_with(want_tail) {
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
    let frame_start = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head")
        + 4;
    assert_eq!(
        &got[frame_start..frame_start + 2],
        &[0x82, want_tail.len() as u8]
    );
}

#[tokio::test]
async fn wss_with_a_certificate_made_by_the_test() {
    let backend = RfbServer::start(Mode::Rfb {
        name: "tls-desk".into(),
        width: 32,
        height: 32,
        rgb: [1, 2, 3],
    })
    .await
    .expect("fixture");
    let tls = TlsGateway::start(&backend).await;
    let (mut ws, _) = rfb_client::connect(&tls.client("tls"))
        .await
        .expect("wss upgrade");
    assert!(ws.get_ref().is_tls());
    assert_eq!(
        ws.get_ref().alpn_protocol().as_deref(),
        Some(&b"http/1.1"[..])
    );
    let mut session = rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
    assert_eq!(session.server_name, "tls-desk");
    let update = rfb_client::first_framebuffer_update(&mut ws, &mut session)
        .await
        .expect("update");
    assert_eq!(update.first_pixel_rgb, [1, 2, 3]);
}

#[tokio::test]
async fn sigterm_drains_live_sessions_with_1001_and_exits_0() {
    let backend = RfbServer::start(Mode::Rfb {
        name: "d".into(),
        width: 16,
        height: 16,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.drain_seconds = 1;
    let mut gw = Gateway::start(cfg).await;
    let mut ws = open(&gw, "alice").await;
    rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
    gw.signal(libc::SIGTERM);
    let draining = gw.wait_log(|v| v["event"] == "draining").await;
    assert_eq!(draining["sessions"], 1);
    let frame = rfb_client::read_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1001);
    let status = gw.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["close_code"], 1001);
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped_as_dead() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.extra = "limits:\n  ping_interval_seconds: 1\n  pong_timeout_seconds: 1\n".into();
    let gw = Gateway::start(cfg).await;
    let _silent = raw_upgrade(&gw, "ghost").await;
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["close_code"], 1006, "{ended}");
    assert_eq!(ended["closed_by"], "client");
    // The backend side is released too.
    backend.stats().wait_closed(1).await;
}

#[tokio::test]
async fn idle_sessions_are_closed_with_4008() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.extra = "limits:\n  idle_timeout_seconds: 1\n".into();
    let gw = Gateway::start(cfg).await;
    let mut ws = open(&gw, "idler").await;
    let frame = rfb_client::read_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(frame.code), 4008);
    // The log line is written after the metrics are updated: await it before scraping.
    gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"4008\"}").await,
        1.0
    );
}

/// A browser's own close code is not the gateway's: a client closing with 1011 or 1013 must
/// not move the series the gateway's alerts read (the session_ended line keeps the real code).
#[tokio::test]
async fn close_codes_sent_by_clients_are_not_counted_as_the_gateways() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = gateway_for(&backend).await;
    for code in [1011u16, 1013] {
        let mut ws = open(&gw, "closer").await;
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "client says so".into(),
        })))
        .await
        .expect("close");
        let _ = rfb_client::read_close(&mut ws).await;
    }
    let ended = gw
        .wait_logs(2, |v| {
            v["event"] == "session_ended" && v["closed_by"] == "client"
        })
        .await;
    assert_eq!(ended[0]["close_code"], 1011);
    assert_eq!(ended[1]["close_code"], 1013);
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1011\"}").await,
        0.0
    );
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1013\"}").await,
        0.0
    );
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1000\"}").await,
        2.0
    );
}

/// A frame the WebSocket protocol forbids, sent while the gateway (terminate mode) is still in
/// its RFB handshake with the browser, gets the same 1002 as in the relay, not a silent drop.
#[tokio::test]
async fn a_protocol_error_during_the_browser_handshake_is_closed_with_1002() {
    let backend = RfbServer::start(Mode::Rfb {
        name: "d".into(),
        width: 16,
        height: 16,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let gw = gateway_for(&backend).await;
    let mut tcp = raw_upgrade(&gw, "unmasked").await;
    // The gateway speaks first: its ProtocolVersion in one binary frame.
    let (b0, version) = read_server_frame(&mut tcp).await.expect("version");
    assert_eq!((b0, &version[..]), (0x82, &b"RFB 003.008\n"[..]));
    // The answer, unmasked (RFC 6455 §5.1: a server must fail such a connection).
    let mut frame = vec![0x82, 12];
    frame.extend_from_slice(b"RFB 003.008\n");
    tcp.write_all(&frame).await.expect("write");
    let (b0, close) = read_server_frame(&mut tcp).await.expect("close frame");
    assert_eq!(b0, 0x88);
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1002);
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["close_code"], 1002);
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1002\"}").await,
        1.0
    );
}

/// One frame from the gateway (unmasked): its first header byte and its payload.
async fn read_server_frame(tcp: &mut tokio::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    tcp.read_exact(&mut h).await?;
    let len = match h[1] & 0x7F {
        126 => usize::from(tcp.read_u16().await?),
        127 => usize::try_from(tcp.read_u64().await?).map_err(std::io::Error::other)?,
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await?;
    Ok((h[0], payload))
}
