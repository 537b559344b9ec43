//! The accept path under hostile and proxied traffic (issue 13 #3, #13, PROXY protocol): the
//! head deadline, the pre-auth caps, the TLS handshake timeout, real client addresses from a
//! PROXY header, and the admin listener answering through a drain.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::rfb_client::{self, WsConnect, connect_from};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig, http_get, token};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Far above every deadline these tests configure (1 s), far below a hung test's cost.
const OUTER: Duration = Duration::from_secs(30);

async fn echo_gateway(edit: impl FnOnce(&mut GatewayConfig)) -> (RfbServer, Gateway) {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::raw("desk", backend.addr)]);
    edit(&mut cfg);
    (backend, Gateway::start(cfg).await)
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

/// Wait until the gateway closes `s` (EOF or reset), whatever it sends before.
async fn closed_by_gateway(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(OUTER, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the gateway never closed the connection");
}

/// Poll a metric until it has `want` (series are updated as connections come and go).
async fn metric_becomes(gw: &Gateway, series: &str, want: f64) {
    tokio::time::timeout(OUTER, async {
        while gw.metric(series).await != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{series} never became {want}"));
}

/// An upgrade that relays one payload through the echo backend: the gateway still serves.
async fn echo_once(c: WsConnect) {
    let (mut ws, _) = rfb_client::connect(&c).await.expect("upgrade");
    ws.send(Message::Binary(b"still serving".to_vec().into()))
        .await
        .expect("send");
    let echoed = ws.next().await.expect("a frame").expect("frame");
    assert_eq!(echoed.into_data().as_ref(), b"still serving");
}

/// `n` connections from `from` that never send a byte.
async fn open_idle(from: IpAddr, port: u16, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect_from(from, port).await.expect("connect"));
    }
    out
}

fn limits(lines: &[&str]) -> String {
    format!(
        "limits:\n{}",
        lines.iter().map(|l| format!("  {l}\n")).collect::<String>()
    )
}

/// Slow-loris: several heads trickled a line at a time, each read restarting Pingora's per-read
/// timeout, are every one cut at the head deadline, while a session that was already live and
/// one that upgrades during the attack are served.
#[tokio::test]
async fn heads_trickled_line_by_line_are_cut_at_the_deadline_while_sessions_go_on() {
    const TRICKLERS: usize = 8;
    let (_b, gw) = echo_gateway(|c| c.extra = limits(&["head_timeout_seconds: 1"])).await;
    let url = gw.ws_url(&format!("?token={}", token("alice", None)));
    let (mut live, _) = rfb_client::connect(&WsConnect::new(url))
        .await
        .expect("upgrade before the attack");

    let mut cut = Vec::new();
    for _ in 0..TRICKLERS {
        let mut s = TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .expect("connect");
        s.write_all(b"GET /websockify HTTP/1.1\r\n")
            .await
            .expect("write");
        let (mut rx, mut tx) = s.into_split();
        // The attack's own pace: a header line every 200 ms, never the blank line.
        let trickle = tokio::spawn(async move {
            for i in 0.. {
                if tx
                    .write_all(format!("X-{i}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        cut.push(async move {
            let mut buf = [0u8; 64];
            let closed = tokio::time::timeout(OUTER, rx.read(&mut buf)).await;
            trickle.abort();
            assert!(
                matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
                "a trickling head was never cut: {closed:?}"
            );
        });
    }
    // While the heads trickle: the live session relays, and a new one upgrades and relays.
    let serve = async {
        echo_on(&mut live, b"during the attack").await;
        let url = gw.ws_url(&format!("?token={}", token("bob", None)));
        let (mut second, _) = rfb_client::connect(&WsConnect::new(url))
            .await
            .expect("upgrade during the attack");
        echo_on(&mut second, b"new session").await;
    };
    tokio::join!(futures_util::future::join_all(cut), serve);
    echo_on(&mut live, b"after the attack").await;
    assert_eq!(
        gw.metric("vncgate_connections_refused_total{reason=\"head_timeout\"}")
            .await,
        TRICKLERS as f64
    );
}

/// One payload through a live session and back from the echo backend.
async fn echo_on(ws: &mut common::rfb_client::WsClient, payload: &[u8]) {
    ws.send(Message::Binary(payload.to_vec().into()))
        .await
        .expect("send");
    let echoed = ws.next().await.expect("a frame").expect("frame");
    assert_eq!(echoed.into_data().as_ref(), payload);
}

#[tokio::test]
async fn idle_connections_are_capped_per_address_and_in_total_while_sessions_go_on() {
    let (_b, gw) = echo_gateway(|c| {
        c.extra = limits(&[
            "max_pre_auth_connections: 6",
            "max_pre_auth_connections_per_address: 3",
        ])
    })
    .await;
    let url = gw.ws_url(&format!("?token={}", token("alice", None)));
    let (mut live, _) = rfb_client::connect(&WsConnect::new(url.clone()))
        .await
        .expect("a session before the flood");
    metric_becomes(&gw, "vncgate_pre_auth_connections", 0.0).await;

    let mut idle = Vec::new();
    idle.extend(open_idle(ip("127.0.0.2"), gw.port, 3).await);
    metric_becomes(&gw, "vncgate_pre_auth_connections", 3.0).await;
    let mut fourth = connect_from(ip("127.0.0.2"), gw.port)
        .await
        .expect("connect");
    closed_by_gateway(&mut fourth).await;
    assert_eq!(
        gw.metric("vncgate_connections_refused_total{reason=\"pre_auth_limit_per_address\"}")
            .await,
        1.0
    );
    idle.extend(open_idle(ip("127.0.0.3"), gw.port, 3).await);
    metric_becomes(&gw, "vncgate_pre_auth_connections", 6.0).await;
    let mut over = connect_from(ip("127.0.0.4"), gw.port)
        .await
        .expect("connect");
    closed_by_gateway(&mut over).await;
    assert_eq!(
        gw.metric("vncgate_connections_refused_total{reason=\"pre_auth_limit\"}")
            .await,
        1.0
    );

    // The admin listener and the live session are untouched by the flood.
    let (status, _) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200);
    live.send(Message::Binary(b"ping".to_vec().into()))
        .await
        .expect("send");
    assert_eq!(
        live.next()
            .await
            .expect("frame")
            .expect("frame")
            .into_data()
            .as_ref(),
        b"ping"
    );

    // A freed slot is usable again, and a session leaves the count once its token verified.
    drop(idle.pop());
    metric_becomes(&gw, "vncgate_pre_auth_connections", 5.0).await;
    echo_once(WsConnect::new(url)).await;
    metric_becomes(&gw, "vncgate_pre_auth_connections", 5.0).await;
}

#[tokio::test]
async fn a_tls_handshake_that_never_starts_is_cut_at_its_timeout() {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key");
    let (_b, gw) = echo_gateway(|c| {
        c.tls = Some((cert, key));
        c.extra = limits(&["tls_handshake_timeout_seconds: 1"]);
    })
    .await;
    let mut silent = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    closed_by_gateway(&mut silent).await;
    // The socket goes with the abandoned handshake, a moment before the refusal is counted.
    metric_becomes(
        &gw,
        "vncgate_connections_refused_total{reason=\"tls_handshake\"}",
        1.0,
    )
    .await;
    // wss:// itself still works (the handshake is the gateway's own now).
    let mut c = WsConnect::new(format!(
        "wss://127.0.0.1:{}/websockify?token={}",
        gw.port,
        token("alice", None)
    ));
    c.tls = Some(rfb_client::tls_client_config(certified.cert.der()));
    echo_once(c).await;
}

fn proxy_v1(src: &str, src_port: u16, dst_port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 {src_port} {dst_port}\r\n").into_bytes()
}

/// A PROXY protocol v2 header (RFC-less, haproxy's proxy-protocol.txt §2.2): TCP over IPv4.
fn proxy_v2(src: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h
}

#[tokio::test]
async fn the_proxy_header_address_is_the_client_everywhere() {
    let (_b, gw) = echo_gateway(|c| {
        c.proxy_protocol = Some(vec!["127.0.0.1/32".into()]);
        c.extra = limits(&["auth_failures_per_minute: 2"]);
    })
    .await;
    let url = gw.ws_url(&format!("?token={}", token("alice", None)));

    // v1 and v2 both carry the client's address into the session's log lines.
    let mut c = WsConnect::new(url.clone());
    c.preamble = proxy_v1("203.0.113.7", 40000, gw.port);
    echo_once(c).await;
    gw.wait_log(|v| v["event"] == "session_started" && v["client_addr"] == "203.0.113.7:40000")
        .await;
    let mut c = WsConnect::new(url.clone());
    c.preamble = proxy_v2([198, 51, 100, 9], 41000, gw.port);
    echo_once(c).await;
    gw.wait_log(|v| v["event"] == "session_started" && v["client_addr"] == "198.51.100.9:41000")
        .await;

    // The throttle counts per real client: one address locked out, its neighbour not.
    let forged = gw.ws_url("?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl");
    let refusal = |src: &'static str| {
        let mut c = WsConnect::new(forged.clone());
        c.preamble = proxy_v1(src, 40001, gw.port);
        async move {
            let err = rfb_client::connect(&c).await.err().expect("refused");
            rfb_client::error_code(&err).expect("an HTTP refusal").0
        }
    };
    assert_eq!(refusal("203.0.113.7").await, 401);
    assert_eq!(refusal("203.0.113.7").await, 401);
    assert_eq!(refusal("203.0.113.7").await, 429);
    assert_eq!(refusal("203.0.113.8").await, 401);
}

#[tokio::test]
async fn a_proxy_listener_refuses_connections_without_a_header_or_from_untrusted_peers() {
    let (_b, gw) = echo_gateway(|c| c.proxy_protocol = Some(vec!["127.0.0.1/32".into()])).await;
    // No header: an HTTP request where the header should be.
    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    closed_by_gateway(&mut s).await;
    assert_eq!(
        gw.metric("vncgate_connections_refused_total{reason=\"proxy_header\"}")
            .await,
        1.0
    );
    // A valid header from a peer outside trusted_proxies.
    let mut s = connect_from(ip("127.0.0.2"), gw.port)
        .await
        .expect("connect");
    // The gateway may close before the second write: its error is the expected outcome.
    let _ = s.write_all(&proxy_v1("203.0.113.7", 1, gw.port)).await;
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    closed_by_gateway(&mut s).await;
    assert_eq!(
        gw.metric("vncgate_connections_refused_total{reason=\"untrusted_proxy\"}")
            .await,
        1.0
    );
}

/// `/readyz` and `/metrics` on the admin listener answer through the whole drain: while the
/// session may still end by itself, and after the deadline while its 1001 is being delivered.
/// Pingora stops its own listeners at SIGTERM; the admin one is ours and must outlive them. A
/// poller asks again and again from the start of the drain until the session is let go, with
/// the process alive throughout (the session holds it: its closing handshake waits for this
/// client, which reads the 1001 only once the poller has stopped).
#[tokio::test]
async fn the_admin_listener_answers_through_the_whole_drain() {
    let (_b, mut gw) = echo_gateway(|c| c.drain_seconds = 2).await;
    let url = gw.ws_url(&format!("?token={}", token("alice", None)));
    let (mut live, _) = rfb_client::connect(&WsConnect::new(url))
        .await
        .expect("upgrade");
    // The 101 reaches the client just before the gateway counts the session.
    gw.wait_log(|v| v["event"] == "session_started").await;
    gw.signal(libc::SIGTERM);
    gw.wait_log(|v| v["event"] == "draining").await;

    let deadline_logged = |gw: &Gateway| {
        gw.logs().iter().any(|v| {
            v["event"] == "draining"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("deadline"))
        })
    };
    // The session is not closed by the client: the drain deadline (2 s) passes with it live,
    // and its 1001 then waits for this client's closing handshake. The poller asks until it has
    // had a whole round of answers asked after the deadline was logged.
    let (mut before, mut after) = (0, 0);
    while after < 2 {
        for path in ["/readyz", "/metrics"] {
            let after_deadline = deadline_logged(&gw);
            let (status, body) = http_get(gw.admin_port, path, &[]).await;
            let want = if path == "/readyz" { 503 } else { 200 };
            assert_eq!(status, want, "{path}: {body}");
            if path == "/readyz" {
                assert!(body.contains("draining"), "{body}");
            }
            if after_deadline {
                after += 1;
            } else {
                before += 1;
            }
        }
        // The pace of a scraper that is in a hurry; the answers are what is checked.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "accept_path: admin answers during the drain: {before} before its deadline, {after} after it"
    );
    assert!(before > 0, "no answer asked before the drain deadline");

    let close = rfb_client::read_close(&mut live)
        .await
        .expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert!(gw.wait_exit().await.success());
}

fn fds(gw: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .expect("fd dir")
        .count()
}

fn rss_kib(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Room for this test's sockets on a machine whose soft descriptor limit is Debian's 1024.
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::test]
async fn two_thousand_idle_connections_cost_bounded_descriptors_and_memory() {
    raise_fd_limit(8192);
    let (_b, gw) = echo_gateway(|c| {
        c.extra = limits(&[
            "max_pre_auth_connections: 1200",
            "max_pre_auth_connections_per_address: 400",
        ])
    })
    .await;
    let url = gw.ws_url(&format!("?token={}", token("alice", None)));
    let (mut live, _) = rfb_client::connect(&WsConnect::new(url))
        .await
        .expect("a session before the flood");
    metric_becomes(&gw, "vncgate_pre_auth_connections", 0.0).await;
    let (fds_before, rss_before) = (fds(&gw), rss_kib(&gw));

    // 500 idle connections from each of four addresses, one address after the other: the first
    // two are cut at 400 each (per address), the third's last 100 and all of the fourth's at
    // the total of 1,200 (checked first).
    let mut idle = Vec::new();
    for (n, from) in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        .into_iter()
        .enumerate()
    {
        idle.extend(open_idle(ip(from), gw.port, 500).await);
        let held = (400 * (n + 1)).min(1200);
        metric_becomes(&gw, "vncgate_pre_auth_connections", held as f64).await;
    }
    metric_becomes(
        &gw,
        "vncgate_connections_refused_total{reason=\"pre_auth_limit_per_address\"}",
        200.0,
    )
    .await;
    metric_becomes(
        &gw,
        "vncgate_connections_refused_total{reason=\"pre_auth_limit\"}",
        600.0,
    )
    .await;
    let (fds_flood, rss_flood) = (fds(&gw), rss_kib(&gw));
    eprintln!(
        "2,000 idle connections: fds {fds_before} -> {fds_flood}, RSS {rss_before} -> {rss_flood} KiB"
    );
    // One descriptor per held connection, a few for health checks in flight.
    assert!(
        fds_flood <= fds_before + 1200 + 4,
        "{fds_before} -> {fds_flood}"
    );
    // What a held connection may cost: its task, Pingora's stream and one 4 KiB read buffer;
    // measured 24-25 KiB each here, so the default caps bound it to about 200 MiB.
    assert!(
        rss_flood <= rss_before + 1200 * 32,
        "{rss_before} -> {rss_flood} KiB"
    );

    // The live session and the admin listener went on meanwhile.
    live.send(Message::Binary(b"ping".to_vec().into()))
        .await
        .expect("send");
    assert_eq!(
        live.next()
            .await
            .expect("frame")
            .expect("frame")
            .into_data()
            .as_ref(),
        b"ping"
    );
    let (status, _) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200);

    drop(idle);
    metric_becomes(&gw, "vncgate_pre_auth_connections", 0.0).await;
    tokio::time::timeout(OUTER, async {
        while fds(&gw) > fds_before + 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("descriptors were not given back");
}
