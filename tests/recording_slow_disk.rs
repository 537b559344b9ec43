//! A recording whose disk cannot keep up does not slow the session it records (contract §12,
//! issue 15): two sessions through one gateway at once, against two real Xvnc desktops, one
//! recorded onto a slow directory and one not; in the same interval the recorded session
//! receives about as many bytes as the other, and what the disk could not take is dropped and
//! counted (`vncgate_recording_dropped_total`), the recording marked incomplete.
//!
//! The slow disk is `tests/faults/slow_write.c`, preloaded into the gateway: writes to files
//! under the recording directory take 20 ms per 64 KiB (~3 MB/s), every other write is
//! untouched. A writer on the relay's path would hold the recorded session to those 3 MB/s,
//! a hundredth of what it gets otherwise; the comparison's bound (half) is far from both.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::rfb_client;
use common::xvnc::Xvnc;
use common::{BackendSpec, Gateway, GatewayConfig, Live, now, open_session as open};
use serde_json::json;
use tokio::time::Instant;

/// How long both sessions pull whole screens.
const INTERVAL: Duration = Duration::from_secs(3);

/// Build the slow-write shim into `dir` with the machine's C compiler.
fn build_shim(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults/slow_write.c");
    let so = dir.join("slow_write.so");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

fn token(sid: &str, backend: &str, record: bool) -> String {
    common::token_with_claims(&json!({
        "sub": "alice", "sid": sid, "exp": now() + 600, "backend": backend, "record": record,
    }))
}

/// Whole-screen updates pulled until `until`: the bytes of pixels received.
async fn pull_until(mut live: Live, until: Instant) -> u64 {
    let first = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("first update");
    let mut bytes = first.pixels * 4;
    while Instant::now() < until {
        let update = rfb_client::framebuffer_update(&mut live.ws, &mut live.session, false)
            .await
            .expect("update");
        bytes += update.pixels * 4;
    }
    bytes
}

#[tokio::test]
async fn a_slow_disk_costs_the_recorded_session_nothing_and_drops_are_counted() {
    let (a, b) = tokio::join!(
        Xvnc::builder().name("desk-a").start_async(),
        Xvnc::builder().name("desk-b").start_async()
    );
    let (a, b) = (a.expect("Xvnc a"), b.expect("Xvnc b"));
    let shim_dir = tempfile::tempdir().expect("tempdir");
    let shim = build_shim(shim_dir.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let recordings = dir.path().canonicalize().expect("canonical dir");
    let mut cfg = GatewayConfig::new(vec![
        BackendSpec::rfb("desk-a", a.rfb_addr()),
        BackendSpec::rfb("desk-b", b.rfb_addr()),
    ]);
    cfg.extra = format!(
        "recording:\n  dir: \"{}\"\n  when: claim\n",
        recordings.display()
    );
    cfg.env = vec![
        ("LD_PRELOAD".into(), shim.display().to_string()),
        ("SLOW_WRITE_DIR".into(), recordings.display().to_string()),
        ("SLOW_WRITE_US".into(), "20000".into()),
    ];
    let gw = Gateway::start(cfg).await;

    let recorded = open(&gw, &token("slow-recorded", "desk-a", true)).await;
    let plain = open(&gw, &token("slow-plain", "desk-b", false)).await;
    let until = Instant::now() + INTERVAL;
    let (recorded_bytes, plain_bytes) =
        tokio::join!(pull_until(recorded, until), pull_until(plain, until));
    let ratio = recorded_bytes as f64 / plain_bytes as f64;
    println!(
        "same {INTERVAL:?}: recorded {recorded_bytes} bytes, plain {plain_bytes} bytes (x{ratio:.2})"
    );
    assert!(
        ratio >= 0.5,
        "the recorded session got {recorded_bytes} bytes against {plain_bytes} unrecorded"
    );

    let ended = gw
        .wait_log(|v| v["event"] == "recording_ended" && v["session_id"] == "slow-recorded")
        .await;
    assert_eq!(ended["incomplete"], true, "{ended}");
    assert!(ended["dropped_bytes"].as_u64().unwrap_or(0) > 0, "{ended}");
    assert!(gw.metric("vncgate_recording_dropped_total").await > 0.0);
    // The file is what a player can use: the stream up to the gap, then nothing.
    let path = ended["path"].as_str().expect("path");
    let out = Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(["recording", "verify", path])
        .output()
        .expect("verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("incomplete: yes"), "{report}");
}
