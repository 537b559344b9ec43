//! Reliability (issue 13), over real components: the `vncgate` binary in front of real TigerVNC
//! `Xvnc` desktops run with their defaults (security `TLSVnc,VncAuth`, blacklist on).
//!
//! - A reconnect loop: 1,000 connect / handshake / close cycles and 200 kick-and-reconnect
//!   cycles, every one of which must succeed, with the gateway's open descriptors and resident
//!   memory measured before and after (no leak per session); and a burst of users opening one
//!   desktop at once, which TigerVNC's blacklist must not turn into refusals.
//! - Backend faults through a fault-injecting TCP proxy (`common::fault_proxy`) between the
//!   gateway and one desktop: an orderly drop, a reset, a half-open path and a latency spike,
//!   each while a second session on another desktop keeps working; and a path gone really
//!   silent (a veth in a network namespace whose frames are dropped: no FIN, no RST, no ICMP),
//!   which the proxy cannot produce since it keeps its own TCP connection alive: the session on
//!   it closes 1013 by itself (keep-alive and `TCP_USER_TIMEOUT` on backend sockets).
//! - Property tests: arbitrary request heads (parsed by Pingora, as the gateway does) and header
//!   sets never panic the WebSocket handshake checks or the token extraction, and what they
//!   accept obeys the contract.
//!
//! Nothing here waits on a fixed sleep or asserts a duration: tests await close frames, log
//! lines and metric values (polled with an overall deadline, `EVENT_TIMEOUT`).

mod common;

use std::future::Future;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::desktop::wait_pointer_at;
use common::fault_proxy::{Fault, FaultProxy};
use common::rfb_client::{self, WsClient, WsConnect};
use common::xvnc::{Security, Xvnc};
use common::{BackendSpec, EVENT_TIMEOUT, Gateway, GatewayConfig, Live, now, token_with_claims};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const PASSWORD: &str = "r3l1able";
const PASSWORD_ENV: &str = "VNCGATE_TEST_VNC_PASSWORD";
/// Small desktops: a full Raw frame is 300 KiB, enough to be "mid-stream" for a while without
/// making 1,000 cycles expensive.
const GEOMETRY: (u16, u16) = (320, 240);
const PIXELS: u64 = GEOMETRY.0 as u64 * GEOMETRY.1 as u64;
const ACTIVE: &str = "vncgate_sessions_active{pool=\"default\"}";
/// How often polled values (metrics, descriptor counts) are read.
const POLL: Duration = Duration::from_millis(50);

/// A TigerVNC desktop with its defaults: no `-SecurityTypes`, no blacklist flag, a password.
async fn desktop(name: &str) -> Xvnc {
    Xvnc::builder()
        .name(name)
        .geometry(GEOMETRY)
        .security(Security::Default {
            password: PASSWORD.into(),
        })
        .start_async()
        .await
        .expect("Xvnc")
}

/// A gateway whose pool logs in to `backends` with the desktops' password.
fn config(backends: Vec<BackendSpec>) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(backends);
    cfg.rfb.password_env = Some(PASSWORD_ENV.into());
    cfg.env.push((PASSWORD_ENV.into(), PASSWORD.into()));
    cfg
}

fn jwt(sub: &str, sid: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    token_with_claims(&claims)
}

fn connect_spec(gw: &Gateway, token: &str) -> WsConnect {
    WsConnect::new(gw.ws_url(&format!("?token={token}")))
}

/// Upgrade and RFB handshake, with every failure as text (the loops count failures rather than
/// stopping at the first).
async fn try_open(gw: &Gateway, token: &str) -> Result<Live, String> {
    let (mut ws, _) = rfb_client::connect(&connect_spec(gw, token))
        .await
        .map_err(|e| format!("upgrade: {e} {:?}", rfb_client::error_code(&e)))?;
    let session = rfb_client::rfb_handshake(&mut ws)
        .await
        .map_err(|e| format!("RFB handshake: {e}"))?;
    Ok(Live { ws, session })
}

/// The refusal (status, code) of an upgrade that must not succeed.
async fn refusal(gw: &Gateway, token: &str) -> (u16, String) {
    match rfb_client::connect(&connect_spec(gw, token)).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => rfb_client::error_code(&e).unwrap_or_else(|| panic!("not an HTTP refusal: {e}")),
    }
}

/// Polls `series` until `done` holds for its value; panics after `EVENT_TIMEOUT`.
async fn wait_metric(gw: &Gateway, series: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let v = gw.metric(series).await;
        if done(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}");
        tokio::time::sleep(POLL).await;
    }
}

// ------------------------------------------------------------------------------------------
// 1. The reconnect loop.

/// Cycles in flight at once: more than TigerVNC's default blacklist threshold (5), so the
/// gateway's per-backend login slots (`routing::health::HANDSHAKE_SLOTS`) are exercised too.
const WORKERS: usize = 8;
const WARMUP_CYCLES: usize = 24;
const RECONNECT_CYCLES: usize = 1000;
const KICK_CYCLES: usize = 200;
/// Every fifth cycle also reads a full framebuffer update (300 KiB through the relay).
const UPDATE_EVERY: usize = 5;
/// Turns one hung cycle into a counted failure; not a timing assertion (a cycle takes
/// milliseconds).
const CYCLE_GUARD: Duration = Duration::from_secs(30);
/// Consecutive equal descriptor counts (`POLL` apart) that make a count "settled".
const STABLE_READINGS: usize = 20;
/// Descriptors the gateway may hold at a reading without any client: the socket of one RFB
/// health check in flight per actively checked backend (one backend here). Nothing else is
/// opened without a client, and the test opens nothing while it reads the counts; a check lasts
/// milliseconds, so catching one across `STABLE_READINGS` readings is already unlikely.
const FD_ALLOWANCE: usize = 1;
/// Resident memory the gateway may gain over the loops without it being a leak: glibc keeps
/// freed memory in its per-thread arenas (up to 8 x cores of them, each with its own free
/// lists and top chunk) instead of returning it, so the peak of the concurrent sessions
/// (WebSocket and relay buffers grown to 64 KiB, RFB framers) may stay resident in arenas the
/// warm-up did not happen to use. A per-session leak of even 8 KiB over 1,200 sessions is
/// above it.
const RSS_ALLOWANCE_KIB: u64 = 8 * 1024;

#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .count()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Waits until no session is live and the descriptor count has stopped changing, then reads
/// descriptors and resident memory.
async fn settle(gw: &Gateway) -> Usage {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    wait_metric(gw, ACTIVE, |v| v == 0.0).await;
    let pid = gw.pid();
    let mut last = open_fds(pid);
    let mut same = 0;
    while same < STABLE_READINGS {
        assert!(
            Instant::now() < deadline,
            "the descriptor count never settled (last {last})"
        );
        tokio::time::sleep(POLL).await;
        let n = open_fds(pid);
        if n == last {
            same += 1;
        } else {
            (last, same) = (n, 0);
        }
    }
    Usage {
        fds: last,
        rss_kib: rss_kib(pid),
    }
}

/// Runs `total` cycles, `WORKERS` at a time; returns the failures.
async fn run_cycles<F, Fut>(total: usize, cycle: F) -> Vec<String>
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let workers = (0..WORKERS).map(|worker| {
        let (next, failures, cycle) = (&next, &failures, &cycle);
        async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return;
                }
                let failure = match tokio::time::timeout(CYCLE_GUARD, cycle(worker, n)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e,
                    Err(_) => format!("hung for {CYCLE_GUARD:?}"),
                };
                failures
                    .lock()
                    .expect("failures")
                    .push(format!("cycle {n} (worker {worker}): {failure}"));
            }
        }
    });
    futures_util::future::join_all(workers).await;
    failures.into_inner().expect("failures")
}

/// Upgrade, RFB handshake as a client, sometimes a full framebuffer update, then a clean close.
/// One session id per worker: a user reconnecting to the same desktop.
async fn reconnect_cycle(gw: &Gateway, worker: usize, n: usize) -> Result<(), String> {
    let token = jwt(
        &format!("loop{worker}"),
        &format!("loop{worker}"),
        json!({}),
    );
    let Live {
        mut ws,
        mut session,
    } = try_open(gw, &token).await?;
    if session.server_name != "reliability" || (session.width, session.height) != GEOMETRY {
        return Err(format!(
            "ServerInit {:?} {}x{}",
            session.server_name, session.width, session.height
        ));
    }
    if n.is_multiple_of(UPDATE_EVERY) {
        let update = rfb_client::first_framebuffer_update(&mut ws, &mut session)
            .await
            .map_err(|e| format!("framebuffer update: {e}"))?;
        if update.pixels != PIXELS {
            return Err(format!("update carried {} pixels", update.pixels));
        }
    }
    close_cleanly(&mut ws).await
}

/// Close 1000 from the client; the gateway must answer with its Close and then close TCP.
async fn close_cleanly(ws: &mut WsClient) -> Result<(), String> {
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    })))
    .await
    .map_err(|e| format!("send close: {e}"))?;
    let mut reply = None;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(frame)) => reply = Some(frame),
            Ok(_) => {}
            Err(e) => return Err(format!("closing handshake: {e} (reply so far {reply:?})")),
        }
    }
    match reply {
        Some(Some(f)) if f.code == CloseCode::Normal => Ok(()),
        other => Err(format!("close reply {other:?}")),
    }
}

/// Open a session, kick it through the admin API, see 4003. The next cycle of the worker is
/// the reconnect (same user, same session id).
async fn kick_cycle(gw: &Gateway, worker: usize) -> Result<(), String> {
    let sid = format!("kick{worker}");
    let mut live = try_open(gw, &jwt(&sid, &sid, json!({}))).await?;
    let (status, body) = gw
        .admin("DELETE", &format!("/admin/sessions/{sid}"), "")
        .await;
    if status != 200 {
        return Err(format!("DELETE /admin/sessions/{sid}: {status} {body}"));
    }
    match rfb_client::read_close(&mut live.ws).await {
        Some(f) if u16::from(f.code) == 4003 => Ok(()),
        other => Err(format!("after the kick: {other:?}")),
    }
}

fn report_failures(what: &str, failures: &[String], desk: &Xvnc) {
    assert!(
        failures.is_empty(),
        "{} of the {what} cycles failed; Xvnc's log ends with:\n{}\nfirst failures:\n{}",
        failures.len(),
        desk.log_tail(4000),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_thousand_reconnects_and_two_hundred_kicks_leak_nothing() {
    let desk = desktop("reliability").await;
    // Health checks as configured by default (RFB, every 5 s): they run throughout.
    let gw = Gateway::start(config(vec![BackendSpec::rfb("desk", desk.rfb_addr())])).await;

    let started = std::time::Instant::now();
    let warmup = run_cycles(WARMUP_CYCLES, |w, n| reconnect_cycle(&gw, w, n)).await;
    report_failures("warm-up", &warmup, &desk);
    let before = settle(&gw).await;

    let failures = run_cycles(RECONNECT_CYCLES, |w, n| reconnect_cycle(&gw, w, n)).await;
    let reconnect_time = started.elapsed();
    report_failures("reconnect", &failures, &desk);
    let between = settle(&gw).await;

    let kicks = run_cycles(KICK_CYCLES, |w, _| kick_cycle(&gw, w)).await;
    report_failures("kick-and-reconnect", &kicks, &desk);
    let after = settle(&gw).await;
    eprintln!(
        "reliability: {WARMUP_CYCLES} warm-up + {RECONNECT_CYCLES} reconnect cycles \
         ({WORKERS} at a time, every {UPDATE_EVERY}th with a full frame) in {reconnect_time:?}, \
         then {KICK_CYCLES} kick cycles; total {:?}\n\
         reliability: gateway pid {}: fds before {} / after reconnects {} / after kicks {}; \
         VmRSS before {} KiB / after reconnects {} KiB / after kicks {} KiB",
        started.elapsed(),
        gw.pid(),
        before.fds,
        between.fds,
        after.fds,
        before.rss_kib,
        between.rss_kib,
        after.rss_kib,
    );

    // Every cycle went through the gateway exactly once: nothing was retried behind our back.
    let upgrades = (WARMUP_CYCLES + RECONNECT_CYCLES + KICK_CYCLES) as f64;
    assert_eq!(
        gw.metric("vncgate_upgrades_total{result=\"ok\"}").await,
        upgrades
    );
    assert_eq!(
        gw.metric("vncgate_disconnects_total{code=\"4003\"}").await,
        KICK_CYCLES as f64
    );
    for (when, usage) in [
        ("after the reconnects", between),
        ("after the kicks", after),
    ] {
        assert!(
            usage.fds <= before.fds + FD_ALLOWANCE && usage.fds + FD_ALLOWANCE >= before.fds,
            "descriptors {when}: {} (before: {})",
            usage.fds,
            before.fds
        );
        assert!(
            usage.rss_kib <= before.rss_kib + RSS_ALLOWANCE_KIB,
            "VmRSS {when}: {} KiB (before: {} KiB)",
            usage.rss_kib,
            before.rss_kib
        );
    }
    // Every connection authenticated and no more than five were pending at once: TigerVNC's
    // blacklist never refused the gateway.
    assert!(!desk.blacklisted(), "{}", desk.log_tail(2000));
    let live = try_open(&gw, &jwt("last", "last", json!({})))
        .await
        .expect("the desktop is still reachable");
    assert_eq!(live.session.server_name, "reliability");
}

/// Simultaneous first connections in the burst test.
const BURST: usize = 12;

/// TigerVNC with its defaults counts, per client address, every connection it accepts until
/// one from that address authenticates (`VNCServerST::addSocket` calls
/// `Blacklist::isBlackmarked`, which adds a mark; only a successful authentication,
/// `queryConnection`, clears them): with `BlacklistThreshold` 5 the sixth connection accepted
/// before any authenticated gets "Too many security failures" and the address is blocked for
/// `BlacklistTimeout` (10 s, doubling) unless an authentication clears it. Behind the gateway
/// every user has the gateway's address, so users opening one desktop at once (a class joining
/// a shared desktop, every viewer reconnecting after a drain's 1001) must not add up to that:
/// every one of them gets in.
#[tokio::test]
async fn a_burst_of_users_opening_one_desktop_at_once_is_not_refused() {
    let desk = desktop("burst").await;
    let gw = Gateway::start(config(vec![BackendSpec::rfb("desk", desk.rfb_addr())])).await;
    let opens = (0..BURST).map(|i| {
        let gw = &gw;
        async move {
            let user = format!("burst{i}");
            try_open(gw, &jwt(&user, &user, json!({})))
                .await
                .map_err(|e| format!("user {i}: {e}"))
        }
    });
    let results = futures_util::future::join_all(opens).await;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    eprintln!(
        "reliability: burst of {BURST}: {} refused; Xvnc blacklisted the gateway: {}",
        failures.len(),
        desk.blacklisted()
    );
    let blacklisted = desk
        .log_tail(usize::MAX)
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("connections: blacklisted"))
        .count();
    assert!(
        failures.is_empty() && blacklisted == 0,
        "{} of {BURST} simultaneous users were refused; Xvnc logged {blacklisted} \
         \"Connections: blacklisted\" lines:\n{}",
        failures.len(),
        failures.join("\n"),
    );
}

// ------------------------------------------------------------------------------------------
// 3. Backend faults.

const FAULTY_RGB: [u8; 3] = [0x33, 0x66, 0x99];
const HEALTHY_RGB: [u8; 3] = [0x99, 0x66, 0x33];

fn hex(rgb: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", rgb[0], rgb[1], rgb[2])
}

/// Two desktops in one pool: `faulty` reached through a fault proxy, `healthy` directly. A
/// session on each, placed by the token's `backend` claim, each with one frame read (Raw,
/// 32bpp) so later frames can be requested directly.
struct Rig {
    faulty: Xvnc,
    healthy: Xvnc,
    proxy: FaultProxy,
    gw: Gateway,
    on_faulty: Live,
    on_healthy: Live,
}

async fn rig(pool_extra: &str, extra: &str) -> Rig {
    let (faulty, healthy) = tokio::join!(desktop("faulty"), desktop("healthy"));
    faulty.set_root_color(&hex(FAULTY_RGB)).expect("xsetroot");
    healthy.set_root_color(&hex(HEALTHY_RGB)).expect("xsetroot");
    let proxy = FaultProxy::start(faulty.rfb_addr()).await.expect("proxy");
    let mut cfg = config(vec![
        BackendSpec::rfb("faulty", proxy.addr()),
        BackendSpec::rfb("healthy", healthy.rfb_addr()),
    ]);
    cfg.pool_extra = pool_extra.into();
    cfg.extra = extra.into();
    let gw = Gateway::start(cfg).await;
    let on_faulty = open_on(&gw, "alice", "a", "faulty", FAULTY_RGB).await;
    let on_healthy = open_on(&gw, "bob", "b", "healthy", HEALTHY_RGB).await;
    Rig {
        faulty,
        healthy,
        proxy,
        gw,
        on_faulty,
        on_healthy,
    }
}

async fn open_on(gw: &Gateway, sub: &str, sid: &str, backend: &str, rgb: [u8; 3]) -> Live {
    let mut live = try_open(gw, &jwt(sub, sid, json!({ "backend": backend })))
        .await
        .unwrap_or_else(|e| panic!("session on {backend}: {e}"));
    assert_eq!(live.session.server_name, backend);
    let update = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("first update");
    assert_eq!((update.pixels, update.first_pixel_rgb), (PIXELS, rgb));
    live
}

/// A whole frame of the expected colour, and a pointer move that reaches the X server: bytes
/// both ways through a session that must be undisturbed.
async fn relay_payload(live: &mut Live, desk: &Xvnc, rgb: [u8; 3], at: (u16, u16)) {
    let update = rfb_client::framebuffer_update(&mut live.ws, &mut live.session, false)
        .await
        .expect("frame");
    assert_eq!((update.pixels, update.first_pixel_rgb), (PIXELS, rgb));
    rfb_client::send_pointer_event(&mut live.ws, at.0, at.1, 0)
        .await
        .expect("pointer");
    wait_pointer_at(&desk.display_name(), (at.0 as i32, at.1 as i32)).await;
}

/// Full frames back to back until the session fails; `fault` is set while they flow (once the
/// third has arrived, with the fourth already requested), so it hits the session mid-stream.
/// Returns the frames read and the error.
async fn stream_until_fault(live: &mut Live, proxy: &FaultProxy, fault: Fault) -> (u64, io::Error) {
    let (frames_tx, mut frames_rx) = watch::channel(0u64);
    let stream = async {
        let mut frames = 0u64;
        loop {
            match rfb_client::framebuffer_update(&mut live.ws, &mut live.session, false).await {
                Ok(update) => {
                    assert_eq!(update.pixels, PIXELS, "a frame arrived damaged");
                    frames += 1;
                    frames_tx.send_replace(frames);
                }
                Err(e) => return (frames, e),
            }
        }
    };
    let inject = async {
        if frames_rx.wait_for(|n| *n >= 3).await.is_ok() {
            proxy.set(fault);
        }
    };
    let (out, ()) = tokio::time::timeout(EVENT_TIMEOUT, async { tokio::join!(stream, inject) })
        .await
        .unwrap_or_else(|_| panic!("{fault:?}: the session neither failed nor ended"));
    out
}

/// The faulty session ends with `code` (frame, log line with the backend, metric), the healthy
/// one is undisturbed, and once the path works again the user gets back in (the retry the
/// close code asks for).
async fn assert_fault_ends_session(fault: Fault, code: u16) {
    let mut rig = rig("", "").await;
    let (frames, err) = stream_until_fault(&mut rig.on_faulty, &rig.proxy, fault).await;
    let frame = rfb_client::close_frame(&err)
        .unwrap_or_else(|| panic!("{fault:?}: no close frame, {err} after {frames} frames"));
    eprintln!(
        "reliability: {fault:?} after {frames} frames: close {} {:?}",
        u16::from(frame.code),
        frame.reason.as_str()
    );
    assert_eq!(u16::from(frame.code), code, "{fault:?}: {frame:?}");
    let ended = rig
        .gw
        .wait_log(|v| v["event"] == "session_ended" && v["backend"] == "faulty")
        .await;
    assert_eq!(ended["close_code"], code, "{ended}");
    wait_metric(
        &rig.gw,
        &format!("vncgate_disconnects_total{{code=\"{code}\"}}"),
        |v| v == 1.0,
    )
    .await;

    relay_payload(&mut rig.on_healthy, &rig.healthy, HEALTHY_RGB, (40, 30)).await;
    assert_eq!(rig.gw.metric(ACTIVE).await, 1.0);

    rig.proxy.set(Fault::Pass);
    let mut back = reconnect(&rig.gw, "alice", "a").await;
    assert_eq!(back.session.server_name, "faulty");
    rfb_client::first_framebuffer_update(&mut back.ws, &mut back.session)
        .await
        .expect("frame after the reconnect");
    relay_payload(&mut back, &rig.faulty, FAULTY_RGB, (70, 50)).await;
    relay_payload(&mut rig.on_healthy, &rig.healthy, HEALTHY_RGB, (41, 31)).await;
}

/// Reconnects as a client told to try again would, until the gateway lets it in. Refusals the
/// faulted window may leave for a moment (the backend marked down by a check that ran into the
/// fault, until the next check) are retried; anything else fails.
async fn reconnect(gw: &Gateway, sub: &str, sid: &str) -> Live {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        match try_open(gw, &jwt(sub, sid, json!({}))).await {
            Ok(live) => return live,
            Err(e) if e.contains("backend_unavailable") && Instant::now() < deadline => {
                tokio::time::sleep(POLL).await;
            }
            Err(e) => panic!("reconnect to {sid}: {e}"),
        }
    }
}

/// The proxy closes both connections in order (FIN, no RST) while a frame streams. To the
/// gateway that is the VNC server ending the session, which the contract (§6) reports as 1000
/// "backend closed the session", as for an Xvnc that exits (`tests/bridge.rs`,
/// `tests/browser_scenarios.rs`). The gateway cannot tell it from a network drop that ends
/// with a FIN.
#[tokio::test]
async fn an_orderly_backend_drop_mid_stream_closes_1000_and_spares_other_sessions() {
    assert_fault_ends_session(Fault::Drop, 1000).await;
}

/// The backend connection is reset mid-stream: 1013, "backend connection lost; try again".
#[tokio::test]
async fn a_backend_reset_mid_stream_closes_1013_and_spares_other_sessions() {
    assert_fault_ends_session(Fault::Reset, 1013).await;
}

/// Each chunk of the backend path is held 100 ms both ways while frames stream and input
/// flows: the session survives and every byte arrives intact and in order (whole frames of the
/// colour the desktop shows, which changes during the spike; pointer moves on the X side).
#[tokio::test]
async fn a_latency_spike_slows_a_session_without_breaking_it() {
    let mut rig = rig("", "").await;
    rig.proxy.set(Fault::Delay(Duration::from_millis(100)));
    relay_payload(&mut rig.on_faulty, &rig.faulty, FAULTY_RGB, (10, 20)).await;
    let repainted = [0x10, 0xa0, 0x50];
    rig.faulty
        .set_root_color(&hex(repainted))
        .expect("xsetroot");
    relay_payload(&mut rig.on_faulty, &rig.faulty, repainted, (200, 100)).await;
    relay_payload(&mut rig.on_healthy, &rig.healthy, HEALTHY_RGB, (5, 5)).await;

    rig.proxy.set(Fault::Pass);
    relay_payload(&mut rig.on_faulty, &rig.faulty, repainted, (300, 200)).await;
    assert_eq!(rig.gw.metric(ACTIVE).await, 2.0);
    assert!(
        rig.gw.logs().iter().all(|v| v["event"] != "session_ended"),
        "a session ended during the spike"
    );
}

/// Send a non-incremental FramebufferUpdateRequest for the whole screen.
async fn request_whole_screen(live: &mut Live) {
    let mut request = vec![3u8, 0, 0, 0, 0, 0];
    request.extend_from_slice(&GEOMETRY.0.to_be_bytes());
    request.extend_from_slice(&GEOMETRY.1.to_be_bytes());
    live.ws
        .send(Message::binary(request))
        .await
        .expect("request");
}

/// The next message other than a ping or pong on a session that must stay quiet and open;
/// reading answers the gateway's pings.
async fn next_message(ws: &mut WsClient) -> Option<Result<Message, String>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => return other.map(|r| r.map_err(|e| e.to_string())),
        }
    }
}

/// The path to one desktop goes half-open: no byte either way, no FIN, no RST, on the live
/// connection and on every new one. What the gateway does:
///
/// - the live session is not ended: the proxy keeps its own TCP connection to the gateway
///   alive (it acknowledges every byte), so the kernel's dead-peer detection on the backend
///   socket has nothing to notice and RFB has no keep-alive of its own; the session stays open,
///   frozen, through many ping intervals and beyond the backend being marked down; a kick still
///   closes it (4003), so it is not wedged. A path that really goes silent is closed by the
///   kernel's timers: `a_backend_path_gone_silent_closes_1013_by_itself_and_spares_other_sessions`;
/// - a new upgrade to that desktop during the window gets a 502 once the gateway's RFB
///   handshake timeout runs out (bounded, not hung);
/// - the RFB health check times out too, and after two failed checks the backend is marked
///   down: from then on its pinned session and tokens naming it get 503 `backend_unavailable`
///   at once, while new sessions go to the healthy desktop;
/// - the session on the other desktop is undisturbed throughout.
#[tokio::test]
async fn a_half_open_backend_is_marked_down_and_refused_while_others_work() {
    let Rig {
        faulty: _faulty,
        healthy,
        proxy,
        gw,
        mut on_faulty,
        mut on_healthy,
    } = rig(
        "    health_check_interval_seconds: 1\n",
        "limits:\n  ping_interval_seconds: 1\n  pong_timeout_seconds: 5\n",
    )
    .await;
    proxy.set(Fault::Blackhole);
    // A request for the whole screen, which can never be answered now.
    request_whole_screen(&mut on_faulty).await;

    let probe = async {
        let token = jwt("carol", "c", json!({ "backend": "faulty" }));
        refusal(&gw, &token).await
    };
    let marked_down = gw.wait_log(|v| {
        v["event"] == "backend_health_changed" && v["backend"] == "faulty" && v["up"] == false
    });
    // Both sessions are read meanwhile (their pings answered); neither may end or get data.
    let (probe, down) = tokio::select! {
        both = async { tokio::join!(probe, marked_down) } => both,
        m = next_message(&mut on_faulty.ws) => panic!("the half-open session got {m:?}"),
        m = next_message(&mut on_healthy.ws) => panic!("the healthy session got {m:?}"),
    };
    eprintln!("reliability: half-open: new upgrade during the window got {probe:?}; {down}");
    assert_eq!(probe, (502, "backend_protocol_error".into()));

    // The half-open session keeps being read (its pings answered) while the rest is checked.
    let checks = async {
        // Refused at once now that the backend is down.
        assert_eq!(
            refusal(&gw, &jwt("alice", "a", json!({}))).await,
            (503, "backend_unavailable".into())
        );
        assert_eq!(
            refusal(&gw, &jwt("dave", "d", json!({ "backend": "faulty" }))).await,
            (503, "backend_unavailable".into())
        );
        // The half-open session is still registered and open.
        assert_eq!(gw.metric(ACTIVE).await, 2.0);
        let (_, sessions) = gw.admin("GET", "/admin/sessions", "").await;
        let sessions: Value = serde_json::from_str(&sessions).expect("json");
        let sids: Vec<&str> = sessions["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .filter_map(|s| s["session_id"].as_str())
            .collect();
        assert!(sids.contains(&"a"), "{sessions}");

        relay_payload(&mut on_healthy, &healthy, HEALTHY_RGB, (60, 40)).await;
        let mut fresh = try_open(&gw, &jwt("erin", "e", json!({})))
            .await
            .expect("a new session on the healthy desktop");
        assert_eq!(fresh.session.server_name, "healthy");
        rfb_client::first_framebuffer_update(&mut fresh.ws, &mut fresh.session)
            .await
            .expect("frame");
        close_cleanly(&mut fresh.ws).await.expect("close");
    };
    tokio::select! {
        () = checks => {}
        m = next_message(&mut on_faulty.ws) => panic!("the half-open session got {m:?}"),
    }

    // Only a kick ends the frozen session.
    let (status, _) = gw.admin("DELETE", "/admin/sessions/a", "").await;
    assert_eq!(status, 200);
    let closed = rfb_client::read_close(&mut on_faulty.ws)
        .await
        .expect("close");
    assert_eq!(u16::from(closed.code), 4003);
    relay_payload(&mut on_healthy, &healthy, HEALTHY_RGB, (61, 41)).await;
}

// ------------------------------------------------------------------------------------------
// 2. Property tests: request heads and header sets against the handshake checks and the token
// extraction. Pure (no gateway process): Pingora's own HTTP/1 parser turns bytes into the
// request the gateway would see.

mod properties {
    use base64::Engine;
    use http::header::{AUTHORIZATION, COOKIE, ORIGIN, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION};
    use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
    use pingora_core::protocols::http::v1::server::HttpSession;
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use vncgate::auth::authorize;
    use vncgate::auth::extract::{self, TokenSource};
    use vncgate::gateway::handshake;

    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
    }

    /// What Pingora parses out of `head`, as the gateway receives it; `None` if it refuses.
    fn parse(head: &[u8]) -> Option<(Method, Uri, Version, HeaderMap)> {
        RUNTIME.with(|rt| {
            rt.block_on(async {
                let stream: pingora_core::protocols::Stream =
                    Box::new(std::io::Cursor::new(head.to_vec()));
                let mut session = HttpSession::new(stream);
                match session.read_request().await {
                    Ok(Some(_)) => {
                        let r = session.req_header();
                        Some((
                            r.method.clone(),
                            r.uri.clone(),
                            r.version,
                            r.headers.clone(),
                        ))
                    }
                    _ => None,
                }
            })
        })
    }

    /// Runs both entry points on a request and checks what they accept against the contract.
    fn check(
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
    ) -> Result<(), TestCaseError> {
        let validated = handshake::validate(method, version, headers);
        if let Ok(hs) = &validated {
            prop_assert_eq!(method, &Method::GET);
            prop_assert!(version >= Version::HTTP_11);
            let key = headers
                .get(SEC_WEBSOCKET_KEY)
                .expect("accepted without a key");
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .expect("accepted an undecodable key");
            prop_assert_eq!(raw.len(), 16);
            prop_assert_eq!(&hs.accept, &derive_accept_key(key.as_bytes()));
            prop_assert_eq!(
                headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()),
                Some(&b"13"[..])
            );
            // §3: a client offering subprotocols must be able to get `binary`.
            prop_assert!(!hs.protocols.offered || hs.protocols.has_binary);
        }
        let protocols = match &validated {
            Ok(hs) => hs.protocols.clone(),
            Err(_) => extract::subprotocols(headers).unwrap_or_default(),
        };
        let found = extract::token(headers, uri, &protocols);
        if let Ok(Some((token, source))) = &found {
            prop_assert!(!token.is_empty());
            // The token is one the request carried, from the source it is attributed to.
            match source {
                TokenSource::Header => prop_assert!(
                    headers
                        .get(AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains(token.as_str()))
                ),
                TokenSource::Subprotocol => {
                    prop_assert_eq!(protocols.bearer.as_deref(), Some(token.as_str()))
                }
                TokenSource::Query => prop_assert!(
                    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                        .any(|(k, v)| k == extract::QUERY_PARAM && v == token.as_str())
                ),
                TokenSource::Cookie => prop_assert!(
                    headers
                        .get_all(COOKIE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.contains(token.as_str()))
                ),
            }
        }
        // §3, first found wins: a well-formed bearer Authorization header beats every other
        // source.
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, t)| scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty())
            .map(|(_, t)| t.trim().to_owned());
        if let Some(t) = bearer {
            prop_assert_eq!(found, Ok(Some((t, TokenSource::Header))));
        }
        let shown = extract::redacted_target(uri);
        prop_assert!(shown.starts_with(uri.path()));
        let allowed = ["https://desk.example".to_owned()];
        let origin = headers.get(ORIGIN).map(|v| v.as_bytes());
        prop_assert_eq!(
            authorize::check_origin(origin, &allowed).is_ok(),
            origin == Some(&b"https://desk.example"[..])
        );
        Ok(())
    }

    /// Header names the two entry points look at, plus arbitrary ones.
    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
                "Sec-WebSocket-Protocol", "Authorization", "Cookie", "Origin", "upgrade",
                "CONNECTION", "sec-websocket-protocol",
            ])
            .prop_map(str::to_owned),
            1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}",
        ]
    }

    /// Values that are near the accepted ones, and arbitrary bytes (obs-text included).
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        let near = prop::sample::select(vec![
            "websocket",
            "WebSocket",
            "Upgrade",
            "keep-alive, Upgrade",
            "13",
            "8",
            "",
            "dGhlIHNhbXBsZSBub25jZQ==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "binary",
            "binary, bearer.a.b.c",
            "bearer.",
            "bearer.x, chat",
            " , ,binary",
            "Bearer a.b.c",
            "bearer   spaced ",
            "Bearer",
            "Basic dXNlcg==",
            "vncgate_token=c.d.e",
            "a=1; vncgate_token=; vncgate_token=z",
            "https://desk.example",
        ])
        .prop_map(|s| s.as_bytes().to_vec());
        prop_oneof![
            3 => near,
            2 => "[ -~]{0,60}".prop_map(String::into_bytes),
            // Any byte but CR and LF, which would end the header line (obs-text included).
            1 => prop::collection::vec(any::<u8>().prop_filter("line end", |b| *b != b'\r' && *b != b'\n'), 0..60),
        ]
    }

    fn request_target() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/websockify".to_owned()),
            "/websockify\\?token=[A-Za-z0-9._%+-]{0,40}",
            "/websockify\\?[a-z]{0,5}=[A-Za-z0-9._%&=+-]{0,40}&token=[A-Za-z0-9._%-]{0,20}",
            "[!-~]{1,80}",
            "\\*|http://[a-z.]{1,10}/w\\?token=[a-z]{1,9}",
        ]
    }

    /// A header that is usually there with its accepted value, sometimes absent or replaced.
    fn usually(
        name: &'static str,
        good: &'static str,
    ) -> impl Strategy<Value = Option<(String, Vec<u8>)>> {
        let value = prop_oneof![
            4 => Just(good.as_bytes().to_vec()),
            1 => header_value(),
        ];
        prop::option::weighted(0.9, value.prop_map(move |v| (name.to_owned(), v)))
    }

    /// A header that is sometimes there, with a value near the accepted ones or arbitrary.
    fn sometimes(name: &'static str) -> impl Strategy<Value = Option<(String, Vec<u8>)>> {
        prop::option::weighted(0.4, header_value().prop_map(move |v| (name.to_owned(), v)))
    }

    /// Request heads from valid upgrades to nonsense: each required header usually present and
    /// right, the token sources sometimes present, arbitrary headers around them, any order.
    fn head() -> impl Strategy<Value = Vec<u8>> {
        let method = prop_oneof![
            4 => Just("GET".to_owned()),
            1 => "[A-Za-z]{1,8}",
        ];
        let version = prop_oneof![
            6 => Just("HTTP/1.1"),
            1 => prop::sample::select(vec!["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.2"]),
        ];
        let known = (
            usually("Host", "gw.example"),
            usually("Upgrade", "websocket"),
            usually("Connection", "Upgrade"),
            usually("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            usually("Sec-WebSocket-Version", "13"),
            sometimes("Sec-WebSocket-Protocol"),
            sometimes("Authorization"),
            sometimes("Cookie"),
            sometimes("Origin"),
        );
        let headers = (
            known,
            prop::collection::vec((header_name(), header_value()), 0..6),
        )
            .prop_map(|((a, b, c, d, e, f, g, h, i), extra)| {
                let mut all: Vec<(String, Vec<u8>)> =
                    [a, b, c, d, e, f, g, h, i].into_iter().flatten().collect();
                all.extend(extra);
                all
            })
            .prop_shuffle();
        (method, request_target(), version, headers).prop_map(|(m, t, v, hs)| {
            let mut out = format!("{m} {t} {v}\r\n").into_bytes();
            for (name, value) in hs {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(&value);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Structured heads, from nearly valid upgrades to nonsense, through Pingora's parser.
        #[test]
        fn arbitrary_request_heads_never_panic_and_obey_the_contract(head in head()) {
            if let Some((method, uri, version, headers)) = parse(&head) {
                check(&method, &uri, version, &headers)?;
            }
        }

        /// Raw bytes: what a scanner sends.
        #[test]
        fn arbitrary_bytes_as_a_request_head_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut head = b"GET /websockify?token=x HTTP/1.1\r\n".to_vec();
            head.extend_from_slice(&bytes);
            head.extend_from_slice(b"\r\n\r\n");
            for candidate in [&bytes[..], &head[..]] {
                if let Some((method, uri, version, headers)) = parse(candidate) {
                    check(&method, &uri, version, &headers)?;
                }
            }
        }

        /// Header sets Pingora would not produce (any value bytes the `http` crate allows,
        /// repeated names), with arbitrary methods, targets and versions.
        #[test]
        fn arbitrary_header_sets_never_panic_and_obey_the_contract(
            method in "[A-Z]{1,7}",
            target in request_target(),
            version in prop::sample::select(vec![
                Version::HTTP_09, Version::HTTP_10, Version::HTTP_11, Version::HTTP_2,
                Version::HTTP_3,
            ]),
            pairs in prop::collection::vec((header_name(), header_value()), 0..16),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                if let (Ok(n), Ok(v)) =
                    (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value))
                {
                    headers.append(n, v);
                }
            }
            let method = Method::from_bytes(method.as_bytes()).expect("token");
            if let Ok(uri) = target.parse::<Uri>() {
                check(&method, &uri, version, &headers)?;
            }
        }

        /// A valid upgrade stays valid whatever the case of its tokens and whatever unrelated
        /// headers ride along, and its query token is found.
        #[test]
        fn valid_upgrades_with_noise_are_accepted(
            upgrade in prop::sample::select(vec!["websocket", "WebSocket", "WEBSOCKET"]),
            connection in prop::sample::select(vec![
                "Upgrade", "upgrade", "keep-alive, Upgrade", "Upgrade,keep-alive",
            ]),
            token in "[A-Za-z0-9_-]{8,40}\\.[A-Za-z0-9_-]{8,40}\\.[A-Za-z0-9_-]{8,40}",
            key in prop::array::uniform16(any::<u8>()),
            noise in prop::collection::vec(
                ("X-[A-Za-z0-9-]{1,16}", "[ -~]{0,40}"), 0..8,
            ),
            protocols in prop::sample::select(vec![None, Some("binary"), Some("binary, chat")]),
        ) {
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            let mut head = format!(
                "GET /websockify?token={token} HTTP/1.1\r\nHost: gw\r\nUpgrade: {upgrade}\r\n\
                 Connection: {connection}\r\nSec-WebSocket-Key: {key}\r\n\
                 Sec-WebSocket-Version: 13\r\n"
            );
            if let Some(p) = protocols {
                head.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
            }
            for (name, value) in &noise {
                head.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            head.push_str("\r\n");
            let (method, uri, version, headers) = parse(head.as_bytes()).expect("a valid head");
            let hs = handshake::validate(&method, version, &headers);
            prop_assert!(hs.is_ok(), "{:?} for {}", hs, head);
            let hs = hs.expect("checked");
            prop_assert_eq!(&hs.accept, &derive_accept_key(key.as_bytes()));
            prop_assert_eq!(hs.protocols.offered, protocols.is_some());
            let found = extract::token(&headers, &uri, &hs.protocols);
            prop_assert_eq!(found, Ok(Some((token.clone(), TokenSource::Query))));
            prop_assert!(!extract::redacted_target(&uri).contains(&token));
            check(&method, &uri, version, &headers)?;
        }
    }
}

/// How long the session on a silent path may take to end before the test calls it a hang: the
/// gateway's dead-peer timer gives up after 30 s (`TCP_USER_TIMEOUT`, keep-alive 15 s + 3 x 5 s).
/// A guard, not a timing assertion.
const SILENT_PATH_DEADLINE: Duration = Duration::from_secs(120);

/// The path to one desktop goes half-open for real: the gateway's backend connection crosses a
/// veth into a network namespace (`common::netns`), and the path starts dropping every packet
/// both ways, with no FIN, no RST and no ICMP, while every socket stays open. Unlike the fault
/// proxy's `Blackhole`, the gateway's own TCP stack is left with a request nobody acknowledges:
/// its dead-peer detection on backend sockets (`TCP_USER_TIMEOUT`, keep-alive) fails the
/// backend read and the session ends by itself with 1013 "backend connection lost; try again",
/// never a hang, while the session on the other desktop keeps relaying. Needs root (a network
/// namespace and a veth pair).
#[tokio::test]
async fn a_backend_path_gone_silent_closes_1013_by_itself_and_spares_other_sessions() {
    use common::netns::{Forwarder, NetNs};

    let ns = NetNs::create();
    let (faulty, healthy) = tokio::join!(desktop("faulty"), desktop("healthy"));
    faulty.set_root_color(&hex(FAULTY_RGB)).expect("xsetroot");
    healthy.set_root_color(&hex(HEALTHY_RGB)).expect("xsetroot");
    let forwarder = Forwarder::start(&ns, faulty.rfb_addr()).await;
    let gw = Gateway::start(config(vec![
        BackendSpec::rfb("faulty", forwarder.addr()),
        BackendSpec::rfb("healthy", healthy.rfb_addr()),
    ]))
    .await;
    let mut on_faulty = open_on(&gw, "alice", "a", "faulty", FAULTY_RGB).await;
    let mut on_healthy = open_on(&gw, "bob", "b", "healthy", HEALTHY_RGB).await;
    // Both ways through the namespace before the cut.
    relay_payload(&mut on_faulty, &faulty, FAULTY_RGB, (12, 34)).await;

    ns.cut();
    let cut = Instant::now();
    // A request for the whole screen: data the backend never acknowledges.
    request_whole_screen(&mut on_faulty).await;

    // Nothing but awaiting the close frame; the healthy session is read meanwhile (its pings
    // answered) and must get nothing.
    let closed = tokio::select! {
        closed = tokio::time::timeout(SILENT_PATH_DEADLINE, rfb_client::read_close(&mut on_faulty.ws)) => {
            closed.unwrap_or_else(|_| {
                panic!("the session on the silent path was still open after {SILENT_PATH_DEADLINE:?}")
            })
        }
        m = next_message(&mut on_healthy.ws) => panic!("the healthy session got {m:?}"),
    }
    .expect("a close frame");
    let took = cut.elapsed();
    let ended = gw
        .wait_log(|v| v["event"] == "session_ended" && v["backend"] == "faulty")
        .await;
    let marked_down = gw.logs().into_iter().find(|v| {
        v["event"] == "backend_health_changed" && v["backend"] == "faulty" && v["up"] == false
    });
    eprintln!(
        "reliability: real half-open backend: {} {:?} after {:.1} s\n\
         reliability: {ended}\nreliability: marked down meanwhile: {marked_down:?}",
        u16::from(closed.code),
        closed.reason.as_str(),
        took.as_secs_f64(),
    );
    assert_eq!(u16::from(closed.code), 1013, "{closed:?}");
    assert_eq!(closed.reason.as_str(), "backend connection lost; try again");
    assert_eq!(ended["close_code"], 1013, "{ended}");
    assert_eq!(ended["closed_by"], "gateway", "{ended}");

    // The other session is undisturbed and still relays both ways.
    relay_payload(&mut on_healthy, &healthy, HEALTHY_RGB, (61, 41)).await;
    assert_eq!(gw.metric(ACTIVE).await, 1.0);
    assert!(
        gw.logs()
            .iter()
            .all(|v| !(v["event"] == "session_ended" && v["backend"] == "healthy")),
        "the healthy session ended"
    );
}
