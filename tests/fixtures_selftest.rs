//! Checks the test fixtures themselves, without the gateway: a test that fails because a fixture
//! is wrong would otherwise be blamed on the gateway. The WebSocket→TCP bridge here is the
//! simplest correct one, with a knob for how it cuts the RFB stream into messages.

// tests/common/mod.rs allows dead code for the whole fixture tree; these modules are mounted
// directly, so they need the same allowance for the parts this file does not exercise.
#[allow(dead_code)]
#[path = "common/rfb_client.rs"]
mod rfb_client;
#[allow(dead_code)]
#[path = "common/rfb_server.rs"]
mod rfb_server;
#[allow(dead_code)]
#[path = "common/xvnc.rs"]
mod xvnc;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use rfb_client::{
    WsConnect, connect, error_code, first_framebuffer_update, read_close, recv_exact_and_hash,
    rfb_handshake, send_all_and_hash, tls_client_config,
};
use rfb_server::{FLOOD_SEED, FloodGen, Mode, RfbServer, flood_stream_sha256};
use xvnc::Xvnc;

/// Bounds every wait in this file so a broken fixture fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(30);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

/// WebSocket on one side, TCP to `backend` on the other. Backend bytes are forwarded in binary
/// messages of at most `max_message` bytes, so a small value splits RFB messages across many
/// WebSocket messages and a large one coalesces whatever the backend wrote together.
async fn start_bridge(backend: SocketAddr, max_message: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind bridge");
    let addr = listener.local_addr().expect("bridge addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(bridge_one(client, backend, max_message));
        }
    });
    addr
}

async fn bridge_one(client: TcpStream, backend: SocketAddr, max_message: usize) {
    // Without it, Nagle holds back the small messages a low `max_message` produces.
    let _ = client.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(client).await else {
        return;
    };
    let Ok(tcp) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = tcp.set_nodelay(true);
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let (mut ws_tx, mut ws_rx) = ws.split();
    let upstream = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            if msg.is_close() {
                break;
            }
            if msg.is_binary() && tcp_wr.write_all(&msg.into_data()).await.is_err() {
                break;
            }
        }
        let _ = tcp_wr.shutdown().await;
    };
    let downstream = async move {
        let mut buf = vec![0u8; max_message];
        loop {
            match tcp_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::binary(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "backend closed".into(),
        };
        let _ = ws_tx.send(Message::Close(Some(close))).await;
    };
    tokio::pin!(upstream, downstream);
    // Backend EOF ends the session: dropping `upstream` drops the TCP write half (a FIN), as a
    // gateway must, instead of waiting for the client to answer the Close.
    tokio::select! {
        _ = &mut upstream => downstream.await,
        _ = &mut downstream => {}
    }
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/websockify")
}

#[tokio::test]
async fn rfb_fixture_handshake_and_frame_survive_any_message_split() {
    let server = RfbServer::start(Mode::Rfb {
        name: "fixture desk".into(),
        width: 64,
        height: 48,
        rgb: [0x12, 0x34, 0x56],
    })
    .await
    .expect("start fixture");
    for max_message in [1, 7, 65536] {
        let bridge = start_bridge(server.addr, max_message).await;
        let (mut ws, _) = within("connect", connect(&WsConnect::new(ws_url(bridge))))
            .await
            .expect("connect");
        let mut session = within("handshake", rfb_handshake(&mut ws))
            .await
            .expect("handshake");
        assert_eq!(session.server_name, "fixture desk");
        assert_eq!((session.width, session.height), (64, 48));
        assert_eq!(session.minor_version, 8);
        let frame = within("update", first_framebuffer_update(&mut ws, &mut session))
            .await
            .expect("update");
        assert_eq!(frame.rects, 1);
        assert_eq!(frame.pixels, 64 * 48);
        assert_eq!(
            frame.first_pixel_rgb,
            [0x12, 0x34, 0x56],
            "split {max_message}"
        );
        eprintln!(
            "fixture via bridge (max message {max_message}): handshake {:?}, first update {:?}",
            session.handshake_time, frame.elapsed
        );
    }
    let m = &server.stats().messages;
    assert_eq!(m.set_pixel_format.load(Ordering::SeqCst), 3);
    assert_eq!(m.set_encodings.load(Ordering::SeqCst), 3);
    assert_eq!(m.update_requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn close_after_handshake_reaches_the_client_as_a_close_frame() {
    let server = RfbServer::start(Mode::CloseAfterHandshake {
        name: "brief".into(),
    })
    .await
    .expect("start fixture");
    let bridge = start_bridge(server.addr, 65536).await;
    let (mut ws, _) = connect(&WsConnect::new(ws_url(bridge)))
        .await
        .expect("connect");
    let session = within("handshake", rfb_handshake(&mut ws))
        .await
        .expect("handshake");
    assert_eq!(session.server_name, "brief");
    let frame = within("close", read_close(&mut ws))
        .await
        .expect("close frame");
    assert_eq!(frame.code, CloseCode::Normal);
    within("backend end", server.stats().wait_closed(1)).await;
}

#[tokio::test]
async fn flood_both_directions_digests_match() {
    const TOTAL: u64 = 8 << 20;
    let server = RfbServer::start(Mode::Flood { total: TOTAL })
        .await
        .expect("start fixture");
    let bridge = start_bridge(server.addr, 65536).await;
    let (ws, _) = connect(&WsConnect::new(ws_url(bridge)))
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    let (sent, received) = within("flood", async {
        tokio::join!(
            send_all_and_hash(&mut tx, TOTAL, 16 * 1024),
            recv_exact_and_hash(&mut rx, TOTAL)
        )
    })
    .await;
    let expected = flood_stream_sha256(TOTAL);
    assert_eq!(received.expect("receive flood"), expected);
    assert_eq!(sent.expect("send flood"), expected);
    tx.close().await.expect("send close");
    assert_eq!(
        within("backend digest", server.stats().wait_read_digest()).await,
        expected
    );
    eprintln!("8 MiB each way through the bridge: {:?}", started.elapsed());
    let stats = server.stats();
    assert_eq!(stats.bytes_written.load(Ordering::SeqCst), TOTAL);
    assert_eq!(stats.bytes_read.load(Ordering::SeqCst), TOTAL);
}

#[tokio::test]
async fn flood_reports_a_full_socket_when_the_peer_does_not_read() {
    let server = RfbServer::start(Mode::Flood { total: 256 << 20 })
        .await
        .expect("start fixture");
    let idle = TcpStream::connect(server.addr).await.expect("connect");
    within("write blocked", server.stats().blocked.notified()).await;
    within("counter", server.stats().wait_write_blocked(1)).await;
    let buffered = server.stats().bytes_written.load(Ordering::SeqCst);
    assert!(
        buffered < 256 << 20,
        "the kernel cannot buffer the whole flood"
    );
    drop(idle);
    within("backend end", server.stats().wait_closed(1)).await;
}

#[tokio::test]
async fn echo_returns_every_byte() {
    const TOTAL: u64 = 3 << 20;
    let server = RfbServer::start(Mode::Echo).await.expect("start fixture");
    let bridge = start_bridge(server.addr, 65536).await;
    let (ws, _) = connect(&WsConnect::new(ws_url(bridge)))
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let (sent, received) = within("echo", async {
        tokio::join!(
            send_all_and_hash(&mut tx, TOTAL, 1000),
            recv_exact_and_hash(&mut rx, TOTAL)
        )
    })
    .await;
    assert_eq!(sent.expect("send"), received.expect("receive"));
}

#[test]
fn flood_stream_does_not_depend_on_buffer_sizes() {
    let mut whole = vec![0u8; 1000];
    FloodGen::new(FLOOD_SEED).fill(&mut whole);
    let mut pieces = Vec::new();
    let mut source = FloodGen::new(FLOOD_SEED);
    for len in [1, 3, 8, 13, 64, 911] {
        pieces.extend(source.next_chunk(len));
    }
    assert_eq!(&pieces[..1000], &whole[..]);
}

/// Answers every connection with `status`, writing the header and the body in separate writes
/// so the client has to read past what came with the header.
async fn start_refusing_http(
    status: &'static str,
    chunked: bool,
    body: &'static str,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let framing = if chunked {
                "Transfer-Encoding: chunked".to_string()
            } else {
                format!("Content-Length: {}", body.len())
            };
            let head =
                format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n");
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.flush().await;
            let payload = if chunked {
                let (a, b) = body.split_at(body.len() / 2);
                format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len())
            } else {
                body.to_string()
            };
            let _ = s.write_all(payload.as_bytes()).await;
        }
    });
    addr
}

#[tokio::test]
async fn refused_handshake_exposes_status_and_error_code() {
    let body = r#"{"error":"token_expired","detail":"exp is in the past"}"#;
    for chunked in [false, true] {
        let addr = start_refusing_http("401 Unauthorized", chunked, body).await;
        let err = within("refusal", connect(&WsConnect::new(ws_url(addr))))
            .await
            .err()
            .expect("handshake must fail");
        assert_eq!(
            error_code(&err),
            Some((401, "token_expired".to_string())),
            "chunked {chunked}"
        );
    }
}

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
#[tokio::test]
async fn subprotocols_and_headers_are_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        let mut seen = None;
        let callback = |req: &Request, mut resp: Response| {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            seen = Some((
                header("sec-websocket-protocol"),
                header("cookie"),
                header("origin"),
            ));
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("binary"));
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async(s, callback)
            .await
            .expect("accept ws");
        drop(ws);
        seen
    });
    let mut c = WsConnect::new(ws_url(addr));
    c.subprotocols = vec!["binary".into(), "bearer.abc".into()];
    c.headers = vec![
        ("Cookie".into(), "vnc_token=xyz".into()),
        ("Origin".into(), "https://desk.example".into()),
    ];
    let (_ws, response) = within("connect", connect(&c)).await.expect("connect");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .expect("selected"),
        "binary"
    );
    let seen = server.await.expect("server task").expect("request seen");
    assert_eq!(seen.0.as_deref(), Some("binary, bearer.abc"));
    assert_eq!(seen.1.as_deref(), Some("vnc_token=xyz"));
    assert_eq!(seen.2.as_deref(), Some("https://desk.example"));
}

#[tokio::test]
async fn tls_client_trusts_an_rcgen_certificate() {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert_der = certified.cert.der().to_vec();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
        .expect("key der");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone().into()], key_der)
        .expect("server config");
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(s).await.expect("tls accept");
        let mut ws = tokio_tungstenite::accept_async(tls)
            .await
            .expect("ws accept");
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_binary() && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut c = WsConnect::new(format!("wss://localhost:{port}/websockify"));
    c.tls = Some(tls_client_config(&cert_der));
    let (mut ws, _) = within("tls connect", connect(&c))
        .await
        .expect("connect over TLS");
    assert!(ws.get_ref().is_tls());
    assert_eq!(
        ws.get_ref().alpn_protocol().as_deref(),
        Some(&b"http/1.1"[..])
    );
    ws.send(Message::binary(b"ping over tls".to_vec()))
        .await
        .expect("send");
    let echoed = within("echo", ws.next())
        .await
        .expect("message")
        .expect("ok");
    assert_eq!(echoed.into_data().as_ref(), b"ping over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_xvnc_through_the_bridge() {
    // Not skipped when missing: a suite that passes without the real server proves nothing
    // (scripts/install-deps installs it; CI runs that first).
    assert!(
        Xvnc::available(),
        "/usr/bin/Xvnc is not installed: run scripts/install-deps"
    );
    let started = Instant::now();
    let xvnc = Xvnc::start_async("selftest desktop", (640, 480))
        .await
        .expect("start Xvnc");
    eprintln!(
        "Xvnc :{} rfbport {} ready after {:?} (start() returned after {:?})",
        xvnc.display,
        xvnc.rfb_port,
        xvnc.startup_time,
        started.elapsed()
    );
    xvnc.set_root_color("#336699").expect("xsetroot");
    for max_message in [7, 65536] {
        let bridge = start_bridge(xvnc.rfb_addr(), max_message).await;
        let (mut ws, _) = within("connect", connect(&WsConnect::new(ws_url(bridge))))
            .await
            .expect("connect");
        let mut session = within("handshake", rfb_handshake(&mut ws))
            .await
            .expect("handshake");
        assert_eq!(session.server_name, "selftest desktop");
        assert_eq!((session.width, session.height), (640, 480));
        let frame = within("update", first_framebuffer_update(&mut ws, &mut session))
            .await
            .expect("update");
        assert_eq!(
            frame.first_pixel_rgb,
            [0x33, 0x66, 0x99],
            "log:\n{}",
            xvnc.log_tail(2000)
        );
        eprintln!(
            "Xvnc via bridge (max message {max_message}): handshake {:?}, first update {:?} \
             ({} rects, {} pixels)",
            session.handshake_time, frame.elapsed, frame.rects, frame.pixels
        );
    }
    let display = xvnc.display;
    let stopping = Instant::now();
    drop(xvnc);
    eprintln!("Xvnc stopped in {:?}", stopping.elapsed());
    assert!(!std::path::Path::new(&format!("/tmp/.X11-unix/X{display}")).exists());
}
