//! `web/playback.html` in real headless Chromium (contract §12): a fixture session recorded
//! through a live gateway is listed through the admin API with the admin token typed into the
//! page, replayed by noVNC from its FBS blocks, and the canvas ends on the fixture's colour.
//! The page is served by the admin listener (same origin as the API it calls).

mod common;

use common::browser::{Context, EXCLUSIVE, PAGE_WAIT_MS, POLL_EVERY, root};
use common::rfb_client;
use common::rfb_server::{Mode, RfbServer};
use common::{ADMIN_TOKEN, BackendSpec, Gateway, GatewayConfig, now, open_session as open};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const RGB: [u8; 3] = [30, 140, 220];

#[tokio::test]
async fn a_recording_replays_in_the_playback_page_to_the_fixtures_colour() {
    let _shared = EXCLUSIVE.read().await;
    let desk = RfbServer::start(Mode::Rfb {
        name: "played-desk".into(),
        width: 64,
        height: 48,
        rgb: RGB,
    })
    .await
    .expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &desk)]);
    cfg.web_root = Some(root().join("web"));
    cfg.extra = format!(
        "recording:\n  dir: \"{}\"\n  when: claim\n",
        dir.path().display()
    );
    let gw = Gateway::start(cfg).await;

    // The live session asks for noVNC's own pixel format (32 bpp, little-endian, red at bit 0),
    // so the recorded stream is what a noVNC client was sent and what the replay decodes.
    let claims = json!({ "sub": "alice", "sid": "play-1", "exp": now() + 600, "record": true });
    let mut live = open(&gw, &common::token_with_claims(&claims)).await;
    let mut set_pixel_format = vec![0u8, 0, 0, 0];
    set_pixel_format.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0]);
    live.ws
        .send(Message::binary(set_pixel_format))
        .await
        .expect("SetPixelFormat");
    live.ws
        .send(Message::binary(vec![2u8, 0, 0, 1, 0, 0, 0, 0]))
        .await
        .expect("SetEncodings raw");
    rfb_client::framebuffer_update(&mut live.ws, &mut live.session, false)
        .await
        .expect("update");
    drop(live);
    gw.wait_log(|v| v["event"] == "recording_ended" && v["session_id"] == "play-1")
        .await;
    let (status, listed) = gw.admin("GET", "/admin/recordings?sid=play-1", "").await;
    assert_eq!(status, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).expect("json");
    let id = listed["recordings"][0]["id"]
        .as_str()
        .expect("a recording")
        .to_owned();

    let ctx = Context::new().await;
    let page = ctx.page("playback").await;
    let url = format!(
        "http://127.0.0.1:{}/playback.html?sid=play-1&id={id}&speed=16",
        gw.admin_port
    );
    page.goto(&url).await;
    // The page's script has run (its form is enabled, the token field focused) once it reports
    // no replay open; noVNC's modules evaluate asynchronously, so that can be after `load`.
    page.disconnected().await;
    // Typed in as a user would, submitted with Enter.
    page.type_text(ADMIN_TOKEN).await;
    page.press("Enter").await;
    page.wait_color(RGB, None).await;

    // The replay runs to its end (the page's own state), the colour still there.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(PAGE_WAIT_MS);
    let html = loop {
        let content = page.content().await;
        let html = content["html"].as_str().unwrap_or_default().to_owned();
        if html.contains(r#"<output id="pb-state">ended</output>"#) {
            assert!(
                !content["url"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(ADMIN_TOKEN),
                "the token is never in the URL"
            );
            break html;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay did not end: {html}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    };
    page.wait_color(RGB, None).await;
    // The audit is on the timeline.
    for event in ["recording_started", "session_started", "session_ended"] {
        assert!(html.contains(event), "{event} not on the timeline");
    }
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}
