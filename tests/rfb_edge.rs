//! The RFB edge (contract §11) over real sockets, against real TigerVNC (and x11vnc) with
//! their default protections on: credentials injected by the gateway, the relayed challenge,
//! view-only and input-mode switches checked on the X side, sharing, refusals, 1008, and RFB
//! health checks that never get the gateway blacklisted.

mod common;

use std::time::Duration;

use common::desktop::{pointer_location, wait_pointer_at};
use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::x11vnc::X11vnc;
use common::xvnc::{Security, Xvnc};
use common::{BackendSpec, Gateway, GatewayConfig, RfbSpec, now, token_with_claims};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const PASSWORD: &str = "s3cr3tpw";
const PASSWORD_ENV: &str = "VNCGATE_TEST_VNC_PASSWORD";

async fn xvnc(security: Security) -> Xvnc {
    Xvnc::builder()
        .name("rfb-edge")
        .geometry((640, 480))
        .security(security)
        .start_async()
        .await
        .expect("Xvnc")
}

/// A terminate-mode gateway in front of `desk`, with `password` in the pool's `password_env`.
async fn gateway(desk: &Xvnc, password: Option<&str>) -> Gateway {
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("desk", desk.rfb_addr())]);
    if let Some(password) = password {
        cfg.rfb.password_env = Some(PASSWORD_ENV.into());
        cfg.env.push((PASSWORD_ENV.into(), password.into()));
    }
    Gateway::start(cfg).await
}

fn jwt(sub: &str, sid: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    token_with_claims(&claims)
}

async fn open(gw: &Gateway, token: &str) -> common::Live {
    common::open_session(gw, token).await
}

async fn refused(gw: &Gateway, token: &str) -> Option<(u16, String)> {
    let c = WsConnect::new(gw.ws_url(&format!("?token={token}")));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    rfb_client::error_code(&err)
}

/// Waits for the gateway's metric to reach `at_least` (metrics change after an event the test
/// cannot observe otherwise: the gateway dropping a message).
async fn wait_metric(gw: &Gateway, series: &str, at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    loop {
        let v = gw.metric(series).await;
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed at {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn vnc_password_is_answered_by_the_gateway_and_never_reaches_client_or_logs() {
    let desk = xvnc(Security::VncAuth {
        password: PASSWORD.into(),
    })
    .await;
    let gw = gateway(&desk, Some(PASSWORD)).await;
    // The test client only speaks security None: it gets in only because the gateway answered
    // the backend's VNC Authentication itself.
    let mut live = open(&gw, &jwt("alice", "pw", json!({}))).await;
    assert_eq!(live.session.server_name, "rfb-edge");
    let update = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update");
    assert!(update.pixels > 0);
    let handshakes = gw
        .metric("vncgate_backend_handshake_duration_seconds_count{pool=\"default\"}")
        .await;
    assert!(handshakes >= 1.0);
    assert!(
        gw.raw_logs().iter().all(|l| !l.contains(PASSWORD)),
        "the VNC password is in the gateway's logs"
    );
}

#[tokio::test]
async fn default_tigervnc_and_vencrypt_x509vnc_work_with_configured_credentials() {
    // TigerVNC's defaults (TLSVnc,VncAuth): the anonymous-TLS subtype cannot be spoken by
    // rustls, so the gateway logs in with VNC Authentication.
    let default = xvnc(Security::Default {
        password: PASSWORD.into(),
    })
    .await;
    let gw = gateway(&default, Some(PASSWORD)).await;
    let live = open(&gw, &jwt("alice", "d", json!({}))).await;
    assert_eq!(live.session.server_name, "rfb-edge");

    let x509 = xvnc(Security::X509Vnc {
        password: PASSWORD.into(),
    })
    .await;
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("desk", x509.rfb_addr())]);
    cfg.rfb = RfbSpec {
        password_env: Some(PASSWORD_ENV.into()),
        ca_file: Some(x509.ca_file().expect("ca").to_owned()),
        ..RfbSpec::default()
    };
    cfg.env.push((PASSWORD_ENV.into(), PASSWORD.into()));
    let gw = Gateway::start(cfg).await;
    let mut live = open(&gw, &jwt("alice", "x", json!({}))).await;
    let update = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update over VeNCrypt X509Vnc");
    assert!(update.pixels > 0);
}

#[tokio::test]
async fn a_wrong_configured_password_is_502_backend_auth_failed() {
    let desk = xvnc(Security::VncAuth {
        password: PASSWORD.into(),
    })
    .await;
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("desk", desk.rfb_addr())]);
    cfg.rfb.password_env = Some(PASSWORD_ENV.into());
    cfg.env.push((PASSWORD_ENV.into(), "wrong-pw".into()));
    // No active checks: they would mark the backend down (503) before the request.
    cfg.pool_extra = "    health_check_interval_seconds: 0\n".into();
    let gw = Gateway::start(cfg).await;
    assert_eq!(
        refused(&gw, &jwt("alice", "w", json!({}))).await,
        Some((502, "backend_auth_failed".into()))
    );
    let line = gw.wait_log(|v| v["event"] == "backend_auth_failed").await;
    assert_eq!(line["backend"], "desk");
    assert_eq!(
        gw.metric("vncgate_backend_auth_failures_total{backend=\"desk\",pool=\"default\"}")
            .await,
        1.0
    );
    assert!(gw.raw_logs().iter().all(|l| !l.contains("wrong-pw")));
}

/// Without a configured password the browser's user answers the challenge: the gateway offers
/// VNC Authentication and relays challenge and response.
#[tokio::test]
async fn without_credentials_the_challenge_is_relayed_to_the_client() {
    let desk = xvnc(Security::VncAuth {
        password: PASSWORD.into(),
    })
    .await;
    let gw = gateway(&desk, None).await;
    for (password, accepted) in [("not-it", false), (PASSWORD, true)] {
        let c = WsConnect::new(gw.ws_url(&format!("?token={}", jwt("alice", "r", json!({})))));
        let (mut ws, _) = rfb_client::connect(&c).await.expect("upgrade");
        let mut rx = Reader::default();
        assert_eq!(rx.take(&mut ws, 12).await, b"RFB 003.008\n");
        send(&mut ws, b"RFB 003.008\n").await;
        assert_eq!(
            rx.take(&mut ws, 2).await,
            [1, 2],
            "VNC Authentication offered"
        );
        send(&mut ws, &[2]).await;
        let mut challenge = [0u8; 16];
        challenge.copy_from_slice(&rx.take(&mut ws, 16).await);
        let response = vncgate::rfb::vnc_auth::response(password.as_bytes(), &challenge);
        send(&mut ws, &response).await;
        let result = u32::from_be_bytes(rx.take(&mut ws, 4).await.try_into().expect("u32"));
        assert_eq!(result == 0, accepted, "password {password:?}");
        if accepted {
            send(&mut ws, &[1]).await;
            let init = rx.take(&mut ws, 24).await;
            assert_eq!(u16::from_be_bytes([init[0], init[1]]), 640);
        }
    }
}

#[tokio::test]
async fn x11vnc_works_behind_terminate_mode() {
    let desk = X11vnc::start_async((320, 240)).await.expect("x11vnc");
    desk.set_root_color("#204060").expect("xsetroot");
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::rfb(
        "x11",
        desk.rfb_addr(),
    )]))
    .await;
    let mut live = open(&gw, &jwt("alice", "x11", json!({}))).await;
    let mut update = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update");
    // x11vnc polls the X screen, so the root colour reaches its framebuffer a little after
    // xsetroot returns (190-580 ms seen here): ask again until it is there.
    let deadline = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    while update.first_pixel_rgb != [0x20, 0x40, 0x60] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the desktop colour never arrived: {update:?}"
        );
        update = rfb_client::framebuffer_update(&mut live.ws, &mut live.session, false)
            .await
            .expect("update");
    }
}

/// View-only input never reaches the X server, an interactive connection's does, and the admin
/// switch turns one into the other without a reconnect.
#[tokio::test]
async fn view_only_input_is_dropped_and_the_admin_switch_hands_over_control() {
    let desk = xvnc(Security::None).await;
    let display = desk.display_name();
    let gw = gateway(&desk, None).await;
    let mut owner = open(&gw, &jwt("alice", "shared", json!({}))).await;
    let mut viewer = open(&gw, &jwt("bob", "shared", json!({ "share": "view" }))).await;

    // The viewer's pointer is dropped (counted); the owner's then moves the X pointer there,
    // so the drop was not a delay.
    rfb_client::send_pointer_event(&mut viewer.ws, 100, 100, 0)
        .await
        .expect("send");
    wait_metric(&gw, "vncgate_input_dropped_total{kind=\"pointer\"}", 1.0).await;
    rfb_client::send_pointer_event(&mut owner.ws, 300, 200, 0)
        .await
        .expect("send");
    wait_pointer_at(&display, (300, 200)).await;

    let (_, before) = gw.admin("GET", "/admin/sessions", "").await;
    let before: Value = serde_json::from_str(&before).expect("json");
    let roles: Vec<(String, String, String)> = before["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            (
                s["user_id"].as_str().unwrap_or("").to_owned(),
                s["role"].as_str().unwrap_or("").to_owned(),
                s["input_mode"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(roles.contains(&("alice".into(), "owner".into(), "interactive".into())));
    assert!(roles.contains(&("bob".into(), "view".into(), "view_only".into())));

    let (status, body) = gw
        .admin(
            "PUT",
            "/admin/sessions/shared/input",
            r#"{"mode":"interactive","user":"bob"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = gw
        .admin(
            "PUT",
            "/admin/sessions/shared/input",
            r#"{"mode":"view_only","user":"alice"}"#,
        )
        .await;
    assert_eq!(status, 200);
    gw.wait_logs(2, |v| v["event"] == "input_mode_changed")
        .await;
    rfb_client::send_pointer_event(&mut owner.ws, 10, 10, 0)
        .await
        .expect("send");
    wait_metric(&gw, "vncgate_input_dropped_total{kind=\"pointer\"}", 2.0).await;
    rfb_client::send_pointer_event(&mut viewer.ws, 123, 77, 0)
        .await
        .expect("send");
    wait_pointer_at(&display, (123, 77)).await;

    let (_, after) = gw.admin("GET", "/admin/sessions", "").await;
    let after: Value = serde_json::from_str(&after).expect("json");
    let ids = |v: &Value| {
        let mut ids: Vec<u64> = v["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .filter_map(|s| s["conn_id"].as_u64())
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(ids(&before), ids(&after), "no reconnect");
    assert_eq!(pointer_location(&display), (123, 77));
}

#[tokio::test]
async fn sharing_joins_only_existing_sessions_and_owner_binding_holds() {
    let desk = xvnc(Security::None).await;
    let gw = gateway(&desk, None).await;
    assert_eq!(
        refused(&gw, &jwt("bob", "s", json!({ "share": "view" }))).await,
        Some((404, "not_found".into())),
        "a share creates no session"
    );
    let _owner = open(&gw, &jwt("alice", "s", json!({}))).await;
    assert_eq!(
        refused(&gw, &jwt("bob", "s", json!({}))).await,
        Some((403, "session_owned_by_other_user".into()))
    );
    let _control = open(&gw, &jwt("carol", "s", json!({ "share": "control" }))).await;
    assert_eq!(
        refused(&gw, &jwt("bob", "s", json!({ "share": "owner" }))).await,
        Some((401, "token_malformed".into()))
    );
}

#[tokio::test]
async fn transparent_pools_refuse_policies_they_cannot_enforce() {
    let backend = RfbServer::start(Mode::Rfb {
        name: "t".into(),
        width: 16,
        height: 16,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.rfb.mode = Some("transparent");
    let gw = Gateway::start(cfg).await;
    for claims in [
        json!({ "view_only": true }),
        json!({ "clipboard": "none" }),
        json!({ "clipboard": "to_client" }),
    ] {
        assert_eq!(
            refused(&gw, &jwt("alice", "t", claims.clone())).await,
            Some((403, "view_only_unenforceable".into())),
            "{claims}"
        );
    }
    let _owner = open(&gw, &jwt("alice", "t", json!({ "clipboard": "both" }))).await;
    assert_eq!(
        refused(&gw, &jwt("bob", "t", json!({ "share": "view" }))).await,
        Some((403, "view_only_unenforceable".into()))
    );
}

#[tokio::test]
async fn an_unknown_client_message_closes_with_1008() {
    let desk = xvnc(Security::None).await;
    let gw = gateway(&desk, None).await;
    let mut live = open(&gw, &jwt("alice", "m", json!({}))).await;
    live.ws
        .send(Message::Binary(vec![77u8, 0, 0, 0].into()))
        .await
        .expect("send");
    let frame = rfb_client::read_close(&mut live.ws).await.expect("close");
    assert_eq!(u16::from(frame.code), 1008);
    gw.wait_log(|v| v["event"] == "session_ended" && v["close_code"] == 1008)
        .await;
}

#[tokio::test]
async fn rfb_health_checks_mark_a_port_that_does_not_speak_rfb_down() {
    // Accepts TCP and then says nothing: a TCP check would call it up.
    let silent = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("silent", silent.addr)]);
    cfg.pool_extra = "    health_check_interval_seconds: 1\n".into();
    let gw = Gateway::start(cfg).await;
    gw.wait_log(|v| v["event"] == "backend_health_changed" && v["up"] == false)
        .await;
    assert_eq!(
        refused(&gw, &jwt("alice", "h", json!({}))).await,
        Some((503, "no_healthy_backend".into()))
    );
}

/// TigerVNC with its defaults blacklists an address after 5 connections that close before
/// authenticating. Through the gateway every aborted browser connection and every health check
/// still authenticates, so the desktop stays reachable.
#[tokio::test]
async fn aborted_connections_and_health_checks_never_get_the_gateway_blacklisted() {
    let desk = xvnc(Security::Default {
        password: PASSWORD.into(),
    })
    .await;
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("desk", desk.rfb_addr())]);
    cfg.rfb.password_env = Some(PASSWORD_ENV.into());
    cfg.env.push((PASSWORD_ENV.into(), PASSWORD.into()));
    cfg.pool_extra = "    health_check_interval_seconds: 1\n".into();
    let gw = Gateway::start(cfg).await;
    for i in 0..50 {
        let c = WsConnect::new(gw.ws_url(&format!("?token={}", jwt("alice", "b", json!({})))));
        let (ws, _) = rfb_client::connect(&c)
            .await
            .unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        drop(ws);
    }
    gw.wait_logs(50, |v| v["event"] == "session_ended").await;
    // Ten more health checks after the aborted connections (each one a logged connection).
    let accepted = accepted_connections(&desk);
    let deadline = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    // Xvnc's log is the only record of a check reaching it: poll it.
    while accepted_connections(&desk) < accepted + 10 {
        assert!(tokio::time::Instant::now() < deadline, "no health checks");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!desk.blacklisted(), "{}", desk.log_tail(2000));
    let live = open(&gw, &jwt("alice", "b", json!({}))).await;
    assert_eq!(live.session.server_name, "rfb-edge");
}

fn accepted_connections(desk: &Xvnc) -> usize {
    desk.log_tail(usize::MAX)
        .matches("Connections: accepted")
        .count()
}

/// Reads RFB bytes out of WebSocket messages, for the hand-written handshake above.
#[derive(Default)]
struct Reader(Vec<u8>);

impl Reader {
    async fn take(&mut self, ws: &mut rfb_client::WsClient, n: usize) -> Vec<u8> {
        while self.0.len() < n {
            match tokio::time::timeout(common::EVENT_TIMEOUT, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.0.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                other => panic!("connection ended: {other:?}"),
            }
        }
        self.0.drain(..n).collect()
    }
}

async fn send(ws: &mut rfb_client::WsClient, bytes: &[u8]) {
    ws.send(Message::Binary(bytes.to_vec().into()))
        .await
        .expect("send");
}
