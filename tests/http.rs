//! Everything on the listeners that is not a WebSocket session: static files (content types, no
//! traversal, no listing), `/healthz`, and the admin listener's `/healthz`, `/readyz`, `/metrics`
//! and bearer-protected `/admin/*`; plus the JSON log format.

mod common;

use common::rfb_server::{Mode, RfbServer};
use common::{ADMIN_TOKEN, BackendSpec, Gateway, GatewayConfig, http_get};
use rstest::rstest;

async fn gateway_with_web_root() -> (RfbServer, Gateway, tempfile::TempDir) {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        root.path().join("index.html"),
        "<!doctype html><title>v</title>",
    )
    .expect("index");
    std::fs::write(root.path().join("app.js"), "export const x = 1;").expect("js");
    std::fs::write(root.path().join("style.css"), "body{}").expect("css");
    std::fs::create_dir(root.path().join("empty")).expect("dir");
    std::fs::write(root.path().join("empty/notes.txt"), "n").expect("txt");
    // A secret outside the root that traversal attempts aim at.
    std::fs::write(
        root.path()
            .parent()
            .expect("parent")
            .join("vncgate-secret.txt"),
        "secret",
    )
    .ok();
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &backend)]);
    cfg.web_root = Some(root.path().to_owned());
    let gw = Gateway::start(cfg).await;
    (backend, gw, root)
}

/// Raw GET returning the status line's code, the Content-Type, and the body.
async fn get(port: u16, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[rstest]
#[case::index("/", 200, "text/html")]
#[case::html("/index.html", 200, "text/html")]
#[case::module("/app.js", 200, "text/javascript")]
#[case::css("/style.css", 200, "text/css")]
#[case::missing("/nope.js", 404, "application/json")]
#[case::no_listing("/empty/", 404, "application/json")]
#[case::dotdot("/../vncgate-secret.txt", 404, "application/json")]
#[case::encoded_dotdot("/%2e%2e/vncgate-secret.txt", 404, "application/json")]
#[case::encoded_slash("/empty%2f..%2f..%2fvncgate-secret.txt", 404, "application/json")]
#[tokio::test]
async fn static_files(#[case] path: &str, #[case] status: u16, #[case] content_type: &str) {
    let (_backend, gw, _root) = gateway_with_web_root().await;
    let (got_status, got_type, body) = get(gw.port, path).await;
    assert_eq!(got_status, status, "{path}: {body}");
    assert!(
        got_type.starts_with(content_type),
        "{path}: content-type {got_type}"
    );
    assert!(!body.contains("secret"), "{path} escaped the web root");
}

/// One request on a fresh connection: (status, response headers with lower-case names, body).
async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, std::collections::HashMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let fields = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, fields, body.to_owned())
}

/// Issue 16: web_root files carry validators and `Cache-Control: no-cache`, a conditional GET
/// is answered 304 without a body while the file is unchanged and 200 once it changed on disk,
/// even when the new file has the old one's size and mtime (a copy made with `cp -p`).
#[tokio::test]
async fn web_root_files_are_revalidated_with_etags() {
    let (_backend, gw, root) = gateway_with_web_root().await;
    std::fs::write(root.path().join("playback.html"), "<!doctype html>p").expect("playback");

    let (status, first, body) = request(gw.port, "GET", "/app.js", &[]).await;
    assert_eq!((status, body.as_str()), (200, "export const x = 1;"));
    let etag = first.get("etag").expect("an ETag").clone();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong tag: {etag}"
    );
    assert_eq!(first["cache-control"], "no-cache");
    let last_modified = first.get("last-modified").expect("Last-Modified").clone();
    let (_, index, _) = request(gw.port, "GET", "/", &[]).await;
    assert_eq!(
        index["cache-control"], "no-cache",
        "HTML is revalidated on every load"
    );
    assert!(index.contains_key("etag"));

    // Unchanged: 304, no body, the same validators and caching.
    for condition in [
        ("If-None-Match", etag.as_str()),
        ("If-Modified-Since", &last_modified),
    ] {
        let (status, h, body) = request(gw.port, "GET", "/app.js", &[condition]).await;
        assert_eq!(status, 304, "{condition:?}");
        assert!(body.is_empty(), "a 304 has no body: {body:?}");
        assert_eq!(h["etag"], etag);
        assert_eq!(h["cache-control"], "no-cache");
    }
    let weak_list = format!("\"other\", W/{etag}");
    assert_eq!(
        request(gw.port, "GET", "/app.js", &[("If-None-Match", &weak_list)])
            .await
            .0,
        304
    );
    let (status, h, body) = request(gw.port, "HEAD", "/app.js", &[]).await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(
        (h["etag"].as_str(), h["content-length"].as_str()),
        (etag.as_str(), "19")
    );

    // Changed on disk, same size, mtime put back: the tag follows the content. If-None-Match
    // wins over an If-Modified-Since that alone would have said 304.
    let file = root.path().join("app.js");
    let mtime = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(&file, "export const x = 2;").expect("rewrite");
    std::fs::File::options()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    let (status, h, body) = request(
        gw.port,
        "GET",
        "/app.js",
        &[
            ("If-None-Match", &etag),
            ("If-Modified-Since", &last_modified),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "export const x = 2;"));
    assert_ne!(h["etag"], etag);

    // The admin listener's playback page is served the same way.
    let (status, h, _) = request(gw.admin_port, "GET", "/playback.html", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(h["cache-control"], "no-cache");
    let (status, _, body) = request(
        gw.admin_port,
        "GET",
        "/playback.html",
        &[("If-None-Match", &h["etag"])],
    )
    .await;
    assert_eq!((status, body.as_str()), (304, ""));
}

#[tokio::test]
async fn health_readiness_metrics_and_admin_auth() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;

    assert_eq!(http_get(gw.port, "/healthz", &[]).await.0, 200);
    let (status, body) = gw.admin_get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let (status, body) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        ready,
        serde_json::json!({"status": "ready", "store": "ok", "backends": {"healthy": 1, "total": 1}, "draining": false})
    );

    // Every contract metric exists from the start, even at zero.
    let (status, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "vncgate_build_info{version=",
        "vncgate_upgrades_total{result=\"ok\"} 0",
        "vncgate_upgrades_total{result=\"token_expired\"} 0",
        "vncgate_upgrade_duration_seconds_bucket{le=\"0.001\"} 0",
        "vncgate_sessions_active{pool=\"default\"} 0",
        "vncgate_session_duration_seconds_count{pool=\"default\"} 0",
        "vncgate_disconnects_total{code=\"1000\"} 0",
        "vncgate_disconnects_total{code=\"4008\"} 0",
        "vncgate_relay_bytes_total{direction=\"client_to_backend\"} 0",
        "vncgate_backpressure_wait_seconds_total{direction=\"backend_to_client\"} 0",
        "vncgate_backend_up{backend=\"desk\",pool=\"default\"} 1",
        "vncgate_backend_sessions{backend=\"desk\",pool=\"default\"} 0",
        "vncgate_backend_connect_duration_seconds_count{pool=\"default\"} 0",
        "vncgate_store_up 1",
        "vncgate_store_errors_total{op=\"claim\"} 0",
        "vncgate_store_op_duration_seconds_count{op=\"get\"} 0",
        "vncgate_auth_failures_total{reason=\"token_signature\"} 0",
    ] {
        assert!(metrics.contains(series), "missing {series}");
    }

    // /admin/* needs the admin bearer token.
    let (status, body) = gw.admin_get("/admin/sessions").await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_get(
        gw.admin_port,
        "/admin/sessions",
        &[("Authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(status, 401);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, body) = http_get(
        gw.admin_port,
        "/admin/sessions",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"sessions":[]}"#);
}

#[tokio::test]
async fn log_lines_are_one_json_object_each_with_the_contract_fields() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let (status, _) = http_get(gw.port, &format!("/websockify?token={jwt}&x=1"), &[]).await;
    assert_eq!(status, 400, "a plain GET is not an upgrade");
    let rejected = gw.wait_log(|v| v["event"] == "upgrade_rejected").await;
    assert_eq!(rejected["code"], "bad_upgrade");
    assert_eq!(rejected["level"], "info");
    assert!(rejected["conn_id"].is_u64());
    assert_eq!(
        rejected["client_addr"]
            .as_str()
            .map(|a| a.starts_with("127.0.0.1:")),
        Some(true)
    );
    assert_eq!(rejected["path"], "/websockify?token=REDACTED&x=1");
    for line in gw.raw_logs() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        let ts = v["timestamp"]
            .as_str()
            .unwrap_or_else(|| panic!("no timestamp: {line}"));
        assert!(
            ts.ends_with('Z') && ts.contains('T'),
            "not RFC 3339 UTC: {ts}"
        );
        assert!(
            v["level"].is_string() && v["event"].is_string() && v["message"].is_string(),
            "{line}"
        );
        assert!(!line.contains(jwt), "token in a log line: {line}");
    }
}

/// Admin paths that are their own prefix and suffix (`/admin/backends/drain`) once panicked the
/// handler, which dropped the connection without an answer.
#[tokio::test]
async fn admin_paths_without_a_name_are_404_not_a_dropped_connection() {
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    for (method, path, body) in [
        ("POST", "/admin/backends/drain", ""),
        ("DELETE", "/admin/backends/drain", ""),
        ("PUT", "/admin/sessions/input", r#"{"mode":"view_only"}"#),
        ("DELETE", "/admin/sessions/", ""),
    ] {
        let (status, answer) = gw.admin(method, path, body).await;
        assert_eq!(status, 404, "{method} {path}: {answer}");
        assert!(answer.contains("not_found"), "{answer}");
    }
    // The handler is still there.
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
}

/// A 64 KiB token in the query string makes a URI longer than `http::Uri` takes, so Pingora
/// cannot parse the head at all: the client still gets a status and a code, not a closed
/// connection.
#[tokio::test]
async fn an_oversized_query_gets_400_not_a_closed_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = RfbServer::start(Mode::Echo).await.expect("fixture");
    let gw = Gateway::start(GatewayConfig::new(vec![BackendSpec::fixture(
        "desk", &backend,
    )]))
    .await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let request = format!(
        "GET /websockify?token={} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains(r#""error":"bad_upgrade""#), "{answer}");
}
