//! A scripted scenario through the real gateway, then the exact value of every counter and
//! gauge it touched: so a dashboard or an alert built on these series cannot silently break.
//! Sessions that succeed, token failures of several kinds, a backend that goes down, and a store
//! error (Redis killed).

mod common;

use common::redis_server::RedisServer;
use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig, now, open_session, token, token_with_claims};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// RFB 3.8 handshake bytes with security None: the server sends its version (12), the security
/// types (2), SecurityResult (4) and ServerInit (24 + name); the client its version (12), its
/// choice (1) and ClientInit (1).
const SERVER_HANDSHAKE_BYTES: u64 = 12 + 2 + 4 + 24 + 1;
const CLIENT_HANDSHAKE_BYTES: u64 = 12 + 1 + 1;

async fn close_normally(mut live: common::Live) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    live.ws
        .send(Message::Close(Some(frame)))
        .await
        .expect("close");
    let _ = rfb_client::read_close(&mut live.ws).await;
}

async fn refused(gw: &Gateway, jwt: Option<&str>) -> String {
    let query = jwt.map(|t| format!("?token={t}")).unwrap_or_default();
    let err = rfb_client::connect(&WsConnect::new(gw.ws_url(&query)))
        .await
        .err()
        .expect("refused");
    rfb_client::error_code(&err).expect("http refusal").1
}

#[tokio::test]
async fn scripted_scenario_leaves_exact_metric_values() {
    let mut redis = RedisServer::start().await.expect("redis");
    let a = RfbServer::start(Mode::Rfb {
        name: "a".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("a");
    let b = RfbServer::start(Mode::Rfb {
        name: "b".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("b");
    let mut cfg = GatewayConfig::new(vec![
        BackendSpec::rfb("a", a.addr),
        BackendSpec::rfb("b", b.addr),
    ]);
    cfg.pool_extra = "    health_check_interval_seconds: 1\n".into();
    cfg.redis_url = Some(redis.url());
    let gw = Gateway::start(cfg).await;

    // Three sessions that succeed and end normally.
    for i in 0..3 {
        let live = open_session(&gw, &token(&format!("u{i}"), Some(&format!("s{i}")))).await;
        close_normally(live).await;
    }
    gw.wait_logs(3, |v| v["event"] == "session_ended").await;

    // Token failures of several kinds.
    let expired = token_with_claims(&json!({"sub": "x", "exp": now() - 3600}));
    assert_eq!(refused(&gw, Some(&expired)).await, "token_expired");
    assert_eq!(refused(&gw, Some(&expired)).await, "token_expired");
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "x", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx"),
    )
    .expect("sign");
    assert_eq!(refused(&gw, Some(&forged)).await, "token_signature");
    assert_eq!(refused(&gw, None).await, "token_missing");

    // Backend b goes down.
    drop(b);
    gw.wait_log(|v| {
        v["event"] == "backend_health_changed" && v["backend"] == "b" && v["up"] == false
    })
    .await;

    // The store goes down; a new session is still served (by a), and ends normally.
    redis.kill().await.expect("kill redis");
    // Without any request the liveness probe notices (two missed pings, 1 s apart).
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while gw.metric("vncgate_store_up").await != 0.0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("vncgate_store_up never went to 0");
    let live = open_session(&gw, &token("late", Some("late"))).await;
    assert_eq!(live.session.server_name, "a");
    close_normally(live).await;
    gw.wait_logs(4, |v| v["event"] == "session_ended").await;

    let expect = [
        ("vncgate_upgrades_total{result=\"ok\"}", 4.0),
        ("vncgate_upgrades_total{result=\"token_expired\"}", 2.0),
        ("vncgate_upgrades_total{result=\"token_signature\"}", 1.0),
        ("vncgate_upgrades_total{result=\"token_missing\"}", 1.0),
        (
            "vncgate_upgrades_total{result=\"backend_connect_failed\"}",
            0.0,
        ),
        ("vncgate_auth_failures_total{reason=\"token_expired\"}", 2.0),
        (
            "vncgate_auth_failures_total{reason=\"token_signature\"}",
            1.0,
        ),
        ("vncgate_auth_failures_total{reason=\"token_missing\"}", 1.0),
        ("vncgate_auth_failures_total{reason=\"origin_denied\"}", 0.0),
        ("vncgate_upgrade_duration_seconds_count", 4.0),
        ("vncgate_sessions_active{pool=\"default\"}", 0.0),
        (
            "vncgate_session_duration_seconds_count{pool=\"default\"}",
            4.0,
        ),
        ("vncgate_disconnects_total{code=\"1000\"}", 4.0),
        ("vncgate_disconnects_total{code=\"1006\"}", 0.0),
        (
            "vncgate_relay_bytes_total{direction=\"backend_to_client\"}",
            (4 * SERVER_HANDSHAKE_BYTES) as f64,
        ),
        (
            "vncgate_relay_bytes_total{direction=\"client_to_backend\"}",
            (4 * CLIENT_HANDSHAKE_BYTES) as f64,
        ),
        ("vncgate_relay_buffered_bytes", 0.0),
        ("vncgate_backend_up{backend=\"a\",pool=\"default\"}", 1.0),
        ("vncgate_backend_up{backend=\"b\",pool=\"default\"}", 0.0),
        (
            "vncgate_backend_sessions{backend=\"a\",pool=\"default\"}",
            0.0,
        ),
        (
            "vncgate_backend_sessions{backend=\"b\",pool=\"default\"}",
            0.0,
        ),
        (
            "vncgate_backend_connect_duration_seconds_count{pool=\"default\"}",
            4.0,
        ),
        ("vncgate_store_up", 0.0),
        // The probe marked the store down before the session; its calls fail fast and are
        // counted: the pin lookup, and the refresh when it ended. While the store is down a
        // new pin is claimed in the local cache only (rendezvous placement), not in Redis.
        ("vncgate_store_errors_total{op=\"get\"}", 1.0),
        ("vncgate_store_errors_total{op=\"claim\"}", 0.0),
        ("vncgate_store_errors_total{op=\"refresh\"}", 1.0),
        ("vncgate_max_sessions", 10000.0),
    ];
    let (_, scrape) = gw.admin_get("/metrics").await;
    let mut wrong = Vec::new();
    for (series, want) in expect {
        let got = scrape
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if got != Some(want) {
            wrong.push(format!("{series}: want {want}, got {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n\nscrape:\n{scrape}",
        wrong.join("\n")
    );
}
