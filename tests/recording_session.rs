//! Recording through a live gateway (contract §12): a session whose token asks for it is
//! written as FBS with its audit file beside it while the session runs, and the file verifies;
//! a token that does not ask is not recorded; a pool that cannot record refuses the token.

mod common;

use std::process::Command;

use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig, now, open_session as open};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn token(sub: &str, sid: &str, record: bool) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if record {
        claims["record"] = json!(true);
    }
    common::token_with_claims(&claims)
}

async fn recording_gateway(dir: &std::path::Path, backends: Vec<BackendSpec>) -> Gateway {
    let mut cfg = GatewayConfig::new(backends);
    cfg.extra = format!(
        "recording:\n  dir: \"{}\"\n  when: claim\n  input: keys\n",
        dir.display()
    );
    Gateway::start(cfg).await
}

#[tokio::test]
async fn a_recorded_session_is_written_as_fbs_with_its_audit_and_verifies() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "recorded-desk".into(),
        width: 32,
        height: 16,
        rgb: [10, 20, 30],
    })
    .await
    .expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = recording_gateway(dir.path(), vec![BackendSpec::fixture("desk", &desk)]).await;

    let mut live = open(&gw, &token("alice", "rec-1", true)).await;
    let update = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update");
    assert_eq!(update.first_pixel_rgb, [10, 20, 30]);
    let started = gw.wait_log(|v| v["event"] == "recording_started").await;
    // A click at (3, 4) with pointer motion around it, and the key `a` pressed and released.
    for msg in [
        vec![5, 0, 0, 1, 0, 1],
        vec![5, 1, 0, 3, 0, 4],
        vec![5, 1, 0, 5, 0, 6],
        vec![5, 0, 0, 5, 0, 6],
        vec![4, 1, 0, 0, 0, 0, 0, 0x61],
        vec![4, 0, 0, 0, 0, 0, 0, 0x61],
    ] {
        live.ws
            .send(Message::Binary(msg.into()))
            .await
            .expect("input");
    }
    // An update request behind the input: its answer means the input before it was relayed.
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update after the input");
    drop(live);
    let ended = gw.wait_log(|v| v["event"] == "recording_ended").await;
    assert_eq!(ended["session_id"], "rec-1");
    assert_eq!(ended["incomplete"], false, "{ended}");
    let path = ended["path"].as_str().expect("path").to_owned();
    assert_eq!(started["path"], path.as_str());
    assert!(
        path.starts_with(&dir.path().display().to_string()),
        "{path}"
    );
    assert!(path.contains("/rec-1/") && path.ends_with(".fbs"), "{path}");

    // The file is FBS that replays to its end, with the desk's ServerInit.
    let out = Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(["recording", "verify", &path])
        .output()
        .expect("verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("recorded-desk"), "{report}");
    assert!(report.contains("32x16"), "{report}");

    // The audit file beside it has the session's start and end.
    let audit = std::fs::read_to_string(path.replace(".fbs", ".jsonl")).expect("audit");
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for expected in [
        "recording_started",
        "session_started",
        "session_ended",
        "recording_ended",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    // Button changes only (motion is not kept), and keys (`input: keys`).
    let input: Vec<Value> = events
        .iter()
        .filter(|e| e["event"] == "pointer" || e["event"] == "key")
        .map(|e| {
            let mut e = e.clone();
            if let Some(o) = e.as_object_mut() {
                o.remove("t");
            }
            e
        })
        .collect();
    assert_eq!(
        input,
        [
            json!({ "event": "pointer", "buttons": 1, "x": 3, "y": 4 }),
            json!({ "event": "pointer", "buttons": 0, "x": 5, "y": 6 }),
            json!({ "event": "key", "down": true, "keysym": 0x61 }),
            json!({ "event": "key", "down": false, "keysym": 0x61 }),
        ]
    );
    assert!(!audit.contains("token"), "no token in the audit: {audit}");
    assert!(gw.metric("vncgate_recording_bytes_total").await > 0.0);
    assert_eq!(gw.metric("vncgate_recordings_active").await, 0.0);
}

#[tokio::test]
async fn only_tokens_that_ask_are_recorded_and_transparent_pools_refuse_them() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "d".into(),
        width: 8,
        height: 8,
        rgb: [0, 0, 0],
    })
    .await
    .expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = recording_gateway(dir.path(), vec![BackendSpec::fixture("desk", &desk)]).await;
    let mut live = open(&gw, &token("bob", "plain", false)).await;
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update");
    drop(live);
    gw.wait_log(|v| v["event"] == "session_ended").await;
    assert!(
        gw.logs().iter().all(|v| v["event"] != "recording_started"),
        "a session without the claim was recorded"
    );
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);

    // A transparent pool cannot record: a token asking for it is refused, not served unrecorded.
    let echo = RfbServer::start(Mode::Echo).await.expect("fixture");
    let raw = recording_gateway(dir.path(), vec![BackendSpec::raw("echo", echo.addr)]).await;
    let c = WsConnect::new(raw.ws_url(&format!("?token={}", token("carol", "t", true))));
    let err = rfb_client::connect(&c).await.err().expect("refused");
    let (status, code) = rfb_client::error_code(&err).expect("http refusal");
    assert_eq!((status, code.as_str()), (403, "view_only_unenforceable"));
}

/// The retention sweep runs at start (then hourly): a day directory past `retention_days` goes,
/// today's stays, anything else in the directory is left alone.
#[tokio::test]
async fn recordings_past_their_retention_are_swept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join("2000-01-01").join("sid");
    std::fs::create_dir_all(&old).expect("old day");
    std::fs::write(old.join("1-1.fbs"), b"FBS 001.000\n").expect("old file");
    std::fs::write(dir.path().join("notes.txt"), b"kept").expect("other file");
    let desk = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = recording_gateway(dir.path(), vec![BackendSpec::fixture("desk", &desk)]).await;
    let swept = gw.wait_log(|v| v["event"] == "recordings_swept").await;
    assert_eq!(swept["removed"], 1, "{swept}");
    assert!(!dir.path().join("2000-01-01").exists());
    assert!(dir.path().join("notes.txt").exists());
}
