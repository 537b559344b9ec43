//! `@vncgate/client` in a real React app (contract §14, issue 16): the example page
//! (`clients/js/examples/react`, React 19 bundled with esbuild as an app would be) in real
//! headless Chromium, through a real vncgate with a real redis-server, to real Xvnc desktops.
//! The app's token endpoint is played by the browser driver (`routeTokens`): it mints a token
//! for the `sid` the page asks with, and records every request.
//!
//! One page lives through what a user's tab lives through, in order: its first token expires
//! (4001) and is refreshed without the page showing anything but a reconnect; a second viewer
//! joins and the admin switches the input mode (the session events stream shows both); the tab
//! is reloaded and lands on the same desktop (the sid kept in sessionStorage, the pin in Redis,
//! where placement alone would choose the other desktop); the gateway restarts and the page
//! reconnects with backoff; an administrator closes the session (4003) and the page stops and
//! says why. The console stays clean but for Chromium's own line per refused reconnect.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::browser::{
    Allowed, Context, Desk, EXCLUSIVE, Gw, GwSpec, PAGE_WAIT_MS, Page, jwt, rgb,
};
use common::redis_server::RedisServer;
use common::{SECRET, rfb_client};
use serde_json::{Value, json};

const DESK_A: &str = "#aa3355";
const DESK_B: &str = "#33aa55";
const TOKEN_PATH: &str = "/api/vnc-token";
/// The first token's lifetime: it expires during the scenario; every later one lasts an hour.
const FIRST_TOKEN_SECONDS: u64 = 6;

/// Bundle the example app (`npm run build:example` in clients/js): its directory, to serve.
fn build_example() -> PathBuf {
    let pkg = common::browser::root().join("clients/js");
    let out = Command::new("npm")
        .args(["run", "--silent", "build:example"])
        .current_dir(&pkg)
        .output()
        .expect("npm");
    assert!(
        out.status.success(),
        "build:example: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pkg.join("examples/react")
}

/// A non-browser client holding a session on `backend`, so placement prefers the other desk.
async fn occupy(gw: &Gw, backend: &str) -> rfb_client::WsClient {
    let sub = format!("occupant-{backend}");
    let token = jwt(&sub, &sub, json!({ "backend": backend }));
    let (mut ws, _) = rfb_client::connect(&gw.ws_client(&token))
        .await
        .expect("occupant upgrade");
    rfb_client::rfb_handshake(&mut ws)
        .await
        .expect("occupant handshake");
    ws
}

async fn wait_for(page: &Page, expr: &str) -> Value {
    page.call(
        "waitFor",
        json!({ "expr": expr, "timeoutMs": PAGE_WAIT_MS }),
    )
    .await
}

async fn example(page: &Page) -> Value {
    page.call("evaluate", json!({ "expr": "window.vncgateExample" }))
        .await
}

async fn token_calls(page: &Page) -> Vec<Value> {
    page.call("tokenCalls", json!({}))
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn reasons(calls: &[Value]) -> Vec<&str> {
    calls.iter().filter_map(|c| c["reason"].as_str()).collect()
}

#[tokio::test]
async fn a_react_app_refreshes_reloads_reconnects_and_stops_as_the_contract_says() {
    let _shared = EXCLUSIVE.read().await;
    let app = build_example();
    let redis = RedisServer::start().await.expect("redis");
    let (a, b) = (
        Desk::start("desk-a", DESK_A).await,
        Desk::start("desk-b", DESK_B).await,
    );
    let mut spec = GwSpec::new(vec![
        ("desk-a", a.xvnc.rfb_addr()),
        ("desk-b", b.xvnc.rfb_addr()),
    ]);
    spec.redis = Some(&redis);
    spec.leeway_seconds = 0;
    spec.web_root = Some(app);
    let mut gw = Gw::start("gw", spec).await;
    let occupant_a = occupy(&gw, "desk-a").await;

    let ctx = Context::new().await;
    let page = ctx.page("react").await;
    page.call(
        "routeTokens",
        json!({
            "path": TOKEN_PATH, "sub": "alice", "secret": SECRET, "claims": {},
            "ttls": [FIRST_TOKEN_SECONDS, 3600],
        }),
    )
    .await;
    page.goto(&format!("{}/#token_url={TOKEN_PATH}&events=1", gw.origin()))
        .await;
    page.wait_color(rgb(DESK_B), None).await;
    let calls = token_calls(&page).await;
    let sid = calls[0]["sid"]
        .as_str()
        .expect("the page asked with a sid")
        .to_owned();
    assert_eq!(calls[0]["reason"], "initial", "{calls:?}");

    // ---- The first token expires: 4001, a fresh token, the same desktop; nothing else shown.
    let state = wait_for(
        &page,
        // 4001 on the live session; on a machine slow enough that the token expired before
        // the upgrade, the same refresh comes from the refusal (401 token_expired) instead.
        "window.vncgateExample.closes.some(c => c.code === 4001 \
           || c.refusal?.error === 'token_expired') \
         && window.vncgateExample.state === 'connected' && window.vncgateExample",
    )
    .await;
    assert_eq!(state["errors"], json!([]), "{state}");
    page.wait_color(rgb(DESK_B), None).await;
    let calls = token_calls(&page).await;
    assert!(reasons(&calls).contains(&"expired"), "{calls:?}");
    assert!(calls.iter().all(|c| c["sid"] == sid.as_str()), "{calls:?}");
    let closed_live = state["closes"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["code"] == 4001));
    if closed_live {
        gw.wait_log(|v| {
            v["event"] == "session_ended"
                && v["session_id"] == sid.as_str()
                && v["close_code"] == 4001
        })
        .await;
    }

    // ---- Session events: a second viewer joins, the admin switches the input mode.
    let viewer_token = jwt("bob", &sid, json!({ "share": "view" }));
    let (mut viewer, _) = rfb_client::connect(&gw.ws_client(&viewer_token))
        .await
        .expect("viewer upgrade");
    rfb_client::rfb_handshake(&mut viewer)
        .await
        .expect("viewer handshake");
    let viewers = wait_for(
        &page,
        "window.vncgateExample.viewers?.count === 2 && window.vncgateExample.viewers",
    )
    .await;
    let roles: Vec<&str> = viewers["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter_map(|c| c["role"].as_str())
        .collect();
    assert_eq!(roles, ["owner", "view"], "{viewers}");
    let (status, body) = gw
        .admin(
            "PUT",
            &format!("/admin/sessions/{sid}/input"),
            r#"{"mode":"view_only","user":"alice"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for(&page, "window.vncgateExample.inputMode === 'view_only'").await;
    drop(viewer);
    wait_for(&page, "window.vncgateExample.viewers?.count === 1").await;

    // ---- Reload: the same sid, the same desktop, though placement would now pick desk-a.
    drop(occupant_a);
    let occupant_b = occupy(&gw, "desk-b").await;
    page.reload().await;
    page.wait_color(rgb(DESK_B), None).await;
    let calls = token_calls(&page).await;
    assert!(calls.iter().all(|c| c["sid"] == sid.as_str()), "{calls:?}");
    assert_eq!(
        reasons(&calls).iter().filter(|r| **r == "initial").count(),
        2,
        "one first connection per page load: {calls:?}"
    );
    let started: Vec<Value> = gw
        .logs()
        .into_iter()
        .filter(|v| v["event"] == "session_started" && v["session_id"] == sid.as_str())
        .collect();
    assert!(
        started.iter().all(|v| v["backend"] == "desk-b"),
        "{started:?}"
    );
    drop(occupant_b);

    // ---- Gateway restart: 1001, retries that fail while it is down, then connected again.
    let closes_before = example(&page).await["closes"]
        .as_array()
        .map_or(0, Vec::len);
    gw.stop().await;
    wait_for(
        &page,
        &format!(
            "window.vncgateExample.closes.slice({closes_before}).filter(c => c.code === 1006).length >= 2"
        ),
    )
    .await;
    gw.restart().await;
    let state = wait_for(
        &page,
        "window.vncgateExample.state === 'connected' && window.vncgateExample",
    )
    .await;
    page.wait_color(rgb(DESK_B), None).await;
    let closes: Vec<&Value> = state["closes"]
        .as_array()
        .expect("closes")
        .iter()
        .skip(closes_before)
        .collect();
    let codes: Vec<i64> = closes.iter().filter_map(|c| c["code"].as_i64()).collect();
    assert_eq!(codes.first(), Some(&1001), "{codes:?}");
    assert!(codes[1..].iter().all(|&c| c == 1006), "{codes:?}");
    assert!(closes.iter().all(|c| c["willRetry"] == true), "{closes:?}");
    // Attempt times are in order (their spacing is the backoff's business, not asserted).
    let at: Vec<f64> = closes.iter().filter_map(|c| c["at"].as_f64()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    eprintln!("restart: close codes {codes:?} at {at:?} ms");

    // ---- An administrator closes the session: 4003, no retry, the page says why.
    let (status, body) = gw
        .admin("DELETE", &format!("/admin/sessions/{sid}"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    let stopped = wait_for(
        &page,
        "window.vncgateExample.state === 'disconnected' && window.vncgateExample",
    )
    .await;
    let last = &stopped["closes"]
        .as_array()
        .expect("closes")
        .last()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&last["code"], &last["willRetry"]),
        (&json!(4003), &json!(false)),
        "{stopped}"
    );
    let text = page
        .call(
            "evaluate",
            json!({ "expr": "document.querySelector('.status').textContent" }),
        )
        .await;
    assert!(text.as_str().unwrap_or_default().contains("4003"), "{text}");
    page.screenshot("react_client_stopped").await;

    // Chromium's own lines: each reconnect that found no gateway, the events stream's request
    // then, and its request to the draining gateway (503); nothing from the app, noVNC or React.
    let failed = codes.len() - 1;
    let seen = page
        .assert_clean_console(&[
            Allowed::chromium_ws_failed(&gw.ws_endpoint(), ""),
            Allowed {
                prefix: "Failed to load resource: net::ERR_CONNECTION_REFUSED".into(),
                contains: String::new(),
            },
            Allowed {
                prefix: "Failed to load resource: the server responded with a status of 503".into(),
                contains: String::new(),
            },
        ])
        .await;
    assert!(seen.len() >= failed, "{seen:?} for {codes:?}");
    ctx.close().await;
}

/// An upgrade refused before the WebSocket exists (403 `backend_not_allowed`: the app's token
/// names a backend the pool does not have) looks like a lost network to page JavaScript (1006);
/// the client asks the events path, learns the refusal, stops at once and the page says why.
#[tokio::test]
async fn a_refused_upgrade_stops_the_react_app_with_its_reason() {
    let _shared = EXCLUSIVE.read().await;
    let app = build_example();
    let desk = Desk::start("desk", DESK_A).await;
    let mut spec = GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())]);
    spec.web_root = Some(app);
    let gw = Gw::start("gw", spec).await;
    let ctx = Context::new().await;
    let page = ctx.page("refused").await;
    page.call(
        "routeTokens",
        json!({
            "path": TOKEN_PATH, "sub": "alice", "secret": SECRET, "ttls": [3600],
            "claims": { "backend": "not-a-desk" },
        }),
    )
    .await;
    page.goto(&format!("{}/#token_url={TOKEN_PATH}", gw.origin()))
        .await;
    let stopped = wait_for(
        &page,
        "window.vncgateExample.state === 'disconnected' && window.vncgateExample",
    )
    .await;
    let closes = stopped["closes"].as_array().expect("closes");
    assert_eq!(closes.len(), 1, "one attempt, no retry: {stopped}");
    assert_eq!(closes[0]["code"], 1006, "{stopped}");
    assert_eq!(
        closes[0]["refusal"],
        json!({ "status": 403, "error": "backend_not_allowed" }),
        "{stopped}"
    );
    let text = page
        .call(
            "evaluate",
            json!({ "expr": "document.querySelector('.status').textContent" }),
        )
        .await;
    assert!(
        text.as_str()
            .unwrap_or_default()
            .contains("refused: backend_not_allowed"),
        "{text}"
    );
    assert_eq!(token_calls(&page).await.len(), 1);
    gw.wait_log(|v| v["event"] == "upgrade_rejected" && v["code"] == "backend_not_allowed")
        .await;
    // Chromium's lines for the refused upgrade and the refused probe; nothing else.
    let seen = page
        .assert_clean_console(&[
            Allowed::chromium_ws_failed(
                &gw.ws_endpoint(),
                "Error during WebSocket handshake: Unexpected response code: 403",
            ),
            Allowed {
                prefix: "Failed to load resource: the server responded with a status of 403".into(),
                contains: String::new(),
            },
        ])
        .await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    ctx.close().await;
}
