//! `GET /vncgate/events` (contract §14, issue 16) over real sockets: the initial snapshot, a
//! viewer joining, the admin input-mode switch, the refusals of an upgrade (token, Origin,
//! owner/share) and the per-user bound, and the stream's end at token expiry and revocation.

mod common;

use common::rfb_server::{Mode, RfbServer};
use common::{BackendSpec, EVENT_TIMEOUT, Gateway, GatewayConfig, now, token_with_claims};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const ORIGIN: &str = "https://app.example";
/// The gateway's own origin as the stream requests below name it (`Host: 127.0.0.1`).
const SAME_ORIGIN: &str = "http://127.0.0.1";

async fn gateway() -> (RfbServer, Gateway) {
    gateway_with("", "").await
}

/// `pool_extra`: YAML keys of the default pool, indented by 4 spaces; `extra`: top-level YAML.
async fn gateway_with(pool_extra: &str, extra: &str) -> (RfbServer, Gateway) {
    let desk = RfbServer::start(Mode::Rfb {
        name: "events-desk".into(),
        width: 16,
        height: 16,
        rgb: [1, 2, 3],
    })
    .await
    .expect("fixture");
    let mut cfg = GatewayConfig::new(vec![BackendSpec::fixture("desk", &desk)]);
    cfg.pool_extra = pool_extra.to_owned();
    cfg.extra = extra.to_owned();
    // No leeway: a token's stream ends at its `exp`, which the expiry test waits for.
    cfg.auth.push_str(&format!(
        "  leeway_seconds: 0\n  allowed_origins: [\"{ORIGIN}\", \"{SAME_ORIGIN}\"]\n"
    ));
    (desk, Gateway::start(cfg).await)
}

fn jwt(sub: &str, sid: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    token_with_claims(&claims)
}

async fn open(gw: &Gateway, token: &str) -> common::Live {
    let mut c = common::rfb_client::WsConnect::new(gw.ws_url(&format!("?token={token}")));
    c.headers.push(("Origin".into(), ORIGIN.into()));
    common::open_with(c).await
}

/// One `text/event-stream` response read off a raw socket (chunked, as the gateway sends it).
struct Stream {
    reader: BufReader<TcpStream>,
    text: String,
}

/// GET the events path; the stream, or the refusal's status and JSON body.
async fn events(
    gw: &Gateway,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Stream, (u16, Value)> {
    let mut tcp = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let mut req = format!("GET /vncgate/events{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut reader = BufReader::new(tcp);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("head");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push(line.trim_end().to_owned());
    }
    let status: u16 = head[0]
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let field = |name: &str| {
        head.iter().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    if status != 200 {
        let mut body = Vec::new();
        reader.read_to_end(&mut body).await.expect("body");
        return Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
    }
    assert_eq!(
        field("content-type").as_deref(),
        Some("text/event-stream; charset=utf-8")
    );
    assert!(field("access-control-allow-origin").is_some(), "{head:?}");
    assert_eq!(field("cache-control").as_deref(), Some("no-store"));
    Ok(Stream {
        reader,
        text: String::new(),
    })
}

impl Stream {
    /// The next event (name, data), `None` once the response ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        tokio::time::timeout(EVENT_TIMEOUT, self.next_inner())
            .await
            .expect("an event within the timeout")
    }

    async fn next_inner(&mut self) -> Option<(String, Value)> {
        loop {
            while let Some(at) = self.text.find("\n\n") {
                let block: String = self.text.drain(..at + 2).collect();
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("JSON data"));
                    }
                }
                if let (Some(name), Some(data)) = (name, data) {
                    return Some((name, data));
                }
            }
            // One chunk: its size line, its bytes, CRLF; size 0 ends the body.
            let mut size = String::new();
            if self.reader.read_line(&mut size).await.ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await.ok()?;
            chunk.truncate(size);
            self.text
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// Skips events until one named `name` whose data satisfies `pred`.
    async fn until(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next().await {
                Some((n, data)) if n == name && pred(&data) => return data,
                Some(_) => {}
                None => panic!("the stream ended before a matching {name} event"),
            }
        }
    }
}

fn query(token: &str) -> String {
    format!("?token={token}")
}

const FROM_APP: &[(&str, &str)] = &[("Origin", ORIGIN)];

#[tokio::test]
async fn a_stream_shows_the_snapshot_a_joining_viewer_and_the_input_switch() {
    let (_desk, gw) = gateway().await;
    let _alice = open(&gw, &jwt("alice", "desk", json!({}))).await;
    let mut s = events(&gw, &query(&jwt("alice", "desk", json!({}))), FROM_APP)
        .await
        .expect("stream");
    let (name, viewers) = s.next().await.expect("viewers");
    assert_eq!(name, "viewers");
    assert_eq!(viewers["count"], 1);
    let me = &viewers["connections"][0];
    assert_eq!(
        (&me["user"], &me["role"], &me["can_type"]),
        (&json!("alice"), &json!("owner"), &json!(true))
    );
    assert_eq!(
        s.next().await,
        Some(("input_mode".into(), json!({"mode": "interactive"})))
    );
    assert_eq!(
        s.next().await,
        Some(("backend".into(), json!({"state": "up"})))
    );
    assert_eq!(
        s.next().await,
        Some(("recording".into(), json!({"state": "off"})))
    );

    let bob = open(&gw, &jwt("bob", "desk", json!({ "share": "view" }))).await;
    let viewers = s.until("viewers", |v| v["count"] == 2).await;
    let bob_seen = viewers["connections"]
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["user"] == "bob")
        .cloned()
        .expect("bob listed");
    assert_eq!(
        (&bob_seen["role"], &bob_seen["can_type"]),
        (&json!("view"), &json!(false))
    );

    let (status, body) = gw
        .admin(
            "PUT",
            "/admin/sessions/desk/input",
            r#"{"mode":"view_only","user":"alice"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mode = s.until("input_mode", |_| true).await;
    assert_eq!(mode, json!({"mode": "view_only"}));

    drop(bob);
    s.until("viewers", |v| v["count"] == 1).await;
    assert_eq!(gw.metric("vncgate_event_streams").await, 1.0);
}

#[tokio::test]
async fn refusals_are_the_upgrades_and_streams_are_bounded_per_user() {
    let (_desk, gw) = gateway().await;
    let refused = |r: Result<Stream, (u16, Value)>| match r {
        Ok(_) => panic!("a stream was opened"),
        Err((status, body)) => (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        ),
    };
    let alice = jwt("alice", "desk", json!({}));
    assert_eq!(
        refused(events(&gw, "", FROM_APP).await),
        (401, "token_missing".into())
    );
    assert_eq!(
        refused(events(&gw, "?token=not.a.jwt", FROM_APP).await),
        (401, "token_malformed".into())
    );
    let evil = [("Origin", "https://evil.example")];
    assert_eq!(
        refused(events(&gw, &query(&alice), &evil).await),
        (403, "origin_denied".into())
    );
    // A request without an Origin is no browser page: only an empty allowlist lets it in.
    assert_eq!(
        refused(events(&gw, &query(&alice), &[]).await),
        (403, "origin_denied".into())
    );
    // A browser's same-origin GET has no Origin: `Sec-Fetch-Site` stands for the page's own.
    let same = [("Sec-Fetch-Site", "same-origin")];
    let _same_origin = events(&gw, &query(&alice), &same)
        .await
        .expect("same-origin page");
    let cross = [("Sec-Fetch-Site", "cross-site")];
    assert_eq!(
        refused(events(&gw, &query(&alice), &cross).await),
        (403, "origin_denied".into())
    );
    // The cookie is a token source too.
    let cookie = format!("vncgate_token={alice}");
    let _by_cookie = events(&gw, "", &[("Origin", ORIGIN), ("Cookie", &cookie)])
        .await
        .expect("a stream with the cookie's token");

    let _alice = open(&gw, &alice).await;
    assert_eq!(
        refused(events(&gw, &query(&jwt("mallory", "desk", json!({}))), FROM_APP).await),
        (403, "session_owned_by_other_user".into())
    );
    assert_eq!(
        refused(
            events(
                &gw,
                &query(&jwt("bob", "nobody", json!({ "share": "view" }))),
                FROM_APP
            )
            .await
        ),
        (404, "not_found".into())
    );

    let carol = jwt("carol", "c", json!({}));
    let mut open_streams = Vec::new();
    for _ in 0..16 {
        open_streams.push(
            events(&gw, &query(&carol), FROM_APP)
                .await
                .expect("within the bound"),
        );
    }
    assert_eq!(
        refused(events(&gw, &query(&carol), FROM_APP).await),
        (429, "too_many_sessions".into())
    );
    // A client that goes away frees its slot without waiting for a heartbeat.
    let before = gw.metric("vncgate_event_streams").await;
    drop(open_streams.pop());
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while gw.metric("vncgate_event_streams").await != before - 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed stream's slot was not freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _again = events(&gw, &query(&carol), FROM_APP)
        .await
        .expect("the freed slot");
}

#[tokio::test]
async fn the_stream_warns_then_ends_when_its_token_expires() {
    let (_desk, gw) = gateway().await;
    let token = token_with_claims(&json!({ "sub": "alice", "sid": "short", "exp": now() + 3 }));
    let mut s = events(&gw, &query(&token), FROM_APP).await.expect("stream");
    let expiring = s.until("expiring", |_| true).await;
    let left = expiring["seconds"].as_u64().expect("seconds");
    assert!(left <= 3, "{expiring}");
    let end = s.until("end", |_| true).await;
    assert_eq!(end, json!({"reason": "token_expired"}));
    assert_eq!(s.next().await, None, "the response ends after `end`");
}

#[tokio::test]
async fn revoking_the_token_ends_its_stream() {
    let (_desk, gw) = gateway().await;
    let token = jwt("alice", "rev", json!({ "jti": "rev-1" }));
    let other = jwt("alice", "rev", json!({ "jti": "rev-2" }));
    let mut s = events(&gw, &query(&token), FROM_APP).await.expect("stream");
    let mut kept = events(&gw, &query(&other), FROM_APP).await.expect("stream");
    s.until("recording", |_| true).await;
    kept.until("recording", |_| true).await;
    let (status, body) = gw
        .admin("POST", "/admin/revoke", r#"{"jti":"rev-1"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    let end = s.until("end", |_| true).await;
    assert_eq!(end, json!({"reason": "token_revoked"}));
    assert_eq!(s.next().await, None);
    let refused = events(&gw, &query(&token), FROM_APP).await.err();
    assert_eq!(
        refused.map(|(s, b)| (s, b["error"].clone())),
        Some((403, json!("token_revoked")))
    );
    // The other token's stream goes on: a new viewer still shows up on it.
    let _alice = open(&gw, &other).await;
    kept.until("viewers", |v| v["count"] == 1).await;
}

#[tokio::test]
async fn a_backend_that_goes_down_is_shown_lost() {
    let (desk, gw) = gateway_with("    health_check_interval_seconds: 1\n", "").await;
    let alice = jwt("alice", "fragile", json!({}));
    let _live = open(&gw, &alice).await;
    let mut s = events(&gw, &query(&alice), FROM_APP).await.expect("stream");
    assert_eq!(s.until("backend", |_| true).await, json!({"state": "up"}));
    // The health checks (every second, down after two failures) find the backend gone.
    drop(desk);
    assert_eq!(s.until("backend", |_| true).await, json!({"state": "lost"}));
}

#[tokio::test]
async fn a_recorded_connection_turns_recording_on_and_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recording = format!(
        "recording:\n  dir: \"{}\"\n  when: claim\n",
        dir.path().display()
    );
    let (_desk, gw) = gateway_with("", &recording).await;
    let watcher = jwt("alice", "rec", json!({}));
    let _plain = open(&gw, &watcher).await;
    let mut s = events(&gw, &query(&watcher), FROM_APP)
        .await
        .expect("stream");
    assert_eq!(
        s.until("recording", |_| true).await,
        json!({"state": "off"})
    );
    let recorded = open(&gw, &jwt("alice", "rec", json!({ "record": true }))).await;
    assert_eq!(s.until("recording", |_| true).await, json!({"state": "on"}));
    drop(recorded);
    assert_eq!(
        s.until("recording", |_| true).await,
        json!({"state": "off"})
    );
}

/// An OPTIONS request to the events path: the status and the response's header lines.
async fn preflight(gw: &Gateway, origin: &str, headers: &str) -> (u16, Vec<String>) {
    let mut tcp = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let req = format!(
        "OPTIONS /vncgate/events HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: {headers}\r\n\
         Connection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut text = String::new();
    BufReader::new(tcp)
        .read_to_string(&mut text)
        .await
        .expect("read");
    let mut lines = text.lines().map(str::to_ascii_lowercase);
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1).and_then(|s| s.parse().ok()))
        .expect("status");
    (status, lines.take_while(|l| !l.is_empty()).collect())
}

#[tokio::test]
async fn a_cross_origin_page_may_send_its_token_in_the_authorization_header() {
    let (_desk, gw) = gateway().await;
    // The browser's preflight for `fetch(url, {headers: {Authorization}})` from the app.
    let (status, head) = preflight(&gw, ORIGIN, "authorization").await;
    assert_eq!(status, 204, "{head:?}");
    let want = [
        format!(
            "access-control-allow-origin: {}",
            ORIGIN.to_ascii_lowercase()
        ),
        "access-control-allow-credentials: true".into(),
        "access-control-allow-methods: get".into(),
        "access-control-allow-headers: authorization".into(),
    ];
    for line in &want {
        assert!(head.contains(line), "{line} missing: {head:?}");
    }
    // An origin off the allowlist, or a header beyond the token's, is refused.
    assert_eq!(
        preflight(&gw, "https://evil.example", "authorization")
            .await
            .0,
        403
    );
    assert_eq!(
        preflight(&gw, ORIGIN, "authorization, x-other").await.0,
        403
    );
    // Then the GET itself, with the token in the header.
    let token = jwt("alice", "cors", json!({}));
    let bearer = format!("Bearer {token}");
    let mut stream = events(&gw, "", &[("Origin", ORIGIN), ("Authorization", &bearer)])
        .await
        .expect("stream");
    stream.until("input_mode", |_| true).await;
}
