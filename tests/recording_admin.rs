//! The admin API's recordings (contract §7, §12): sessions recorded through a live gateway are
//! listed (all, or one session's) newest first, fetched byte for byte (the `.fbs` and its
//! `.jsonl` audit), and nothing outside `recording.dir` or not written by the recorder can be
//! named; every path needs the admin token; recording off is 404.

mod common;

use common::rfb_client;
use common::rfb_server::{Mode, RfbServer};
use common::{ADMIN_TOKEN, BackendSpec, Gateway, GatewayConfig, now, open_session as open};
use serde_json::{Value, json};

fn token(sub: &str, sid: &str) -> String {
    common::token_with_claims(
        &json!({ "sub": sub, "sid": sid, "exp": now() + 600, "record": true }),
    )
}

async fn recording_gateway(dir: Option<&std::path::Path>, desk: &RfbServer) -> Gateway {
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", desk)]);
    if let Some(dir) = dir {
        cfg.extra = format!("recording:\n  dir: \"{}\"\n  when: claim\n", dir.display());
    }
    Gateway::start(cfg).await
}

/// An HTTP/1.1 request on the admin listener, the body kept as bytes:
/// (status, lower-cased head, body).
async fn raw_get(gw: &Gateway, path: &str, auth: Option<&str>) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(token) = auth {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, head, buf[split + 4..].to_vec())
}

async fn admin_json(gw: &Gateway, path: &str) -> (u16, Value) {
    let (status, _, body) = raw_get(gw, path, Some(ADMIN_TOKEN)).await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, value)
}

/// Record one session of `sid`: open it, see the first update, close it, and wait until the
/// recording is closed. Returns the `.fbs` path from the `recording_ended` log line.
async fn record(gw: &Gateway, sid: &str) -> String {
    let mut live = open(gw, &token("alice", sid)).await;
    rfb_client::first_framebuffer_update(&mut live.ws, &mut live.session)
        .await
        .expect("update");
    drop(live);
    let ended = gw
        .wait_log(|v| v["event"] == "recording_ended" && v["session_id"] == sid)
        .await;
    assert_eq!(ended["incomplete"], false, "{ended}");
    ended["path"].as_str().expect("path").to_owned()
}

#[tokio::test]
async fn recordings_are_listed_and_fetched_through_the_admin_api() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "listed-desk".into(),
        width: 16,
        height: 8,
        rgb: [200, 100, 50],
    })
    .await
    .expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = recording_gateway(Some(dir.path()), &desk).await;

    // A sid with dots and a colon: the id must still parse back to exactly this session.
    let first = record(&gw, "desk.a:1").await;
    let second = record(&gw, "other").await;

    // One session's recordings (the sid percent-encoded, as a browser's URLSearchParams does).
    let (status, listed) = admin_json(&gw, "/admin/recordings?sid=desk.a%3A1").await;
    assert_eq!(status, 200, "{listed}");
    let recordings = listed["recordings"].as_array().expect("recordings");
    assert_eq!(recordings.len(), 1, "{listed}");
    let rec = &recordings[0];
    assert_eq!(rec["session_id"], "desk.a:1");
    assert_eq!(rec["incomplete"], false, "{rec}");
    let id = rec["id"].as_str().expect("id").to_owned();
    assert!(!id.contains('/') && !id.contains('%'), "{id}");
    let fbs_bytes = std::fs::read(&first).expect("fbs file");
    assert_eq!(rec["bytes"], fbs_bytes.len() as u64, "{rec}");
    assert_eq!(rec["fbs"], format!("/admin/recordings/{id}"));
    assert_eq!(rec["audit"], format!("/admin/recordings/{id}/audit"));
    let file_name = first.rsplit('/').next().expect("file name");
    let (ms, conn) = file_name
        .trim_end_matches(".fbs")
        .split_once('-')
        .expect("ms-conn");
    assert_eq!(rec["started_at_ms"].to_string(), ms);
    assert_eq!(rec["conn_id"].to_string(), conn);

    // All recordings, newest first.
    let (status, all) = admin_json(&gw, "/admin/recordings").await;
    assert_eq!(status, 200, "{all}");
    let sids: Vec<&str> = all["recordings"]
        .as_array()
        .expect("recordings")
        .iter()
        .filter_map(|r| r["session_id"].as_str())
        .collect();
    assert_eq!(sids, ["other", "desk.a:1"], "{all}");
    let (_, none) = admin_json(&gw, "/admin/recordings?sid=nobody").await;
    assert_eq!(none["recordings"], json!([]));
    let (status, bad) = admin_json(&gw, "/admin/recordings?sid=a%2Fb").await;
    assert_eq!(
        (status, bad["error"].as_str()),
        (400, Some("bad_session_id"))
    );

    // The file itself, byte for byte, and its audit.
    let (status, head, body) =
        raw_get(&gw, &format!("/admin/recordings/{id}"), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    assert_eq!(body, fbs_bytes);
    assert!(body.starts_with(b"FBS 001.000\n"));
    let (status, head, audit) = raw_get(
        &gw,
        &format!("/admin/recordings/{id}/audit"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: application/x-ndjson"),
        "{head}"
    );
    assert_eq!(
        audit,
        std::fs::read(first.replace(".fbs", ".jsonl")).expect("audit file")
    );
    let last: Value = serde_json::from_slice(
        audit
            .split(|b| *b == b'\n')
            .rev()
            .find(|l| !l.is_empty())
            .expect("a line"),
    )
    .expect("json line");
    assert_eq!(last["event"], "recording_ended");
    // The other recording is fetched by its own id.
    let other_id = all["recordings"][0]["id"].as_str().expect("id");
    let (status, _, other) = raw_get(
        &gw,
        &format!("/admin/recordings/{other_id}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(other, std::fs::read(&second).expect("second fbs"));

    // A file of many chunks arrives whole (it is streamed, not read into memory); one without
    // its audit's last line is listed as still recording (`incomplete: null`).
    let day = &id[..10];
    let bulk_dir = dir.path().join(day).join("bulk");
    std::fs::create_dir_all(&bulk_dir).expect("bulk dir");
    let bulk: Vec<u8> = (0..3_000_003u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(bulk_dir.join("1-9.fbs"), &bulk).expect("bulk file");
    let (status, head, body) = raw_get(
        &gw,
        &format!("/admin/recordings/{day}.bulk.1-9"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-length: 3000003"), "{head}");
    assert!(body == bulk, "{} bytes, not the file's", body.len());
    let (_, bulk_listed) = admin_json(&gw, "/admin/recordings?sid=bulk").await;
    assert_eq!(bulk_listed["recordings"][0]["incomplete"], Value::Null);
    assert_eq!(bulk_listed["recordings"][0]["bytes"], 3_000_003);

    // A file outside recording.dir that a traversal would reach, to be sure none does.
    std::fs::write(dir.path().join("secret.fbs"), b"secret").expect("secret");
    for path in [
        "/admin/recordings/..".to_owned(),
        "/admin/recordings/../../etc/passwd".to_owned(),
        "/admin/recordings/%2E%2E%2Fsecret".to_owned(),
        "/admin/recordings/..%2Fsecret".to_owned(),
        format!("/admin/recordings/{day}.~2E~2E.secret"),
        format!("/admin/recordings/{day}.~2E~2E~2F..~2Fsecret.1-1"),
        format!("/admin/recordings/{day}.%2E%2E.1-1"),
        format!("/admin/recordings/{id}%2F..%2F..%2Fsecret"),
        format!("/admin/recordings/{id}/../audit"),
        format!("/admin/recordings/{id}/audit/x"),
        format!("/admin/recordings/{id}.fbs"),
        "/admin/recordings/2000-01-01.nobody.1-1".to_owned(),
        "/admin/recordings/".to_owned(),
    ] {
        let (status, _, body) = raw_get(&gw, &path, Some(ADMIN_TOKEN)).await;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("not_found")),
            "{path}: {body}"
        );
    }

    // Every recordings path needs the admin token.
    for path in [
        "/admin/recordings".to_owned(),
        format!("/admin/recordings/{id}"),
        format!("/admin/recordings/{id}/audit"),
    ] {
        for auth in [None, Some("wrong-token")] {
            let (status, _, body) = raw_get(&gw, &path, auth).await;
            assert_eq!(status, 401, "{path} {auth:?}");
            assert!(!body.starts_with(b"FBS"), "{path}: the file leaked");
        }
    }
}

#[tokio::test]
async fn recording_off_answers_not_found() {
    let desk = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = recording_gateway(None, &desk).await;
    for path in [
        "/admin/recordings",
        "/admin/recordings/2026-12-02.x.1-1",
        "/admin/recordings/2026-12-02.x.1-1/audit",
    ] {
        let (status, body) = admin_json(&gw, path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("not_found")),
            "{path}: {body}"
        );
    }
}

/// The playback page is served by the admin listener (same origin as the API it calls) from
/// `web_root`: the page and what it imports, nothing else of the web root, no way out of it.
#[tokio::test]
async fn the_admin_listener_serves_the_playback_page_and_nothing_else() {
    let desk = RfbServer::start(Mode::Echo).await.expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &desk)]);
    cfg.web_root = Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web"));
    let gw = Gateway::start(cfg).await;
    for (path, want) in [
        ("/playback.html", "content-type: text/html"),
        ("/playback.js", "content-type: text/javascript"),
        ("/playback.css", "content-type: text/css"),
        ("/novnc/core/rfb.js", "content-type: text/javascript"),
    ] {
        // No token: a static page with no data in it, like the viewer on the public listener.
        let (status, head, body) = raw_get(&gw, path, None).await;
        assert_eq!(status, 200, "{path}: {head}");
        assert!(head.contains(want), "{path}: {head}");
        assert!(!body.is_empty(), "{path}");
    }
    for path in [
        "/index.html",
        "/viewer.js",
        "/novnc/%2E%2E/%2E%2E/Cargo.toml",
        "/novnc/../../Cargo.toml",
        "/novnc/core/nothing.js",
    ] {
        let (status, _, _) = raw_get(&gw, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 404, "{path}");
    }
    // No web_root: no page.
    let bare = recording_gateway(None, &desk).await;
    let (status, _, _) = raw_get(&bare, "/playback.html", None).await;
    assert_eq!(status, 404);
}
