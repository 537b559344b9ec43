//! The RFB edge (contract §11) as a user meets it: real noVNC (the viewer page vncgate serves) in
//! real headless Chromium, through the gateway in `rfb.mode: terminate`, to real VNC servers
//! with the security they run in a farm: TigerVNC with its defaults (blacklist on), VNC
//! Authentication, VeNCrypt X509Vnc, and x11vnc on Xvfb. The gateway holds the VNC password
//! (from its environment); the page never sees it. On top: view-only tokens, the clipboard
//! policy, and a shared session whose input is switched live by an administrator.
//!
//! The harness (browser driver, pages, gateway, desktops) is `tests/common/browser.rs`. Every
//! wait is for an event: a viewer state, a noVNC event or canvas pixels polled per animation
//! frame in the page, a gateway log line or counter, a file the xterm writes, the X pointer, the
//! X clipboard, a line in Xvnc's log. What must never arrive is checked only after something
//! sent later on the same connection did arrive (or the gateway counted it as dropped), never
//! after a sleep. Every page's console is checked clean at the end. Figures (page load to
//! desktop, key to echo, clipboard) are printed, never asserted. Tokens and passwords are never
//! printed: a failed check says where a password was found, not what was around it.

mod common;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use common::EVENT_TIMEOUT;
use common::browser::{
    Context, Desk, GEOMETRY, Gw, GwBackend, GwSpec, PAGE_WAIT_MS, POLL_EVERY, Page, ROOT_POINTS,
    jwt, poll_within, rgb, wait_desktop,
};
use common::desktop::{TypingProbe, clipboard_get, clipboard_set, pointer_location};
use common::rfb_client;
use common::x11vnc::X11vnc;
use common::xvnc::{Security, Xvnc};
use serde_json::{Value, json};

/// The environment variable of the pool's VNC password (`pools.default.rfb.password_env`).
const PASSWORD_ENV: &str = "VNCGATE_VNC_PASSWORD";
/// The environment variable of the deliberately wrong per-backend password.
const WRONG_PASSWORD_ENV: &str = "VNCGATE_DESK_WRONG_PASSWORD";

/// A fresh VNC password: 8 random letters and digits (VNC Authentication uses 8 bytes), so a
/// match anywhere can only be a leak, never a coincidence.
fn new_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    );
    let mut n = h.finish();
    (0..8)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// Xvnc with `security`, its root window painted `hex`.
async fn xvnc(name: &str, security: Security, hex: &str) -> Xvnc {
    let x = Xvnc::builder()
        .name(name)
        .geometry(GEOMETRY)
        .security(security)
        .start_async()
        .await
        .expect("Xvnc");
    x.set_root_color(hex).expect("xsetroot");
    x
}

/// Loads the viewer with `token` and waits until it is connected and the canvas shows `hex` at
/// the root points; returns the time from starting the page load to that picture.
async fn open_desktop(page: &Page, gw: &Gw, token: &str, extra: &str, hex: &str) -> Duration {
    let started = Instant::now();
    page.goto(&gw.page_url(&format!("token={token}&delivery=protocol{extra}")))
        .await;
    page.connected().await;
    page.wait_color(rgb(hex), Some(&ROOT_POINTS)).await;
    started.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How many connections Xvnc has accepted so far (its log says `Connections: accepted: ADDR`).
fn accepted(x: &Xvnc) -> usize {
    x.log_tail(usize::MAX)
        .matches("Connections: accepted:")
        .count()
}

/// Waits until the X CLIPBOARD selection of `display` reads `want` (xclip; a selection change
/// raises no event this process could wait for).
async fn wait_x_clipboard(display: &str, want: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let got = clipboard_get(display).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the X clipboard reads {got:?}, not {want:?}, after {EVENT_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The page's noVNC events of one type.
fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// The password appears nowhere the browser or an operator's log collector can see it: the
/// page's DOM, URL and title, any console message (as the driver keeps them: the first 1000
/// characters of each), any line the gateway wrote.
async fn assert_password_hidden(page: &Page, gw: &Gw, password: &str) {
    let c = page.content().await;
    for key in ["html", "url", "title"] {
        assert!(
            !c[key].as_str().expect("content").contains(password),
            "page {}: the VNC password is in the page's {key}",
            page.name
        );
    }
    let console = page.console_log().await;
    let leaks = console
        .iter()
        .filter(|e| e["text"].as_str().unwrap_or("").contains(password))
        .count();
    assert_eq!(
        leaks,
        0,
        "page {}: the VNC password is in {leaks} of {} console messages",
        page.name,
        console.len()
    );
    assert_password_not_logged(gw, password);
}

fn assert_password_not_logged(gw: &Gw, password: &str) {
    let lines = gw.raw_logs();
    let leaks = lines.iter().filter(|l| l.contains(password)).count();
    assert_eq!(
        leaks,
        0,
        "{}: the VNC password is in {leaks} of {} log lines",
        gw.label,
        lines.len()
    );
}

/// A pool whose VNC password comes from `PASSWORD_ENV`, and a second backend on the same server
/// with a wrong password of its own (`password_env` override): the refusal case. Returns the
/// spec and the wrong password.
fn spec_with_passwords<'a>(addr: std::net::SocketAddr, password: &str) -> (GwSpec<'a>, String) {
    let mut wrong = new_password();
    while wrong == password {
        wrong = new_password();
    }
    let mut spec = GwSpec::new(vec![("desk", addr)])
        .env(PASSWORD_ENV, password)
        .env(WRONG_PASSWORD_ENV, &wrong);
    spec.backends.push(GwBackend {
        name: "desk-wrong".into(),
        addr,
        password_env: Some(WRONG_PASSWORD_ENV.into()),
    });
    spec.rfb.password_env = Some(PASSWORD_ENV.into());
    (spec, wrong)
}

/// The page connects with no prompt and shows the desktop; neither password is anywhere in the
/// page or the logs; the backend with the wrong password is refused 502 `backend_auth_failed`,
/// counted and logged by name.
async fn password_in_the_gateway_only(gw: &Gw, xvnc: &Xvnc, wrong: &str, label: &str, hex: &str) {
    let password = xvnc.password().expect("a password").to_owned();
    let ctx = Context::new().await;
    let page = ctx.page(label).await;
    let token = jwt("alice", label, json!({ "backend": "desk" }));
    // noVNC at debug level: everything it knows about the handshake goes to the console.
    let load = open_desktop(&page, gw, &token, "&logging=debug", hex).await;
    let state = page.snapshot().await;
    assert_eq!(state["desktopName"], xvnc.desktop_name, "{state}");
    let events = page.events().await;
    assert!(
        of_type(&events, "credentialsrequired").is_empty()
            && of_type(&events, "securityfailure").is_empty(),
        "{events:?}"
    );
    assert_eq!(of_type(&events, "connect").len(), 1, "{events:?}");
    let started = gw
        .wait_log(|v| v["event"] == "session_started" && v["session_id"] == label)
        .await;
    assert_eq!(started["backend"], "desk");

    // The same server behind a wrong password.
    let wrong_token = jwt(
        "alice",
        &format!("{label}-wrong"),
        json!({ "backend": "desk-wrong" }),
    );
    let err = rfb_client::connect(&gw.ws_client(&wrong_token))
        .await
        .map(|_| ())
        .expect_err("a wrong VNC password must not get a 101");
    assert_eq!(
        rfb_client::error_code(&err),
        Some((502, "backend_auth_failed".to_owned()))
    );
    let failures = gw
        .metric(
            "vncgate_backend_auth_failures_total",
            &[("pool", "default"), ("backend", "desk-wrong")],
        )
        .await;
    assert!(failures >= 1.0, "{failures}");
    let logged = gw
        .wait_log(|v| v["event"] == "backend_auth_failed" && v["backend"] == "desk-wrong")
        .await;
    assert_eq!(logged["level"], "warn", "{logged}");
    assert_eq!(
        gw.metric(
            "vncgate_backend_auth_failures_total",
            &[("pool", "default"), ("backend", "desk")],
        )
        .await,
        0.0
    );
    gw.wait_log(|v| v["event"] == "upgrade_rejected" && v["code"] == "backend_auth_failed")
        .await;

    assert_password_hidden(&page, gw, &password).await;
    assert_password_not_logged(gw, wrong);
    // The page is still on its desktop.
    assert_eq!(page.snapshot().await["state"], "connected");
    eprintln!(
        "{label}: page load -> desktop {:.0} ms (no password prompt); \
         wrong password -> 502 backend_auth_failed",
        ms(load)
    );
    page.screenshot(label).await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

// ------------------------------------------------------------------------------------------
// Scenarios.

/// a. TigerVNC as installed (no -SecurityTypes, blacklist on: `TLSVnc,VncAuth`) behind the
/// gateway with its password and RFB health checks every second: 50 upgrades that close right
/// after their 101 and a minute of health checks later, Xvnc has not blacklisted the gateway
/// and noVNC shows the desktop.
#[tokio::test]
async fn tigervnc_defaults_with_blacklist_never_lock_the_gateway_out() {
    let password = new_password();
    let x = xvnc(
        "default-desk",
        Security::Default {
            password: password.clone(),
        },
        "#3a6e4c",
    )
    .await;
    let mut spec = GwSpec::new(vec![("desk", x.rfb_addr())]).env(PASSWORD_ENV, &password);
    spec.rfb.password_env = Some(PASSWORD_ENV.into());
    spec.health_check_interval_seconds = 1;
    let gw = Gw::start("gw", spec).await;

    // 50 upgrades, each closed (TCP dropped, no Close frame) as soon as its 101 arrived.
    let burst = Instant::now();
    for i in 0..50 {
        let token = jwt(&format!("burst-{i}"), &format!("burst-{i}"), json!({}));
        let (ws, response) = rfb_client::connect(&gw.ws_client(&token))
            .await
            .unwrap_or_else(|e| panic!("upgrade {i}: {:?}", rfb_client::error_code(&e)));
        assert_eq!(response.status(), 101);
        drop(ws);
    }
    let burst = burst.elapsed();
    gw.wait_logs(50, |v| {
        v["event"] == "session_ended"
            && v["session_id"]
                .as_str()
                .is_some_and(|s| s.starts_with("burst-"))
    })
    .await;
    assert!(!x.blacklisted(), "blacklisted after the burst");

    // A minute of health checks: 60 more connections accepted by Xvnc.
    let base = accepted(&x);
    assert!(
        base >= 50,
        "Xvnc accepted {base} connections for 50 upgrades"
    );
    let checks = Instant::now();
    poll_within(
        "60 more connections in Xvnc's log",
        Duration::from_secs(180),
        || (accepted(&x) >= base + 60).then_some(()),
    )
    .await;
    let checks = checks.elapsed();
    assert!(!x.blacklisted(), "blacklisted after the health checks");
    assert_eq!(
        gw.metric(
            "vncgate_backend_up",
            &[("pool", "default"), ("backend", "desk")]
        )
        .await,
        1.0
    );
    assert!(
        !gw.logs()
            .iter()
            .any(|v| v["event"] == "backend_health_changed" && v["up"] == false),
        "a health check failed"
    );

    let ctx = Context::new().await;
    let page = ctx.page("default-security").await;
    let token = jwt("alice", "default-security", json!({}));
    let load = open_desktop(&page, &gw, &token, "", "#3a6e4c").await;
    assert_eq!(page.snapshot().await["desktopName"], "default-desk");
    assert!(!x.blacklisted(), "blacklisted");
    assert!(
        !x.log_contains("uthentication fail"),
        "Xvnc logged an authentication failure"
    );
    eprintln!(
        "tigervnc defaults: 50 upgrades in {:.0} ms, then {} connections in Xvnc's log \
         ({:.1} s of 1 s health checks), \
         not blacklisted; page load -> desktop {:.0} ms",
        ms(burst),
        accepted(&x),
        checks.as_secs_f64(),
        ms(load)
    );
    assert_password_hidden(&page, &gw, &password).await;
    page.screenshot("default_security").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// b1. VNC Authentication: the gateway answers the challenge with the password from its
/// environment; the page never prompts and never sees it; a wrong password is a 502.
#[tokio::test]
async fn vnc_auth_backend_needs_no_prompt_and_the_password_stays_in_the_gateway() {
    let password = new_password();
    let x = xvnc(
        "vncauth-desk",
        Security::VncAuth {
            password: password.clone(),
        },
        "#7a3e5c",
    )
    .await;
    let (spec, wrong) = spec_with_passwords(x.rfb_addr(), &password);
    let gw = Gw::start("gw", spec).await;
    password_in_the_gateway_only(&gw, &x, &wrong, "vncauth", "#7a3e5c").await;
    assert!(!x.blacklisted());
}

/// b2. VeNCrypt X509Vnc: TLS to Xvnc verified against the fixture's CA (`rfb.tls`), then VNC
/// Authentication inside; same guarantees as b1.
#[tokio::test]
async fn x509vnc_backend_needs_no_prompt_and_the_password_stays_in_the_gateway() {
    let password = new_password();
    let x = xvnc(
        "x509-desk",
        Security::X509Vnc {
            password: password.clone(),
        },
        "#2e5c8a",
    )
    .await;
    let (mut spec, wrong) = spec_with_passwords(x.rfb_addr(), &password);
    spec.rfb.ca_file = Some(x.ca_file().expect("CA").to_owned());
    spec.rfb.server_name = Some("localhost".into());
    let gw = Gw::start("gw", spec).await;
    password_in_the_gateway_only(&gw, &x, &wrong, "x509vnc", "#2e5c8a").await;
    assert!(!x.blacklisted());
}

/// c. x11vnc (LibVNCServer) on Xvfb behind terminate mode: the desktop and a change on it.
#[tokio::test]
async fn x11vnc_desktop_reaches_the_canvas_in_terminate_mode() {
    let x = X11vnc::start_async(GEOMETRY).await.expect("x11vnc");
    x.set_root_color("#8a6a2e").expect("xsetroot");
    let gw = Gw::start("gw", GwSpec::new(vec![("x11vnc", x.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("x11vnc").await;
    let token = jwt("alice", "x11vnc", json!({}));
    let load = open_desktop(&page, &gw, &token, "", "#8a6a2e").await;
    assert_eq!(page.snapshot().await["desktopName"], x.desktop_name);
    let t = Instant::now();
    x.set_root_color("#2e8a6a").expect("xsetroot");
    page.wait_color(rgb("#2e8a6a"), Some(&ROOT_POINTS)).await;
    let change = t.elapsed();
    let started = gw.wait_log(|v| v["event"] == "session_started").await;
    assert_eq!(started["backend"], "x11vnc");
    eprintln!(
        "x11vnc: page load -> desktop {:.0} ms; xsetroot -> canvas {:.0} ms",
        ms(load),
        ms(change)
    );
    page.screenshot("x11vnc").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// d. A VncAuth backend and no password configured: the gateway relays VNC Authentication, noVNC
/// asks (credentialsrequired), the user types the password into the viewer's form, the desktop
/// shows.
#[tokio::test]
async fn vnc_auth_without_configured_credentials_prompts_in_the_page() {
    let password = new_password();
    let x = xvnc(
        "prompt-desk",
        Security::VncAuth {
            password: password.clone(),
        },
        "#5c2e7a",
    )
    .await;
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", x.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("prompt").await;
    let token = jwt("alice", "prompt", json!({}));
    let t = Instant::now();
    page.goto(&gw.page_url(&format!("token={token}&delivery=protocol")))
        .await;
    let asked = page.wait_event("credentialsrequired", None, 0).await;
    let prompt = t.elapsed();
    assert!(
        asked["types"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "password")),
        "{asked}"
    );
    let waiting = page.snapshot().await;
    assert_eq!(waiting["state"], "connecting", "{waiting}");
    assert!(
        waiting["statusText"]
            .as_str()
            .unwrap_or("")
            .contains("asks for credentials"),
        "{waiting}"
    );
    let t = Instant::now();
    page.submit_password(&password).await;
    page.connected().await;
    page.wait_color(rgb("#5c2e7a"), Some(&ROOT_POINTS)).await;
    let after = t.elapsed();
    let state = page.snapshot().await;
    assert_eq!(state["desktopName"], "prompt-desk", "{state}");
    assert_eq!(state["attempts"], 1, "{state}");
    let events = page.events().await;
    assert_eq!(
        of_type(&events, "credentialsrequired").len(),
        1,
        "{events:?}"
    );
    assert!(of_type(&events, "securityfailure").is_empty(), "{events:?}");
    let at = |kind: &str| of_type(&events, kind)[0]["at"].as_f64().expect("at");
    let prompt_to_connect = at("connect") - at("credentialsrequired");
    gw.wait_log(|v| v["event"] == "session_started" && v["session_id"] == "prompt")
        .await;
    // The form was cleared when it was sent; the gateway only relayed the response.
    assert_password_hidden(&page, &gw, &password).await;
    assert!(!x.blacklisted());
    eprintln!(
        "vnc auth relayed: page load -> prompt {:.0} ms; form filled and sent -> desktop {:.0} ms \
         (prompt -> connected, in the page: {prompt_to_connect:.0} ms)",
        ms(prompt),
        ms(after)
    );
    page.screenshot("password_prompt").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// e. A `view_only` token: the page sends keys and clicks (it is not in view-only mode itself),
/// the gateway drops them; the desktop still updates live. The same typing with a normal token
/// on the same session arrives, so the check can fail.
#[tokio::test]
async fn view_only_token_input_never_reaches_the_desktop_which_still_updates() {
    let desk = Desk::start("view-only-desk", "#305070").await;
    let display = desk.display();
    let probe = TypingProbe::start(&display).await;
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let viewer_ctx = Context::new().await;
    let viewer = viewer_ctx.page("view-only").await;
    let token = jwt("alice", "view-only", json!({ "view_only": true }));
    let load = open_desktop(&viewer, &gw, &token, "", "#305070").await;
    assert_eq!(viewer.snapshot().await["desktopName"], "view-only-desk");

    let key = [("kind", "key")];
    let pointer = [("kind", "pointer")];
    let (keys0, pointers0) = (
        gw.metric("vncgate_input_dropped_total", &key).await,
        gw.metric("vncgate_input_dropped_total", &pointer).await,
    );
    let at = pointer_location(&display);
    let (fx, fy) = viewer.mouse_move(650, 450).await;
    assert_ne!(
        (fx as i32, fy as i32),
        at,
        "pick a point away from the pointer"
    );
    viewer.click(650, 450, "left", 1).await;
    viewer.type_text("nope").await;
    viewer.press("Enter").await;
    // 5 keys, each a down and an up; a move, a press and a release at least.
    gw.wait_metric("vncgate_input_dropped_total", &key, keys0 + 10.0)
        .await;
    gw.wait_metric("vncgate_input_dropped_total", &pointer, pointers0 + 3.0)
        .await;
    assert_eq!(probe.contents(), "", "view-only keys reached the desktop");
    assert_eq!(pointer_location(&display), at, "the X pointer moved");

    // The desktop still updates live.
    let t = Instant::now();
    desk.xvnc.set_root_color("#70a040").expect("xsetroot");
    viewer.wait_color(rgb("#70a040"), Some(&ROOT_POINTS)).await;
    let live = t.elapsed();

    // The same session with a normal token: its typing and pointer do arrive.
    let typer_ctx = Context::new().await;
    let typer = typer_ctx.page("interactive").await;
    let token = jwt("alice", "view-only", json!({}));
    open_desktop(&typer, &gw, &token, "", "#70a040").await;
    let t = Instant::now();
    typer.type_text("ok").await;
    typer.press("Enter").await;
    probe.wait_for("ok\n").await;
    let typed = t.elapsed();
    assert_eq!(
        probe.contents(),
        "ok\n",
        "only the interactive keys arrived"
    );
    let (fx, fy) = typer.mouse_move(700, 500).await;
    common::desktop::wait_pointer_at(&display, (fx as i32, fy as i32)).await;

    for p in [&viewer, &typer] {
        let s = p.snapshot().await;
        assert_eq!(
            (s["state"].as_str(), s["attempts"].as_i64()),
            (Some("connected"), Some(1)),
            "{s}"
        );
    }
    eprintln!(
        "view-only: page load -> desktop {:.0} ms; xsetroot -> view-only canvas {:.0} ms; \
         interactive \"ok\\n\" -> xterm {:.0} ms; dropped keys {} pointer {}",
        ms(load),
        ms(live),
        ms(typed),
        gw.metric("vncgate_input_dropped_total", &key).await - keys0,
        gw.metric("vncgate_input_dropped_total", &pointer).await - pointers0,
    );
    viewer.screenshot("view_only").await;
    viewer.assert_clean_console(&[]).await;
    typer.assert_clean_console(&[]).await;
    viewer_ctx.close().await;
    typer_ctx.close().await;
}

/// f. The clipboard policy: one desktop, two gateways in front of it, `clipboard: none` and
/// `clipboard: both`, one page on each. X selection -> page and page -> X selection pass through
/// `both` and never through `none`.
#[tokio::test]
async fn clipboard_none_blocks_both_directions_and_both_passes_them() {
    let desk = Desk::start("clipboard-desk", "#6a4a8a").await;
    let display = desk.display();
    let addr = desk.xvnc.rfb_addr();
    let mut none = GwSpec::new(vec![("desk", addr)]);
    none.clipboard = Some("none");
    let mut both = GwSpec::new(vec![("desk", addr)]);
    both.clipboard = Some("both");
    let (gw_none, gw_both) = tokio::join!(Gw::start("gw-none", none), Gw::start("gw-both", both));
    let (none_ctx, both_ctx) = (Context::new().await, Context::new().await);
    let none_page = none_ctx.page("clipboard-none").await;
    let both_page = both_ctx.page("clipboard-both").await;
    open_desktop(
        &none_page,
        &gw_none,
        &jwt("alice", "clip", json!({})),
        "",
        "#6a4a8a",
    )
    .await;
    open_desktop(
        &both_page,
        &gw_both,
        &jwt("bob", "clip", json!({})),
        "",
        "#6a4a8a",
    )
    .await;
    let to_client = [("direction", "backend_to_client")];
    let to_server = [("direction", "client_to_backend")];
    let blocked = "vncgate_clipboard_blocked_total";
    // Read after the first picture: whatever the server sent before it (capabilities) is
    // counted by now.
    let (down0, up0) = (
        gw_none.metric(blocked, &to_client).await,
        gw_none.metric(blocked, &to_server).await,
    );

    // X -> page: an X application copies.
    let from_x = "copied on the X side 7c1e";
    let t = Instant::now();
    let _owner = clipboard_set(&display, from_x).await;
    both_page.wait_event("clipboard", Some(from_x), 0).await;
    let x_to_page = t.elapsed();
    gw_none.wait_metric(blocked, &to_client, down0 + 1.0).await;
    // A later server->client update on the `none` connection arrived: the cut text before it
    // was not delivered.
    desk.xvnc.set_root_color("#8a6a4a").expect("xsetroot");
    none_page
        .wait_color(rgb("#8a6a4a"), Some(&ROOT_POINTS))
        .await;
    let seen = none_page.events().await;
    assert!(of_type(&seen, "clipboard").is_empty(), "{seen:?}");

    // Page -> X: the `none` page pastes first; its next message (a pointer move) arrives, the
    // text does not.
    let from_none = "pasted in the none page 5a0f";
    none_page.clipboard_paste(from_none).await;
    gw_none.wait_metric(blocked, &to_server, up0 + 1.0).await;
    let (fx, fy) = none_page.mouse_move(650, 450).await;
    common::desktop::wait_pointer_at(&display, (fx as i32, fy as i32)).await;
    assert_eq!(
        clipboard_get(&display).await.as_deref(),
        Some(from_x),
        "the X clipboard changed"
    );
    // The `both` page pastes: the X side reads it.
    let from_both = "pasted in the both page 93d2";
    let t = Instant::now();
    both_page.clipboard_paste(from_both).await;
    wait_x_clipboard(&display, from_both).await;
    let page_to_x = t.elapsed();
    assert_eq!(gw_both.metric(blocked, &to_client).await, 0.0);
    assert_eq!(gw_both.metric(blocked, &to_server).await, 0.0);
    let seen = none_page.events().await;
    assert!(of_type(&seen, "clipboard").is_empty(), "{seen:?}");
    eprintln!(
        "clipboard: X copy -> page event (both) {:.0} ms; \
         page paste -> X selection (both) {:.0} ms; \
         none: blocked to client {} to server {}",
        ms(x_to_page),
        ms(page_to_x),
        gw_none.metric(blocked, &to_client).await - down0,
        gw_none.metric(blocked, &to_server).await - up0,
    );
    none_page.assert_clean_console(&[]).await;
    both_page.assert_clean_console(&[]).await;
    none_ctx.close().await;
    both_ctx.close().await;
}

/// One connection as `GET /admin/sessions` lists it.
#[derive(Debug, PartialEq)]
struct Conn {
    user: String,
    conn_id: Value,
    role: String,
    input_mode: String,
}

/// The connections of one session on `GET /admin/sessions`, sorted by user.
async fn connections(gw: &Gw, sid: &str) -> Vec<Conn> {
    let (status, body) = gw.admin("GET", "/admin/sessions", "").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let text = |s: &Value, k: &str| s[k].as_str().unwrap_or("").to_owned();
    let mut out: Vec<Conn> = v["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter(|s| s["session_id"] == sid)
        .map(|s| Conn {
            user: text(s, "user_id"),
            conn_id: s["conn_id"].clone(),
            role: text(s, "role"),
            input_mode: text(s, "input_mode"),
        })
        .collect();
    out.sort_by(|a, b| a.user.cmp(&b.user));
    out
}

/// (user, role, input mode) of each connection.
fn modes(conns: &[Conn]) -> Vec<(&str, &str, &str)> {
    conns
        .iter()
        .map(|c| (c.user.as_str(), c.role.as_str(), c.input_mode.as_str()))
        .collect()
}

/// g. An owner and a `share: view` viewer (another `sub`) on one desktop in two browser
/// contexts: the viewer sees the owner's typing live; an administrator hands control over
/// (`PUT /admin/sessions/{sid}/input`) without reconnecting anyone.
#[tokio::test]
async fn shared_session_viewer_sees_owner_typing_and_control_is_handed_over_live() {
    let desk = Desk::with_xterm("shared-desk", "#404a5a").await;
    let g = desk.grid();
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let sid = "shared";
    let (owner_ctx, viewer_ctx) = (Context::new().await, Context::new().await);
    let owner = owner_ctx.page("owner").await;
    let viewer = viewer_ctx.page("viewer").await;
    let owner_token = jwt("alice", sid, json!({}));
    owner
        .goto(&gw.page_url(&format!("token={owner_token}&delivery=protocol")))
        .await;
    owner.connected().await;
    wait_desktop(&owner, &desk, "#404a5a").await;
    let viewer_token = jwt("bob", sid, json!({ "share": "view" }));
    viewer
        .goto(&gw.page_url(&format!("token={viewer_token}&delivery=protocol")))
        .await;
    viewer.connected().await;
    wait_desktop(&viewer, &desk, "#404a5a").await;

    let before = connections(&gw, sid).await;
    assert_eq!(
        modes(&before),
        [
            ("alice", "owner", "interactive"),
            ("bob", "view", "view_only")
        ],
        "{before:?}"
    );

    // The owner types; the viewer's canvas shows the echo live.
    let t = Instant::now();
    owner.type_text("own").await;
    viewer
        .call(
            "waitInk",
            json!({
                "rects": [g.cell(0, 0), g.cell(0, 1), g.cell(0, 2)],
                "timeoutMs": PAGE_WAIT_MS,
            }),
        )
        .await;
    let echo = t.elapsed();
    owner.press("Enter").await;
    desk.wait_typed("own\n").await;
    // The viewer's keys are dropped while it is view-only.
    let key = [("kind", "key")];
    let keys0 = gw.metric("vncgate_input_dropped_total", &key).await;
    viewer.type_text("no").await;
    viewer.press("Enter").await;
    gw.wait_metric("vncgate_input_dropped_total", &key, keys0 + 6.0)
        .await;

    // Hand over: the viewer gets control, the owner watches.
    let t = Instant::now();
    for (user, mode) in [("bob", "interactive"), ("alice", "view_only")] {
        let (status, body) = gw
            .admin(
                "PUT",
                &format!("/admin/sessions/{sid}/input"),
                &json!({ "mode": mode, "user": user }).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["connections"], 1, "{v}");
    }
    for (user, mode) in [("bob", "interactive"), ("alice", "view_only")] {
        gw.wait_log(|v| {
            v["event"] == "input_mode_changed" && v["user_id"] == user && v["mode"] == mode
        })
        .await;
    }
    let after = connections(&gw, sid).await;
    assert_eq!(
        modes(&after),
        [
            ("alice", "owner", "view_only"),
            ("bob", "view", "interactive")
        ],
        "{after:?}"
    );
    let ids = |c: &[Conn]| c.iter().map(|c| c.conn_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&after),
        ids(&before),
        "the same connections, not new ones"
    );

    // The viewer's keys arrive now...
    viewer.type_text("vw").await;
    viewer.press("Enter").await;
    desk.wait_typed("own\nvw\n").await;
    let handover = t.elapsed();
    // ...the owner's do not: dropped at the gateway, and the viewer's next line comes right
    // after the previous one in the xterm.
    let keys1 = gw.metric("vncgate_input_dropped_total", &key).await;
    owner.type_text("xx").await;
    owner.press("Enter").await;
    gw.wait_metric("vncgate_input_dropped_total", &key, keys1 + 6.0)
        .await;
    viewer.type_text("ok").await;
    viewer.press("Enter").await;
    desk.wait_typed("own\nvw\nok\n").await;

    for p in [&owner, &viewer] {
        let s = p.snapshot().await;
        assert_eq!(
            (s["state"].as_str(), s["attempts"].as_i64()),
            (Some("connected"), Some(1)),
            "{s}"
        );
    }
    assert_eq!(
        gw.logs()
            .iter()
            .filter(|v| v["event"] == "session_started" && v["session_id"] == sid)
            .count(),
        2,
        "nobody reconnected"
    );
    eprintln!(
        "shared session: owner key -> viewer canvas {:.0} ms (3 keys); \
         admin switch -> viewer's line in the xterm {:.0} ms",
        ms(echo),
        ms(handover)
    );
    owner.screenshot("shared_owner").await;
    viewer.screenshot("shared_viewer").await;
    owner.assert_clean_console(&[]).await;
    viewer.assert_clean_console(&[]).await;
    owner_ctx.close().await;
    viewer_ctx.close().await;
}
