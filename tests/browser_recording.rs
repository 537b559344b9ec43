//! Recording end to end in real headless Chromium (contract §12, issue 15): a real Xvnc desktop
//! with an xterm, driven through noVNC (the viewer page vncgate serves) by typing, is recorded
//! by the gateway (`recording: { when: claim, input: keys }`, a token with `record: true`); the
//! recording then plays in `web/playback.html` (admin listener, admin token typed in) at 16× to
//! its end, and its canvas equals the live canvas at the end of the session, pixel for pixel, in
//! the xterm's region. The `.jsonl` audit beside the FBS file has the session's start and end
//! and every typed key.
//!
//! The comparison is exact (an FNV-1a hash of the region's RGBA bytes, see `pageRegionHash` in
//! tests/browser/lib.mjs): both canvases are painted by the same noVNC from the same
//! server->client bytes, and the xterm's two-colour text is sent losslessly anyway.
//!
//! Every wait is for an event: a file the xterm writes, ink in the canvas, a gateway log line,
//! the playback page's own state.

mod common;

use common::ADMIN_TOKEN;
use common::browser::{
    Context, Desk, EXCLUSIVE, Gw, GwSpec, PAGE_WAIT_MS, POLL_EVERY, Rect, XTERM_BORDER,
    XTERM_COLUMNS, XTERM_ROWS, jwt, wait_desktop,
};
use serde_json::{Value, json};

const ROOT_HEX: &str = "#2f5f3f";
const SID: &str = "recorded-typing";
/// Lines typed into the xterm (lower case and spaces: one keysym per character, no Shift).
const LINES: [&str; 3] = [
    "recorded by vncgate",
    "played back in the browser",
    "the end",
];
/// X keysym of Return.
const XK_RETURN: u64 = 0xff0d;
/// Between keystrokes, as a person types: the 55 keystrokes make a session of about ten
/// seconds, so the recording has many updates over time, not one burst.
const KEYSTROKE_MS: u64 = 180;

#[tokio::test]
async fn a_typed_xterm_session_is_recorded_and_replays_to_the_same_pixels() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::with_xterm("recorded-desk", ROOT_HEX).await;
    let g = desk.grid();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())]);
    spec.extra = format!(
        "recording:\n  dir: \"{}\"\n  when: claim\n  input: keys\n",
        dir.path().display()
    );
    let gw = Gw::start("gw", spec).await;

    // ---- The live session: noVNC, typing into the xterm.
    let live_ctx = Context::new().await;
    let live = live_ctx.page("live").await;
    let token = jwt("alice", SID, json!({ "record": true }));
    live.goto(&gw.page_url(&format!("token={token}&delivery=protocol")))
        .await;
    live.connected().await;
    wait_desktop(&live, &desk, ROOT_HEX).await;
    let started = gw
        .wait_log(|v| v["event"] == "recording_started" && v["session_id"] == SID)
        .await;

    let mut typed = String::new();
    for line in LINES {
        live.type_paced(line, KEYSTROKE_MS).await;
        live.press("Enter").await;
        typed.push_str(line);
        typed.push('\n');
        desk.wait_typed(&typed).await;
    }
    // Every line's echo is on the canvas once its first and last cells have ink (the text
    // cursor is hidden, so nothing else in the xterm changes after that).
    let rects: Vec<Rect> = LINES
        .iter()
        .enumerate()
        .flat_map(|(row, line)| {
            let row = row as u32;
            [g.cell(row, 0), g.cell(row, line.len() as u32 - 1)]
        })
        .collect();
    live.call(
        "waitInk",
        json!({ "rects": rects, "timeoutMs": PAGE_WAIT_MS }),
    )
    .await;
    // The xterm's whole window: the 80x24 grid plus its internal border.
    let xterm = Rect {
        x: g.x,
        y: g.y,
        w: XTERM_COLUMNS * g.cell_w + 2 * XTERM_BORDER,
        h: XTERM_ROWS * g.cell_h + 2 * XTERM_BORDER,
    };
    let live_hash = live.region_hash(xterm).await;
    live.screenshot("recording_live").await;
    live.assert_clean_console(&[]).await;
    // Closing the page closes the session, which ends (and flushes) the recording.
    live_ctx.close().await;
    let ended = gw
        .wait_log(|v| v["event"] == "recording_ended" && v["session_id"] == SID)
        .await;
    assert_eq!(ended["incomplete"], false, "{ended}");
    let path = ended["path"].as_str().expect("path").to_owned();
    assert_eq!(started["path"], path.as_str());

    // ---- Playback: the recording, listed through the admin API, replayed at 16× to its end.
    let (status, listed) = gw
        .admin("GET", &format!("/admin/recordings?sid={SID}"), "")
        .await;
    assert_eq!(status, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).expect("json");
    let recordings = listed["recordings"].as_array().expect("recordings");
    assert_eq!(recordings.len(), 1, "{listed}");
    let id = recordings[0]["id"].as_str().expect("id").to_owned();

    let ctx = Context::new().await;
    let page = ctx.page("playback").await;
    page.goto(&format!(
        "http://127.0.0.1:{}/playback.html?sid={SID}&id={id}&speed=16",
        gw.admin_port
    ))
    .await;
    // The page's script has run (form enabled, token field focused) once it reports no replay.
    page.disconnected().await;
    page.type_text(ADMIN_TOKEN).await;
    page.press("Enter").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(PAGE_WAIT_MS);
    loop {
        let html = page.content().await["html"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if html.contains(r#"<output id="pb-state">ended</output>"#) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay did not end: {html}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    // At its end the replay has fed noVNC every recorded byte; a decode noVNC finishes
    // asynchronously may still be painting, so the region is read until it matches (bounded).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(PAGE_WAIT_MS);
    loop {
        let played = page.region_hash(xterm).await;
        if played == live_hash {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            page.screenshot("recording_playback").await;
            panic!(
                "the playback canvas differs from the live one in the xterm's region {xterm:?}: \
                 {played} != {live_hash} (screenshots: target/e2e/recording_live.png, \
                 target/e2e/recording_playback.png)"
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    page.screenshot("recording_playback").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;

    // ---- Export: the framebuffer at the recording's end, as a PNG, has the live pixels.
    let png = dir.path().join("end.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(["recording", "export", &path, "--at", "100000", "--png"])
        .arg(&png)
        .output()
        .expect("vncgate recording export");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "export failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("(the recording's end)"), "{stdout}");
    assert_eq!(png_region_hash(&png, xterm), live_hash, "{stdout}");

    // ---- The audit: the session's start and end, and every typed key, down then up.
    let audit = std::fs::read_to_string(path.replace(".fbs", ".jsonl")).expect("audit");
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for expected in ["session_started", "session_ended"] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    let keys: Vec<(bool, u64)> = events
        .iter()
        .filter(|e| e["event"] == "key")
        .map(|e| {
            (
                e["down"].as_bool().expect("down"),
                e["keysym"].as_u64().expect("keysym"),
            )
        })
        .collect();
    let want: Vec<(bool, u64)> = LINES
        .iter()
        .flat_map(|line| line.bytes().map(u64::from).chain([XK_RETURN]))
        .flat_map(|keysym| [(true, keysym), (false, keysym)])
        .collect();
    assert_eq!(keys, want, "the typed keys in the audit: {audit}");
    assert!(!audit.contains(&token), "no token in the audit");
    // noVNC's SetPixelFormat (32 bits, red in the low byte) is in the audit, from offset 0.
    let format = events
        .iter()
        .find(|e| e["event"] == "pixel_format")
        .expect("pixel_format line");
    assert_eq!(
        (
            &format["offset"],
            &format["bits_per_pixel"],
            &format["red_shift"]
        ),
        (&json!(0), &json!(32), &json!(0)),
        "{format}"
    );
}

/// The FNV-1a hash of a region's RGBA bytes, as `pageRegionHash` (tests/browser/lib.mjs)
/// computes it on a canvas.
fn png_region_hash(path: &std::path::Path, r: Rect) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut rgba = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut rgba).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgba);
    let width = info.width as usize;
    let mut hash: u32 = 0x811c_9dc5;
    for y in r.y as usize..(r.y + r.h) as usize {
        let row = &rgba[(y * width + r.x as usize) * 4..(y * width + (r.x + r.w) as usize) * 4];
        for &b in row {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    format!("{hash:08x}")
}
