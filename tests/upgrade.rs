//! The upgrade path through the real gateway binary: every token source reaches a backend and
//! completes the RFB handshake; every refusal this gateway can give before the 101 comes back
//! with the contract's status and JSON code.

mod common;

use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig, now, token, token_with_claims};
use rstest::rstest;
use serde_json::json;

async fn rfb_backend(name: &str) -> RfbServer {
    RfbServer::start(Mode::Rfb {
        name: name.into(),
        width: 64,
        height: 48,
        rgb: [10, 200, 30],
    })
    .await
    .expect("fixture")
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Header,
    Query,
    Cookie,
    Subprotocol,
}

fn request(gw: &Gateway, token: &str, source: Source) -> WsConnect {
    let mut c = WsConnect::new(gw.ws_url(""));
    match source {
        Source::Header => c
            .headers
            .push(("Authorization".into(), format!("Bearer {token}"))),
        Source::Query => c.url = gw.ws_url(&format!("?token={token}")),
        Source::Cookie => c
            .headers
            .push(("Cookie".into(), format!("a=b; vncgate_token={token}"))),
        Source::Subprotocol => c.subprotocols = vec!["binary".into(), format!("bearer.{token}")],
    }
    c
}

#[rstest]
#[case::header(Source::Header)]
#[case::query(Source::Query)]
#[case::cookie(Source::Cookie)]
#[case::subprotocol(Source::Subprotocol)]
#[tokio::test]
async fn every_token_source_reaches_the_desktop(#[case] source: Source) {
    let backend = rfb_backend("fixture-desk").await;
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    let jwt = token("alice", Some("s1"));
    let (mut ws, response) = rfb_client::connect(&request(&gw, &jwt, source))
        .await
        .expect("upgrade");
    let selected = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    match source {
        Source::Subprotocol => assert_eq!(
            selected.as_deref(),
            Some("binary"),
            "bearer entry must never be echoed"
        ),
        _ => assert_eq!(selected, None),
    }
    let mut session = rfb_client::rfb_handshake(&mut ws)
        .await
        .expect("rfb handshake");
    assert_eq!(session.server_name, "fixture-desk");
    let update = rfb_client::first_framebuffer_update(&mut ws, &mut session)
        .await
        .expect("update");
    assert_eq!(update.first_pixel_rgb, [10, 200, 30]);
    drop(ws);
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["session_id"], "s1");
    assert_eq!(ended["user_id"], "alice");
    assert_eq!(ended["backend"], "desk");
    assert!(
        ended["bytes_out"].as_u64().unwrap_or(0) > 64 * 48 * 4,
        "{ended}"
    );
    assert!(ended["duration_ms"].is_u64());
    let raw = gw.raw_logs().join("\n");
    assert!(!raw.contains(&jwt), "a token appeared in the logs");
}

async fn refusal(c: &WsConnect) -> (u16, String) {
    match rfb_client::connect(c).await {
        Ok(_) => panic!("upgrade unexpectedly accepted"),
        Err(e) => rfb_client::error_code(&e).unwrap_or_else(|| panic!("not an HTTP refusal: {e}")),
    }
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut base = json!({ "sub": "alice", "exp": now() + 600 });
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if v.is_null() {
                b.remove(k);
            } else {
                b.insert(k.clone(), v.clone());
            }
        }
    }
    base
}

#[rstest]
#[case::missing(None, 401, "token_missing")]
#[case::garbage(Some("not-a-jwt".to_owned()), 401, "token_malformed")]
#[case::expired(Some(token_with_claims(&claims(json!({"exp": now() - 3600})))), 401, "token_expired")]
#[case::not_yet_valid(Some(token_with_claims(&claims(json!({"nbf": now() + 3600})))), 401, "token_not_yet_valid")]
#[case::no_sub(Some(token_with_claims(&claims(json!({"sub": null})))), 401, "token_malformed")]
#[case::no_exp(Some(token_with_claims(&claims(json!({"exp": null})))), 401, "token_malformed")]
#[case::wrong_secret(Some(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims(json!({})),
    &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-xx")).expect("sign")), 401, "token_signature")]
#[case::hs512_not_allowed(Some(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
    &claims(json!({})), &jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes())).expect("sign")), 401, "token_algorithm")]
#[case::bad_sid(Some(token_with_claims(&claims(json!({"sid": "../x"})))), 400, "bad_session_id")]
#[case::unknown_pool(Some(token_with_claims(&claims(json!({"pool": "gpu"})))), 403, "pool_unknown")]
#[case::backend_by_address(Some(token_with_claims(&claims(json!({"backend": "127.0.0.1:5901"})))), 403, "backend_not_allowed")]
#[tokio::test]
async fn token_refusals(#[case] jwt: Option<String>, #[case] status: u16, #[case] code: &str) {
    let backend = rfb_backend("d").await;
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    let mut c = WsConnect::new(gw.ws_url(""));
    if let Some(t) = &jwt {
        c.headers
            .push(("Authorization".into(), format!("Bearer {t}")));
    }
    assert_eq!(refusal(&c).await, (status, code.to_owned()));
    let logged = gw.wait_log(|v| v["event"] == "upgrade_rejected").await;
    assert_eq!(logged["code"], code);
    assert_eq!(
        gw.metric(&format!("vncgate_upgrades_total{{result=\"{code}\"}}"))
            .await,
        1.0
    );
    assert!(!gw.logs().iter().any(|v| v["event"] == "session_started"));
}

#[tokio::test]
async fn handshake_refusals_and_paths() {
    let backend = rfb_backend("d").await;
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    let jwt = token("alice", None);

    // Subprotocols offered without `binary`.
    let mut c = request(&gw, &jwt, Source::Header);
    c.subprotocols = vec!["chat".into()];
    assert_eq!(refusal(&c).await, (400, "bad_upgrade".into()));

    // A plain GET on the WebSocket path is not an upgrade.
    let (status, body) = common::http_get(gw.port, "/websockify", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["error"],
        "bad_upgrade"
    );

    // Wrong WebSocket version.
    let mut c = request(&gw, &jwt, Source::Header);
    c.headers.push(("Sec-WebSocket-Version".into(), "8".into()));
    assert_eq!(refusal(&c).await.1, "bad_upgrade");

    // Any other path: 404 with the JSON body.
    let (status, body) = common::http_get(gw.port, "/nope", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["error"],
        "not_found"
    );
}

#[tokio::test]
async fn session_owner_binding_and_per_user_limit() {
    let backend = rfb_backend("d").await;
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.extra = "limits:\n  max_sessions: 3\n  max_sessions_per_user: 1\n".into();
    let gw = Gateway::start(cfg).await;

    let (mut first, _) = rfb_client::connect(&request(
        &gw,
        &token("alice", Some("shared")),
        Source::Query,
    ))
    .await
    .expect("alice");
    rfb_client::rfb_handshake(&mut first)
        .await
        .expect("handshake");

    // Another user may not join alice's session.
    let c = request(&gw, &token("mallory", Some("shared")), Source::Query);
    assert_eq!(
        refusal(&c).await,
        (403, "session_owned_by_other_user".into())
    );

    // alice already has her one allowed live session.
    let c = request(&gw, &token("alice", Some("other")), Source::Query);
    assert_eq!(refusal(&c).await, (429, "too_many_sessions".into()));

    // Fill the gateway: bob and carol take the two remaining slots, dave is over capacity.
    let (_bob, _) = rfb_client::connect(&request(&gw, &token("bob", None), Source::Query))
        .await
        .expect("bob");
    let (_carol, _) = rfb_client::connect(&request(&gw, &token("carol", None), Source::Query))
        .await
        .expect("carol");
    let c = request(&gw, &token("dave", None), Source::Query);
    assert_eq!(refusal(&c).await, (503, "over_capacity".into()));

    // When alice's session ends, her slot is free again and her pin still leads to her desk.
    drop(first);
    gw.wait_log(|v| v["event"] == "session_ended" && v["user_id"] == "alice")
        .await;
    let (mut again, _) = rfb_client::connect(&request(
        &gw,
        &token("alice", Some("shared")),
        Source::Query,
    ))
    .await
    .expect("alice again");
    assert_eq!(
        rfb_client::rfb_handshake(&mut again)
            .await
            .expect("handshake")
            .server_name,
        "d"
    );
}

/// Issue 13 #11: a client that leaves while its backend is being connected must not keep the
/// pin its upgrade created (the sid and its owner would be held for the idle TTL).
#[tokio::test]
async fn a_pin_created_for_a_client_that_left_before_the_101_is_released() {
    use common::fault_proxy::{Fault, FaultProxy};
    use tokio::io::AsyncWriteExt;
    let backend = rfb_backend("desk").await;
    let proxy = FaultProxy::start(backend.addr).await.expect("proxy");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("desk", proxy.addr())]);
    cfg.extra = "limits:\n  auth_failures_per_minute: 1000\n".into();
    let gw = Gateway::start(cfg).await;

    // The backend stalls mid-handshake while the client gives up and resets its connection.
    proxy.set(Fault::Pause);
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let request = format!(
        "GET /websockify?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("alice", Some("shared-desk"))
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    gw.wait_log(|v| v["event"] == "token_accepted" && v["user_id"] == "alice")
        .await;
    tcp.set_zero_linger().expect("linger");
    drop(tcp);
    proxy.set(Fault::Pass);
    gw.wait_log(|v| v["event"] == "upgrade_aborted").await;

    // Another user may now create the session: the aborted upgrade's pin is gone.
    let c = WsConnect::new(gw.ws_url(&format!("?token={}", token("mallory", Some("shared-desk")))));
    let (mut ws, _) = rfb_client::connect(&c)
        .await
        .expect("upgrade after the release");
    rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
}
