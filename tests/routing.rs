//! Backend choice through the real gateway: least-loaded placement, stickiness by `sid`, and
//! what happens when backends fail health checks (503 codes, failover re-pin).

mod common;

use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig, token};

async fn desk(name: &str) -> RfbServer {
    RfbServer::start(Mode::Rfb {
        name: name.into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture")
}

/// Open a session and return the backend's desktop name and the live connection.
async fn desktop_of(gw: &Gateway, sub: &str, sid: &str) -> (String, rfb_client::WsClient) {
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", token(sub, Some(sid)))));
    let (mut ws, _) = rfb_client::connect(&c).await.expect("upgrade");
    let session = rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
    (session.server_name, ws)
}

async fn refused(gw: &Gateway, sub: &str, sid: &str) -> (u16, String) {
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", token(sub, Some(sid)))));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    rfb_client::error_code(&err).expect("http refusal")
}

#[tokio::test]
async fn least_loaded_placement_and_sticky_reconnects() {
    let (a, b) = (desk("a").await, desk("b").await);
    let gw = Gateway::start(GatewayConfig::new(vec![
        BackendSpec::rfb("a", a.addr),
        BackendSpec::rfb("b", b.addr),
    ]))
    .await;
    let mut live = Vec::new();
    let mut placed = std::collections::HashMap::new();
    for i in 0..6 {
        let (name, ws) = desktop_of(&gw, &format!("user{i}"), &format!("s{i}")).await;
        placed.insert(i, name);
        live.push(ws);
    }
    let on_a = placed.values().filter(|n| *n == "a").count();
    assert_eq!(
        on_a, 3,
        "six sessions over two idle backends split evenly: {placed:?}"
    );
    assert_eq!(
        gw.metric("vncgate_backend_sessions{backend=\"a\",pool=\"default\"}")
            .await,
        3.0
    );

    // A reconnect (tab reload) lands on the same desktop, even though loads changed meanwhile.
    live.clear();
    gw.wait_logs(6, |v| v["event"] == "session_ended").await;
    let (_, _extra_on_b) = desktop_of(&gw, "other", "fresh").await;
    for i in 0..6 {
        let (name, _ws) = desktop_of(&gw, &format!("user{i}"), &format!("s{i}")).await;
        assert_eq!(name, placed[&i], "session s{i} moved");
    }
}

#[tokio::test]
async fn unhealthy_backends_give_503() {
    let (a, b) = (desk("a").await, desk("b").await);
    let mut cfg = GatewayConfig::new(vec![
        BackendSpec::rfb("a", a.addr),
        BackendSpec::rfb("b", b.addr),
    ]);
    cfg.pool_extra = "    health_check_interval_seconds: 1\n".into();
    let gw = Gateway::start(cfg).await;

    // Pin one session to each backend.
    let (first, ws1) = desktop_of(&gw, "u1", "s1").await;
    let (second, ws2) = desktop_of(&gw, "u2", "s2").await;
    assert_ne!(first, second);
    let (sid_on_a, user_on_a) = if first == "a" {
        ("s1", "u1")
    } else {
        ("s2", "u2")
    };
    drop((ws1, ws2));

    drop(a);
    gw.wait_log(|v| {
        v["event"] == "backend_health_changed" && v["backend"] == "a" && v["up"] == false
    })
    .await;
    assert_eq!(
        gw.metric("vncgate_backend_up{backend=\"a\",pool=\"default\"}")
            .await,
        0.0
    );
    assert_eq!(
        refused(&gw, user_on_a, sid_on_a).await,
        (503, "backend_unavailable".into())
    );
    let (name, _ws) = desktop_of(&gw, "u3", "s3").await;
    assert_eq!(name, "b", "new sessions avoid the dead backend");

    drop(b);
    gw.wait_log(|v| {
        v["event"] == "backend_health_changed" && v["backend"] == "b" && v["up"] == false
    })
    .await;
    assert_eq!(
        refused(&gw, "u4", "s4").await,
        (503, "no_healthy_backend".into())
    );
    let (status, body) = gw.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""healthy":0"#), "{body}");
}

#[tokio::test]
async fn failover_pool_repins_to_a_healthy_backend() {
    let (a, b) = (desk("a").await, desk("b").await);
    let mut cfg = GatewayConfig::new(vec![
        BackendSpec::rfb("a", a.addr),
        BackendSpec::rfb("b", b.addr),
    ]);
    cfg.pool_extra = "    health_check_interval_seconds: 1\n    failover: true\n".into();
    let gw = Gateway::start(cfg).await;
    let (first, ws) = desktop_of(&gw, "alice", "s1").await;
    drop(ws);
    let (dead, survivor) = if first == "a" { (a, "b") } else { (b, "a") };
    drop(dead);
    gw.wait_log(|v| {
        v["event"] == "backend_health_changed" && v["backend"] == first && v["up"] == false
    })
    .await;
    let (name, _ws) = desktop_of(&gw, "alice", "s1").await;
    assert_eq!(name, survivor);
    gw.wait_log(|v| v["event"] == "session_repinned").await;
}
