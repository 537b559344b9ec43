//! A recording directory that stops taking data while a recorded session runs (contract §12,
//! issue 15): the recording ends with its `recording_ended` log line carrying the error, and
//! the session goes on, its updates arriving whole. Real faults from the real kernel: a tmpfs
//! that fills up (ENOSPC), and the session's directory removed under the open files (writes
//! into an unlinked file still succeed; the writer has to notice the path no longer names it).
//!
//! The desktop is a real Xvnc with its default settings; the client asks for Raw, so every
//! full update is 3 MiB (1024x768, 32 bits), more than the small tmpfs holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::rfb_client;
use common::xvnc::Xvnc;
use common::{BackendSpec, Gateway, GatewayConfig, now, open_session as open};
use serde_json::json;

const WIDTH: u16 = 1024;
const HEIGHT: u16 = 768;

fn token(sid: &str) -> String {
    common::token_with_claims(&json!({
        "sub": "alice", "sid": sid, "exp": now() + 600, "record": true,
    }))
}

async fn recording_gateway(dir: &Path, desk: &Xvnc) -> Gateway {
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("desk", desk.rfb_addr())]);
    cfg.extra = format!("recording:\n  dir: \"{}\"\n  when: claim\n", dir.display());
    Gateway::start(cfg).await
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped. Needs root (CI
/// and the test command run as root, as `scripts/install-deps` does).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The whole screen, requested and received in full: the session is alive and relaying.
async fn whole_screen(live: &mut common::Live) {
    let update = rfb_client::framebuffer_update(&mut live.ws, &mut live.session, false)
        .await
        .expect("a full update");
    assert_eq!(update.pixels, u64::from(WIDTH) * u64::from(HEIGHT));
}

#[tokio::test]
async fn a_full_disk_ends_the_recording_and_the_session_goes_on() {
    let desk = Xvnc::builder()
        .geometry((WIDTH, HEIGHT))
        .start_async()
        .await
        .expect("Xvnc");
    let disk = SmallDisk::mount("512k");
    let gw = recording_gateway(disk.path(), &desk).await;

    let mut live = open(&gw, &token("full-disk")).await;
    // The first full update (3 MiB) cannot fit on the 512 KiB disk.
    let first = rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("the first update, recorded or not");
    assert_eq!(first.pixels, u64::from(WIDTH) * u64::from(HEIGHT));
    let ended = gw
        .wait_log(|v| v["event"] == "recording_ended" && v["session_id"] == "full-disk")
        .await;
    assert_eq!(ended["reason"], "error", "{ended}");
    assert_eq!(ended["incomplete"], true, "{ended}");
    let error = ended["error"].as_str().unwrap_or_default();
    assert!(error.contains("No space left"), "{ended}");
    assert_eq!(ended["level"], "warn", "{ended}");

    // The session is untouched: more whole screens, then a clean close.
    whole_screen(&mut live).await;
    whole_screen(&mut live).await;
    assert_eq!(gw.metric("vncgate_recordings_active").await, 0.0);
    drop(live);
    let closed = gw
        .wait_log(|v| v["event"] == "session_ended" && v["session_id"] == "full-disk")
        .await;
    // Ended by the client (1000 or its TCP close), not by the gateway.
    assert!(
        closed["close_code"] == 1000 || closed["close_code"] == 1006,
        "{closed}"
    );
}

#[tokio::test]
async fn a_removed_directory_ends_the_recording_and_the_session_goes_on() {
    let desk = Xvnc::builder()
        .geometry((WIDTH, HEIGHT))
        .start_async()
        .await
        .expect("Xvnc");
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = recording_gateway(dir.path(), &desk).await;

    let mut live = open(&gw, &token("removed-dir")).await;
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("first update");
    let started = gw
        .wait_log(|v| v["event"] == "recording_started" && v["session_id"] == "removed-dir")
        .await;
    let fbs = PathBuf::from(started["path"].as_str().expect("path"));
    // The whole day directory goes (an operator's cleanup, another tool's retention).
    let day = fbs.parent().and_then(Path::parent).expect("day directory");
    std::fs::remove_dir_all(day).expect("remove the recording's directory");

    // The next update's data is written into a file no path names any more: noticed.
    whole_screen(&mut live).await;
    let ended = gw
        .wait_log(|v| v["event"] == "recording_ended" && v["session_id"] == "removed-dir")
        .await;
    assert_eq!(ended["reason"], "error", "{ended}");
    assert!(
        ended["error"]
            .as_str()
            .unwrap_or_default()
            .contains("removed"),
        "{ended}"
    );
    whole_screen(&mut live).await;
    assert_eq!(gw.metric("vncgate_recordings_active").await, 0.0);
}
