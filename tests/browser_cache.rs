//! Issue 16, "no stale code after an upgrade", in real headless Chromium: the viewer page is
//! loaded from a gateway whose `web_root` is a copy of `web/`, its entry module is changed on
//! disk (same mtime, as a reproducible release build leaves it), and a reload runs the new code
//! while every unchanged module is answered 304 (revalidated, not downloaded again).

mod common;

use std::path::Path;
use std::time::SystemTime;

use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, Gateway, GatewayConfig};
use serde_json::{Value, json};

/// Copies `from` into `to` with each file's mtime; a symlink (`web/novnc`, into node_modules)
/// becomes a symlink to the same target, absolute, so the copy serves the same modules.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            let target = std::fs::canonicalize(&src).expect("symlink target");
            std::os::unix::fs::symlink(target, &dst).expect("symlink");
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
            set_mtime(&dst, mtime(&src));
        }
    }
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime")
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
}

/// The `src` of the page's module script (the viewer's entry module).
fn entry_module(index_html: &str) -> String {
    let at = index_html
        .find("type=\"module\"")
        .expect("a module script in index.html");
    let tag_end = at + index_html[at..].find('>').expect("tag end");
    let tag_start = index_html[..at].rfind('<').expect("tag start");
    let tag = &index_html[tag_start..tag_end];
    let src = tag.split("src=\"").nth(1).expect("src=");
    src[..src.find('"').expect("quote")].to_owned()
}

#[tokio::test]
async fn a_changed_module_runs_after_reload_and_unchanged_ones_are_304() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let web = tempfile::tempdir().expect("tempdir");
    copy_tree(&root.join("web"), web.path());
    let entry =
        entry_module(&std::fs::read_to_string(web.path().join("index.html")).expect("index"));
    let entry_file = web.path().join(entry.trim_start_matches("./"));
    let old = mtime(&entry_file);
    let mut code = std::fs::read_to_string(&entry_file).expect("entry module");
    code.push_str("\nglobalThis.vncgateCacheTest = 'build-one';\n");
    std::fs::write(&entry_file, code).expect("marker");
    set_mtime(&entry_file, old);

    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.web_root = Some(web.path().to_owned());
    let gw = Gateway::start(cfg).await;

    let spec = json!({
        "url": format!("http://127.0.0.1:{}/", gw.port),
        "file": entry_file,
        "from": "'build-one'",
        "to": "'build-two'",
        "marker": "vncgateCacheTest",
        "timeoutMs": 30000,
    });
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .current_dir(root)
            .arg("tests/browser/cache_reload.mjs")
            .arg(spec.to_string())
            .output()
            .expect("run node (install Node.js 20+ and `npm ci`)")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let r: Value = serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "no result line: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["before"], "build-one", "{r}");
    assert_eq!(
        r["after"], "build-two",
        "the reload ran yesterday's module: {r}"
    );

    let reload = r["reload"].as_array().expect("responses");
    let status_of = |path: &str| {
        reload
            .iter()
            .find(|x| x["path"] == path)
            .map(|x| x["status"].as_u64().unwrap_or(0))
    };
    let entry_path = format!("/{}", entry.trim_start_matches("./"));
    assert_eq!(status_of(&entry_path), Some(200), "changed module: {r}");
    let unchanged: Vec<&Value> = reload
        .iter()
        .filter(|x| x["path"] != entry_path.as_str())
        .filter(|x| x["path"].as_str().is_some_and(|p| p.ends_with(".js")))
        .collect();
    assert!(
        unchanged.len() >= 5,
        "the viewer's unchanged modules were not requested again: {r}"
    );
    for module in &unchanged {
        assert_eq!(module["status"], 304, "not revalidated: {module} in {r}");
    }
    let not_modified = reload.iter().filter(|x| x["status"] == 304).count();
    eprintln!(
        "viewer reload: {} responses, {not_modified} of them 304; document {}",
        reload.len(),
        r["documentStatus"]
    );
}
