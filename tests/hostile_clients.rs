//! Clients that attack the gateway's memory or break the WebSocket protocol, against the real
//! binary: what a session may hold of a message that never finishes is bounded per process by
//! `limits.message_buffer_budget_bytes` (sessions beyond it are closed with 1009 and counted),
//! broken frames are refused at their header with 1002, and a legitimate session on the same
//! gateway keeps relaying meanwhile.
//!
//! Memory is read from /proc/<gateway pid>/status (VmRSS) and compared with a bound derived
//! from the configured budget, after the gateway's metrics say every attacking session has
//! either been refused or holds everything it sent: no timing is asserted anywhere.

mod common;

use std::io;
use std::time::Duration;

use common::rfb_client::{self, WsClient, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, EVENT_TIMEOUT, Gateway, GatewayConfig, raw_upgrade, token};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;
/// `limits.max_message_bytes` (the default, written out).
const MAX_MESSAGE: usize = 4 * MIB;
/// `limits.message_buffer_budget_bytes`: room for two unfinished maximal messages.
const BUDGET: usize = 8 * MIB;
const CLIENTS: usize = 50;
/// Resident memory the attack may add beyond twice the budget. Twice: tungstenite assembles a
/// fragmented message in a `Vec` that doubles as it grows, and the blocks it outgrew stay
/// resident in the allocator for reuse, so a message of L bytes can leave up to about 2L
/// resident. The allowance covers the allocator's per-thread arenas and their padding, and
/// the transient reads (4 KiB each) of 50 sessions. Measured growth with the budget (about 15
/// runs): 8.3-8.7 MiB for fragment chains, 8.3-17.8 MiB for huge single frames (the refused
/// sessions' partial messages leave freed blocks behind), 10.6-14.6 MiB for the 50 completed
/// 4 MiB messages; bound: 24 MiB. Without it: 164-205 MiB at the first poll of the attacks,
/// 203 MiB after the completed messages (50 x 4 MiB kept).
const RSS_ALLOWANCE: u64 = 8 * MIB as u64;

/// What an attack may add to the gateway's resident memory: see [`RSS_ALLOWANCE`].
fn rss_bound() -> u64 {
    2 * BUDGET as u64 + RSS_ALLOWANCE
}

async fn start(extra_limits: &str) -> (RfbServer, Gateway) {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("echo", &backend)]);
    cfg.extra = format!(
        "limits:\n  max_message_bytes: {MAX_MESSAGE}\n  message_buffer_budget_bytes: {BUDGET}\n  \
         max_sessions_per_user: 1000\n{extra_limits}"
    );
    let gw = Gateway::start(cfg).await;
    (backend, gw)
}

/// The gateway's resident set, from /proc (the harness runs it as a child process).
fn rss(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame header: `b0` (FIN, RSV, opcode) as given, the length in its shortest form,
/// masked with [`KEY`] unless `masked` is false.
fn header(b0: u8, len: usize, masked: bool) -> Vec<u8> {
    let flag = if masked { 0x80 } else { 0 };
    let mut h = vec![b0];
    match len {
        n if n < 126 => h.push(flag | n as u8),
        n if n <= 0xFFFF => {
            h.push(flag | 126);
            h.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            h.push(flag | 127);
            h.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        h.extend_from_slice(&KEY);
    }
    h
}

/// A whole masked client frame.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = header(b0, payload.len(), true);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    f
}

/// One server frame (unmasked): the first header byte and the payload.
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await?;
    let len = match h[1] & 0x7F {
        126 => usize::from(r.read_u16().await?),
        127 => usize::try_from(r.read_u64().await?).map_err(io::Error::other)?,
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((h[0], payload))
}

/// Read until the gateway's close frame and return its code (`None`: the connection ended
/// without one). Pings are passed to `pongs` for the writer to answer.
async fn close_code(r: &mut OwnedReadHalf, pongs: Option<mpsc::Sender<Vec<u8>>>) -> Option<u16> {
    loop {
        match read_frame(r).await {
            Ok((b0, payload)) if b0 & 0x0F == 0x8 => {
                return Some(
                    payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
                );
            }
            Ok((b0, payload)) if b0 & 0x0F == 0x9 => {
                if let Some(tx) = &pongs {
                    let _ = tx.send(payload).await;
                }
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// An attacking connection: its writer and reader run as tasks (aborted, and the connection
/// closed, when it is dropped).
struct Attacker {
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}

/// Upgrade `CLIENTS` attackers; each one's writer runs `attack(write half, its pings to
/// answer)` once `go` says so, so that memory can be measured with every session open and
/// none attacking yet. Returns them and the channel on which each reports `(index, close
/// code)` when closed.
async fn attackers<F, Fut>(
    gw: &Gateway,
    name: &str,
    answer_pings: bool,
    go: &watch::Receiver<bool>,
    attack: F,
) -> (Vec<Attacker>, mpsc::UnboundedReceiver<(usize, Option<u16>)>)
where
    F: Fn(OwnedWriteHalf, mpsc::Receiver<Vec<u8>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    let mut out = Vec::new();
    for i in 0..CLIENTS {
        let (mut r, w) = raw_upgrade(gw, &format!("{name}-{i}")).await.into_split();
        let (ping_tx, ping_rx) = mpsc::channel(16);
        let closed_tx = closed_tx.clone();
        let reader = tokio::spawn(async move {
            let code = close_code(&mut r, answer_pings.then_some(ping_tx)).await;
            let _ = closed_tx.send((i, code));
        });
        let mut go = go.clone();
        let attack = attack(w, ping_rx);
        let writer = tokio::spawn(async move {
            if go.wait_for(|go| *go).await.is_ok() {
                attack.await;
            }
        });
        out.push(Attacker { writer, reader });
    }
    (out, closed_rx)
}

/// Wait until every attacker was either closed or holds all `held_each` bytes it sent: the
/// closed ones are exactly those the budget counter counts, and the message buffer gauge is
/// the survivors' bytes. Polls the metrics (an overall deadline guards against a hang), and
/// checks at every poll that resident memory stays within [`rss_bound`] of `rss_before`.
/// Returns the close codes seen.
async fn settle(
    gw: &Gateway,
    closed_rx: &mut mpsc::UnboundedReceiver<(usize, Option<u16>)>,
    held_each: usize,
    rss_before: u64,
) -> Vec<Option<u16>> {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let mut codes = Vec::new();
    loop {
        while let Ok((_, code)) = closed_rx.try_recv() {
            codes.push(code);
        }
        let exhausted = gw.metric("vncgate_message_budget_exhausted_total").await;
        let held = gw.metric("vncgate_message_buffer_bytes").await;
        let survivors = CLIENTS - codes.len();
        let grown = rss(gw).saturating_sub(rss_before);
        assert!(
            grown < rss_bound(),
            "RSS grew by {} KiB during the attack ({} sessions closed, exhausted {exhausted}, held {held})",
            grown / 1024,
            codes.len()
        );
        if exhausted == codes.len() as f64 && held == (survivors * held_each) as f64 {
            return codes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {} closed {codes:?}, exhausted {exhausted}, held {held}",
            codes.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll one series until it has `want` (an overall deadline guards against a hang).
async fn await_metric(gw: &Gateway, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let got = gw.metric(series).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn legit_session(gw: &Gateway) -> WsClient {
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", token("legit", None))));
    rfb_client::connect(&c).await.expect("upgrade").0
}

/// Send `count` messages of `size` bytes through the echo backend and compare what comes back.
async fn echo(ws: &mut WsClient, count: usize, size: usize) {
    let mut sent = Vec::new();
    for i in 0..count {
        let m: Vec<u8> = (0..size).map(|j| (j * 31 + i * 7 + size) as u8).collect();
        sent.extend_from_slice(&m);
        ws.send(Message::binary(m)).await.expect("send");
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match ws.next().await.expect("open").expect("valid") {
            Message::Binary(d) => got.extend_from_slice(&d),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == sent, "echo corrupted");
}

/// After an attack settled: the refused sessions were closed with 1009 and counted, the
/// survivors' bytes are all the gateway holds, resident memory grew by no more than the budget
/// allows, and the legitimate session still relays input (messages of one read chunk, which
/// never need budget).
async fn check_attack_outcome(
    gw: &Gateway,
    codes: &[Option<u16>],
    held_each: usize,
    rss_before: u64,
    legit: &mut WsClient,
) {
    let refused = codes.len();
    assert!(
        codes.iter().all(|c| *c == Some(1009)),
        "close codes {codes:?}"
    );
    let survivors = CLIENTS - refused;
    assert!(
        (1..=BUDGET / held_each).contains(&survivors),
        "{survivors} sessions hold their message"
    );
    gw.wait_logs(refused, |v| {
        v["event"] == "session_ended" && v["close_code"] == 1009
    })
    .await;
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1009\"}").await,
        refused as f64
    );
    assert_eq!(
        gw.metric("vncgate_message_budget_exhausted_total").await,
        refused as f64
    );
    assert_eq!(
        gw.metric("vncgate_message_buffer_bytes").await,
        (survivors * held_each) as f64
    );
    assert_eq!(
        gw.metric("vncgate_message_buffer_budget_bytes").await,
        BUDGET as f64
    );
    let rss_after = rss(gw);
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!(
        "RSS {} KiB -> {} KiB (+{} KiB); {refused} sessions refused, {survivors} hold {} KiB each",
        rss_before / 1024,
        rss_after / 1024,
        grown / 1024,
        held_each / 1024
    );
    assert!(
        grown < rss_bound(),
        "RSS grew by {} KiB with a budget of {} KiB",
        grown / 1024,
        BUDGET / 1024
    );
    echo(legit, 16, 4096).await;
}

/// (a) Each client sends a frame header declaring the largest allowed message and then all of
/// it but the last byte, and keeps the connection open (inside a frame it cannot send a pong).
#[tokio::test]
async fn unfinished_huge_frames_are_bounded_by_the_budget() {
    let (_backend, gw) = start("").await;
    let mut legit = legit_session(&gw).await;
    echo(&mut legit, 4, 4096).await;
    let sent = MAX_MESSAGE - 1;
    let (go, ready) = watch::channel(false);
    let (attackers, mut closed) = attackers(
        &gw,
        "huge",
        false,
        &ready,
        move |mut w, _pings| async move {
            let _ = w.write_all(&header(0x82, MAX_MESSAGE, true)).await;
            let chunk = vec![0x5A; 64 * 1024];
            let mut left = sent;
            while left > 0 {
                let n = left.min(chunk.len());
                if w.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            // Hold the connection open, the frame unfinished.
            std::future::pending::<()>().await;
        },
    )
    .await;
    // Every session upgraded and idle: what the attack adds is measured from here.
    let rss_before = rss(&gw);
    go.send_replace(true);
    let codes = settle(&gw, &mut closed, sent, rss_before).await;
    check_attack_outcome(&gw, &codes, sent, rss_before, &mut legit).await;

    // The attackers leave: their budget comes back, and a large message passes again.
    drop(attackers);
    await_metric(&gw, "vncgate_message_buffer_bytes", 0.0).await;
    echo(&mut legit, 1, MIB).await;
}

/// (b) Each client starts a fragmented message and sends continuation frames (FIN=0) up to just
/// below `max_message_bytes`, never the final one, answering the gateway's pings between
/// fragments (every second here) so it is never taken for dead.
#[tokio::test]
async fn unfinished_fragment_chains_are_bounded_by_the_budget() {
    let (_backend, gw) = start("  ping_interval_seconds: 1\n  pong_timeout_seconds: 60\n").await;
    let mut legit = legit_session(&gw).await;
    echo(&mut legit, 4, 4096).await;
    const FRAGMENT: usize = 16 * 1024;
    const FRAGMENTS: usize = MAX_MESSAGE / FRAGMENT - 1;
    let (answered_tx, mut answered) = mpsc::unbounded_channel::<usize>();
    let attack = move |mut w: OwnedWriteHalf, mut pings: mpsc::Receiver<Vec<u8>>| {
        let answered = answered_tx.clone();
        async move {
            let payload = vec![0xA5u8; FRAGMENT];
            for k in 0..FRAGMENTS {
                while let Ok(ping) = pings.try_recv() {
                    if w.write_all(&frame(0x8A, &ping)).await.is_err() {
                        return;
                    }
                }
                let b0 = if k == 0 { 0x02 } else { 0x00 };
                if w.write_all(&frame(b0, &payload)).await.is_err() {
                    return;
                }
            }
            // Finished sending, message still open: keep answering pings.
            let mut n = 0;
            while let Some(ping) = pings.recv().await {
                if w.write_all(&frame(0x8A, &ping)).await.is_err() {
                    return;
                }
                n += 1;
                let _ = answered.send(n);
            }
        }
    };
    let (go, ready) = watch::channel(false);
    let (attackers, mut closed) = attackers(&gw, "frag", true, &ready, attack).await;
    let rss_before = rss(&gw);
    go.send_replace(true);
    let held_each = FRAGMENTS * FRAGMENT;
    let codes = settle(&gw, &mut closed, held_each, rss_before).await;
    let survivors = CLIENTS - codes.len();
    // The survivors answer pings between their fragments; that must not disturb their
    // message (a pong wrongly parsed would close them with 1002, or change what they hold).
    let mut answers = 0;
    while answers < 2 * survivors {
        tokio::time::timeout(EVENT_TIMEOUT, answered.recv())
            .await
            .expect("survivors answer pings")
            .expect("channel open");
        answers += 1;
    }
    check_attack_outcome(&gw, &codes, held_each, rss_before, &mut legit).await;
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1002\"}").await,
        0.0
    );
    drop(attackers);
    await_metric(&gw, "vncgate_message_buffer_bytes", 0.0).await;
    echo(&mut legit, 1, MIB).await;
}

/// (c) Frames the protocol forbids are refused with 1002 at their header, before any of the
/// 4 MiB they declare is buffered (each client sends the header alone), and counted; (d) the
/// legitimate session keeps relaying.
#[tokio::test]
async fn protocol_violations_are_refused_at_the_header_with_1002() {
    let (_backend, gw) = start("").await;
    let mut legit = legit_session(&gw).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked binary frame", header(0x82, MAX_MESSAGE, false)),
        ("RSV1 set", header(0xC2, MAX_MESSAGE, true)),
        ("RSV2 and RSV3 set", header(0xB2, MAX_MESSAGE, true)),
        ("reserved data opcode 0x3", header(0x83, MAX_MESSAGE, true)),
        ("reserved control opcode 0xB", header(0x8B, 100, true)),
        ("ping declaring 4 MiB", header(0x89, MAX_MESSAGE, true)),
        (
            "continuation without a message",
            header(0x80, MAX_MESSAGE, true),
        ),
    ];
    let mut clients = Vec::new();
    for (i, (_, bytes)) in cases.iter().enumerate() {
        let mut tcp = raw_upgrade(&gw, &format!("broken-{i}")).await;
        tcp.write_all(bytes).await.expect("write");
        clients.push(tcp.into_split());
    }
    // All at once: each either gets its close frame, or (without the early refusal) waits for
    // a payload that never comes until the gateway drops it as dead.
    let codes = futures_util::future::join_all(clients.iter_mut().map(|(r, _)| async {
        tokio::time::timeout(EVENT_TIMEOUT, close_code(r, None))
            .await
            .unwrap_or(None)
    }))
    .await;
    for ((what, _), code) in cases.iter().zip(&codes) {
        assert_eq!(*code, Some(1002), "{what}");
    }
    gw.wait_logs(cases.len(), |v| {
        v["event"] == "session_ended" && v["close_code"] == 1002
    })
    .await;
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"1002\"}").await,
        cases.len() as f64
    );
    assert_eq!(gw.metric("vncgate_message_buffer_bytes").await, 0.0);
    echo(&mut legit, 16, 4096).await;
}

/// A session that received one large message keeps no buffer of that size afterwards: 50
/// sessions each send one message of `max_message_bytes` (echoed back whole), one after the
/// other so the budget is never the limit, then stay open. tungstenite alone would keep, in
/// each, a read buffer the size of the largest frame it received (the message's allocation,
/// taken back once the message is dropped).
#[tokio::test]
async fn large_messages_leave_nothing_behind_in_idle_sessions() {
    let (_backend, gw) = start("").await;
    let mut sessions = Vec::new();
    for i in 0..CLIENTS {
        let c =
            WsConnect::new(gw.ws_url(&format!("?token={}", token(&format!("paste-{i}"), None))));
        sessions.push(rfb_client::connect(&c).await.expect("upgrade").0);
    }
    let rss_before = rss(&gw);
    for ws in &mut sessions {
        echo(ws, 1, MAX_MESSAGE).await;
    }
    await_metric(&gw, "vncgate_message_buffer_bytes", 0.0).await;
    let rss_after = rss(&gw);
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!(
        "RSS {} KiB -> {} KiB (+{} KiB) after {CLIENTS} sessions each received one {} KiB message",
        rss_before / 1024,
        rss_after / 1024,
        grown / 1024,
        MAX_MESSAGE / 1024
    );
    // One message in flight at a time: at most the budget's worth of memory, twice over for
    // the fragment buffer's growth (see RSS_ALLOWANCE).
    assert!(grown < rss_bound(), "RSS grew by {} KiB", grown / 1024);
    assert_eq!(
        gw.metric("vncgate_message_budget_exhausted_total").await,
        0.0
    );
    for ws in &mut sessions {
        echo(ws, 4, 4096).await;
    }
}
