//! Real noVNC (npm `@novnc/novnc`, pinned by package-lock) in real headless Chromium, through the
//! gateway, to a real Xvnc: the desktop's colour reaches the page's canvas. The page is the
//! viewer that `vncgate demo` serves, so this is also the demo's first impression.

mod common;

use std::path::Path;

use common::xvnc::Xvnc;
use common::{BackendSpec, Gateway, GatewayConfig, token};

fn run_canvas_check(url: &str, rgb: &str, screenshot: &Path) -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        Path::new(root).join("node_modules/@novnc/novnc").is_dir(),
        "node_modules missing: run `npm ci` (the README's test command does)"
    );
    let out = std::process::Command::new("node")
        .current_dir(root)
        .args([
            "tests/browser/canvas_color.mjs",
            "--url",
            url,
            "--expect-rgb",
            rgb,
            "--timeout-ms",
            "30000",
        ])
        .arg("--screenshot")
        .arg(screenshot)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("").to_owned();
    assert!(
        out.status.success(),
        "browser check failed: {line}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&line).expect("json result")
}

async fn desktop_and_gateway(name: &str, extra: &str) -> (Xvnc, Gateway) {
    let desktop = Xvnc::start_async(name, (800, 600)).await.expect("Xvnc");
    desktop.set_root_color("#3366cc").expect("xsetroot");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::rfb("xvnc", desktop.rfb_addr())]);
    cfg.web_root = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("web"));
    cfg.extra = extra.to_owned();
    let gw = Gateway::start(cfg).await;
    (desktop, gw)
}

fn screenshot_path(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e");
    std::fs::create_dir_all(&dir).expect("target/e2e");
    dir.join(format!("{name}.png"))
}

#[tokio::test]
async fn novnc_in_chromium_shows_the_desktop_colour() {
    let (_desktop, gw) = desktop_and_gateway("browser-desk", "").await;
    let url = format!(
        "http://127.0.0.1:{}/#token={}",
        gw.port,
        token("alice", Some("browser"))
    );
    let result = tokio::task::spawn_blocking(move || {
        run_canvas_check(&url, "51,102,204", &screenshot_path("canvas_query"))
    })
    .await
    .expect("join");
    eprintln!("noVNC via gateway: {result}");
    assert_eq!(result["ok"], true);
    let started = gw.wait_log(|v| v["event"] == "session_started").await;
    assert_eq!(started["session_id"], "browser");
}
