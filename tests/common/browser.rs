//! The browser-test harness shared by `tests/browser_scenarios.rs` and
//! `tests/browser_rfb_edge.rs`: real noVNC (the viewer page vncgate serves) in real headless
//! Chromium, over wss:// with a certificate the test process makes (and Chromium trusts by its
//! key, no blanket "ignore certificate errors"), to real VNC desktops.
//!
//! - The browser: one Chromium per test process (`tests/browser/driver.mjs`, spoken to over
//!   stdin/stdout), one [`Context`] per user, [`Page`]s whose every wait polls per animation
//!   frame inside the page.
//! - The gateway: [`Gw`], the real binary started from a typed [`GwSpec`] on ports the test
//!   picks, so the page's Origin is on `auth.allowed_origins` from the start and a restart
//!   reuses the ports.
//! - Desktops: [`Desk`], a real Xvnc, optionally with an xterm whose typed lines land in a file.
//! - Waiting outside the browser: [`poll`] (a file, the X pointer, a log file), bounded.
//!
//! Each test binary that mounts this module gets its own driver process and its own
//! [`EXCLUSIVE`] lock (statics are per binary).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{RwLock, oneshot};

use super::log_tail::LogTail;
use super::redis_server::RedisServer;
use super::rfb_client::{self, WsConnect};
use super::xvnc::Xvnc;
use super::{
    ADMIN_TOKEN, EVENT_TIMEOUT, RfbSpec, free_port, http_get, http_request, now,
    spawn_vncgate_with_env, token_with_claims,
};

/// How long the page-side waits may take (a guard against a hung test, not a timing assertion).
pub const PAGE_WAIT_MS: u64 = 30_000;
/// Condition polls outside the browser (a file's content, the X pointer): how often to look.
pub const POLL_EVERY: Duration = Duration::from_millis(10);
/// Desktop size of every Xvnc here; the page's viewport is 1024x768, so noVNC scales it up.
pub const GEOMETRY: (u16, u16) = (800, 600);
/// Framebuffer points on the root window, outside the xterm (which sits at +0+0, 484x316).
pub const ROOT_POINTS: [[u32; 2]; 4] = [[600, 400], [700, 500], [550, 560], [760, 100]];

/// The latency test takes this exclusively so its numbers are not measured while other
/// scenarios load the two cores; every other test holds it shared.
pub static EXCLUSIVE: RwLock<()> = RwLock::const_new(());

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------
// The browser: one driver process per test process.

/// Requests waiting for their answer, by id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

struct Driver {
    stdin: Mutex<ChildStdin>,
    pending: Pending,
    dead: Arc<AtomicBool>,
    next: AtomicU64,
    stderr: Arc<Mutex<Vec<String>>>,
    _child: Mutex<std::process::Child>,
}

fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(Driver::start)
}

impl Driver {
    /// Starts `node tests/browser/driver.mjs` and waits for its ready line (Chromium launched).
    /// Missing Node, node_modules or Chromium is a failure with a message, never a skip.
    fn start() -> Driver {
        for dir in ["node_modules/playwright-core", "node_modules/@novnc/novnc"] {
            assert!(
                root().join(dir).is_dir(),
                "{dir} is missing: run `npm ci` at the repository root (scripts/install-deps does)"
            );
        }
        assert!(
            Path::new("/usr/bin/chromium").is_file() || std::env::var_os("CHROMIUM_PATH").is_some(),
            "/usr/bin/chromium is missing: run scripts/install-deps (or set CHROMIUM_PATH)"
        );
        let mut child = Command::new("node")
            .current_dir(root())
            .arg("tests/browser/driver.mjs")
            .env("VNCGATE_TRUST_SPKI", &tls().spki_sha256)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `node` ({e}): install Node.js 20+"));
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let stderr = Arc::clone(&stderr);
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if std::env::var_os("VNCGATE_TEST_ECHO").is_some() {
                        eprintln!("[driver] {line}");
                    }
                    stderr.lock().expect("stderr").push(line);
                }
            });
        }
        let mut ready = String::new();
        stdout.read_line(&mut ready).expect("driver stdout");
        let v: Value = serde_json::from_str(&ready).unwrap_or(Value::Null);
        assert_eq!(
            v["ready"],
            true,
            "the browser driver did not start: {ready}\n{}",
            stderr.lock().expect("stderr").join("\n")
        );
        let pending: Pending = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        {
            let (pending, dead) = (Arc::clone(&pending), Arc::clone(&dead));
            std::thread::spawn(move || {
                for line in stdout.lines().map_while(Result::ok) {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let Some(id) = v["id"].as_u64() else { continue };
                    let answer = if v["ok"] == true {
                        Ok(v["result"].clone())
                    } else {
                        Err(v["error"].as_str().unwrap_or("unknown error").to_owned())
                    };
                    if let Some(tx) = pending.lock().expect("pending").remove(&id) {
                        let _ = tx.send(answer);
                    }
                }
                // EOF: the driver is gone; whoever waits gets an error (senders dropped).
                dead.store(true, Ordering::SeqCst);
                pending.lock().expect("pending").clear();
            });
        }
        Driver {
            stdin: Mutex::new(stdin),
            pending,
            dead,
            next: AtomicU64::new(1),
            stderr,
            _child: Mutex::new(child),
        }
    }

    async fn call(&self, cmd: &str, args: Value) -> Result<Value, String> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        if self.dead.load(Ordering::SeqCst) {
            return Err(self.died());
        }
        self.pending.lock().expect("pending").insert(id, tx);
        let line = json!({ "id": id, "cmd": cmd, "args": args }).to_string();
        {
            let mut w = self.stdin.lock().expect("stdin");
            if writeln!(w, "{line}").and_then(|_| w.flush()).is_err() {
                return Err(self.died());
            }
        }
        match tokio::time::timeout(EVENT_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(self.died()),
            Err(_) => Err(format!(
                "the driver did not answer `{cmd}` in {EVENT_TIMEOUT:?}"
            )),
        }
    }

    fn died(&self) -> String {
        format!(
            "the browser driver exited; its stderr:\n{}",
            self.stderr.lock().expect("stderr").join("\n")
        )
    }
}

/// One browser context (cookies, storage, focus of its own): one user.
pub struct Context {
    id: u64,
}

impl Context {
    pub async fn new() -> Context {
        let r = driver()
            .call("newContext", json!({ "ignoreHTTPSErrors": false }))
            .await
            .expect("newContext");
        Context {
            id: r["ctx"].as_u64().expect("ctx id"),
        }
    }

    pub async fn page(&self, name: &str) -> Page {
        let r = driver()
            .call("newPage", json!({ "ctx": self.id, "name": name }))
            .await
            .expect("newPage");
        Page {
            id: r["page"].as_u64().expect("page id"),
            name: name.to_owned(),
        }
    }

    pub async fn close(self) {
        driver()
            .call("closeContext", json!({ "ctx": self.id }))
            .await
            .expect("closeContext");
    }
}

/// A console message a scenario provokes on purpose: the text starts with `prefix` and
/// contains `contains`.
#[derive(Clone, Debug)]
pub struct Allowed {
    pub prefix: String,
    pub contains: String,
}

impl Allowed {
    /// Chromium's own message for a WebSocket that failed before or during its handshake
    /// (refused upgrade, refused TCP connection); `url` is the endpoint without query.
    pub fn chromium_ws_failed(url: &str, contains: &str) -> Allowed {
        Allowed {
            prefix: format!("WebSocket connection to '{url}"),
            contains: format!("' failed: {contains}"),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        text.starts_with(&self.prefix) && text.contains(&self.contains)
    }
}

pub struct Page {
    id: u64,
    pub name: String,
}

impl Page {
    pub async fn call(&self, cmd: &str, mut args: Value) -> Value {
        args["page"] = json!(self.id);
        match driver().call(cmd, args).await {
            Ok(v) => v,
            Err(e) => {
                let log = driver()
                    .call("consoleLog", json!({ "page": self.id }))
                    .await
                    .unwrap_or(Value::Null);
                panic!(
                    "page {}: {cmd} failed: {e}\nconsole of {}: {log}",
                    self.name, self.name
                )
            }
        }
    }

    pub async fn goto(&self, url: &str) {
        let r = self
            .call("goto", json!({ "url": url, "timeoutMs": PAGE_WAIT_MS }))
            .await;
        assert_eq!(r["status"], 200, "viewer page: {r}");
    }

    pub async fn reload(&self) {
        let r = self
            .call("reload", json!({ "timeoutMs": PAGE_WAIT_MS }))
            .await;
        assert_eq!(r["status"], 200, "viewer page: {r}");
    }

    /// Waits until the viewer is connected (its RFB session initialised, desktop name known).
    pub async fn connected(&self) -> Value {
        self.wait_state(json!({ "state": "connected" })).await
    }

    pub async fn wait_state(&self, mut spec: Value) -> Value {
        spec["timeoutMs"] = json!(PAGE_WAIT_MS);
        self.call("waitState", spec).await
    }

    pub async fn disconnected(&self) -> Value {
        self.wait_state(json!({ "state": "disconnected" })).await
    }

    pub async fn snapshot(&self) -> Value {
        self.call("snapshot", json!({})).await
    }

    /// Waits until every point shows `rgb` (±8 per channel); `None` = centre and quarter points.
    pub async fn wait_color(&self, rgb: [u8; 3], points: Option<&[[u32; 2]]>) {
        self.call(
            "waitColor",
            json!({ "rgb": rgb, "points": points, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await;
    }

    /// Moves the mouse over framebuffer pixel (x, y); returns the pixel noVNC sends for it.
    pub async fn mouse_move(&self, x: u32, y: u32) -> (i64, i64) {
        let m = self.call("mouseMove", json!({ "x": x, "y": y })).await;
        (
            m["fbX"].as_i64().expect("fbX"),
            m["fbY"].as_i64().expect("fbY"),
        )
    }

    pub async fn click(&self, x: u32, y: u32, button: &str, count: u32) {
        self.call(
            "click",
            json!({ "x": x, "y": y, "button": button, "clickCount": count }),
        )
        .await;
    }

    pub async fn type_text(&self, text: &str) {
        self.call("type", json!({ "text": text })).await;
    }

    /// Type with `delay_ms` between keystrokes, as a person would.
    pub async fn type_paced(&self, text: &str, delay_ms: u64) {
        self.call("type", json!({ "text": text, "delayMs": delay_ms }))
            .await;
    }

    pub async fn press(&self, key: &str) {
        self.call("press", json!({ "key": key })).await;
    }

    pub async fn region_hash(&self, r: Rect) -> String {
        let h = self.call("regionHash", json!({ "rect": r })).await;
        h.as_str().expect("region painted").to_owned()
    }

    pub async fn wait_region_hash(&self, r: Rect, hash: &str) {
        self.call(
            "waitRegionHash",
            json!({ "rect": r, "hash": hash, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await;
    }

    pub async fn screenshot(&self, file: &str) {
        let dir = root().join("target/e2e");
        std::fs::create_dir_all(&dir).expect("target/e2e");
        let path = dir.join(format!("{file}.png"));
        self.call("screenshot", json!({ "path": path })).await;
    }

    /// Every console message and page error so far (`[{type, text}]`, tokens redacted, each
    /// text cut at 1000 characters).
    pub async fn console_log(&self) -> Vec<Value> {
        let v = self.call("consoleLog", json!({})).await;
        v.as_array().expect("console log").clone()
    }

    /// The noVNC events recorded in the page so far (see `pageRecordRfbEvents` in lib.mjs):
    /// `[{type, at, text?, ...}]`.
    pub async fn events(&self) -> Vec<Value> {
        let v = self.call("events", json!({})).await;
        v.as_array().expect("events").clone()
    }

    /// Waits (per animation frame) for a recorded noVNC event of `type`, with `text` when given,
    /// at index `from` or later; returns it (with its `index`).
    pub async fn wait_event(&self, kind: &str, text: Option<&str>, from: usize) -> Value {
        self.call(
            "waitEvent",
            json!({ "type": kind, "text": text, "from": from, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await
    }

    /// `RFB.clipboardPasteFrom(text)`: the page puts `text` on the remote clipboard.
    pub async fn clipboard_paste(&self, text: &str) {
        self.call("clipboardPaste", json!({ "text": text })).await;
    }

    /// The serialized DOM, the URL and the title of the page as they are now.
    pub async fn content(&self) -> Value {
        self.call("content", json!({})).await
    }

    /// Waits for the viewer's credentials form, types `password` into it and submits it.
    pub async fn submit_password(&self, password: &str) {
        self.call(
            "submitPassword",
            json!({ "password": password, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await;
    }

    /// Fails on any page error or console error that is not in `allowed`; returns the allowed
    /// ones that appeared.
    pub async fn assert_clean_console(&self, allowed: &[Allowed]) -> Vec<String> {
        let log = self.call("consoleLog", json!({})).await;
        let mut seen = Vec::new();
        let mut unexpected = Vec::new();
        for entry in log.as_array().expect("log") {
            let (kind, text) = (
                entry["type"].as_str().unwrap_or(""),
                entry["text"].as_str().unwrap_or(""),
            );
            if !matches!(kind, "error" | "pageerror" | "crash") {
                continue;
            }
            if kind == "error" && allowed.iter().any(|a| a.matches(text)) {
                seen.push(text.to_owned());
            } else {
                unexpected.push(format!("{kind}: {text}"));
            }
        }
        assert!(
            unexpected.is_empty(),
            "page {}: unexpected console errors:\n{}\nfull log: {log}",
            self.name,
            unexpected.join("\n")
        );
        seen
    }
}

// ------------------------------------------------------------------------------------------
// The gateway: the real binary on ports the test chooses, so the page's Origin is known before
// it starts (for `auth.allowed_origins`) and a restart comes back on the same ports.

/// The certificate of every gateway in this test process (rcgen, self-signed, for 127.0.0.1,
/// localhost and evil.test). Chromium trusts exactly this key
/// (`--ignore-certificate-errors-spki-list` with its SPKI hash), so a page sees a valid
/// certificate: no certificate error, no retried connections, no blanket `ignoreHTTPSErrors`.
pub struct Tls {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// base64(SHA-256(SubjectPublicKeyInfo)), the form Chromium's flag takes.
    pub spki_sha256: String,
}

pub fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        use base64::Engine;
        use rcgen::PublicKeyData;
        use sha2::Digest;
        let certified = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".into(),
            "localhost".into(),
            "evil.test".into(),
        ])
        .expect("certificate");
        let spki = certified.signing_key.subject_public_key_info();
        Tls {
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
            der: certified.cert.der().to_vec(),
            spki_sha256: base64::engine::general_purpose::STANDARD
                .encode(sha2::Sha256::digest(&spki)),
        }
    })
}

/// One backend of the default pool.
pub struct GwBackend {
    pub name: String,
    pub addr: SocketAddr,
    /// `password_env` of this backend: the environment variable with its own VNC password.
    pub password_env: Option<String>,
}

/// What a test's gateway looks like; every field has the default the scenarios before the RFB
/// edge ran with (no `rfb:` section, i.e. terminate mode with no credentials, clipboard `both`,
/// no health checks).
pub struct GwSpec<'a> {
    pub backends: Vec<GwBackend>,
    pub redis: Option<&'a RedisServer>,
    /// Origins allowed besides the gateway's own `https://127.0.0.1:PORT`.
    pub extra_origins: Vec<String>,
    pub leeway_seconds: u64,
    /// `pools.default.rfb` (`mode`, `password_env`, `tls: {ca_file, server_name}`); the
    /// section is written only when a field is set.
    pub rfb: RfbSpec,
    /// `pools.default.clipboard` (`both` | `to_client` | `to_server` | `none`); `None` = unset.
    pub clipboard: Option<&'static str>,
    /// `pools.default.health_check` (`rfb` | `tcp`); `None` = the mode's default.
    pub health_check: Option<&'static str>,
    /// `pools.default.health_check_interval_seconds`; 0 = no health checks.
    pub health_check_interval_seconds: u64,
    /// Environment variables of the gateway process (the VNC passwords the `*_env` keys name).
    pub env: Vec<(String, String)>,
    /// Extra top-level YAML appended verbatim (e.g. a `recording:` section); empty = none.
    pub extra: String,
    /// `web_root`; `None` = the repository's `web/` (the viewer page).
    pub web_root: Option<PathBuf>,
}

impl<'a> GwSpec<'a> {
    pub fn new(backends: Vec<(&str, SocketAddr)>) -> Self {
        GwSpec {
            backends: backends
                .into_iter()
                .map(|(name, addr)| GwBackend {
                    name: name.to_owned(),
                    addr,
                    password_env: None,
                })
                .collect(),
            redis: None,
            extra_origins: Vec::new(),
            leeway_seconds: 30,
            rfb: RfbSpec::default(),
            clipboard: None,
            health_check: None,
            health_check_interval_seconds: 0,
            env: Vec::new(),
            extra: String::new(),
            web_root: None,
        }
    }

    /// Gives the gateway process `name=value` (e.g. a VNC password).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The `pools.default` mapping (indented for it), backends last.
    fn pool_yaml(&self) -> String {
        let mut out = String::new();
        let mut rfb = Vec::new();
        if let Some(mode) = self.rfb.mode {
            rfb.push(format!("mode: {mode}"));
        }
        if let Some(env) = &self.rfb.password_env {
            rfb.push(format!("password_env: {env}"));
        }
        if let Some(ca) = &self.rfb.ca_file {
            let name = self
                .rfb
                .server_name
                .as_ref()
                .map(|n| format!(", server_name: \"{n}\""))
                .unwrap_or_default();
            rfb.push(format!("tls: {{ ca_file: \"{}\"{name} }}", ca.display()));
        }
        if !rfb.is_empty() {
            out.push_str(&format!("    rfb: {{ {} }}\n", rfb.join(", ")));
        }
        if let Some(clipboard) = self.clipboard {
            out.push_str(&format!("    clipboard: {clipboard}\n"));
        }
        if let Some(kind) = self.health_check {
            out.push_str(&format!("    health_check: {kind}\n"));
        }
        out.push_str(&format!(
            "    health_check_interval_seconds: {}\n    backends:\n",
            self.health_check_interval_seconds
        ));
        for b in &self.backends {
            let password = b
                .password_env
                .as_ref()
                .map(|e| format!(", password_env: {e}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "      - {{ name: {}, addr: \"{}\"{password} }}\n",
                b.name, b.addr
            ));
        }
        out
    }
}

/// One running `vncgate` process and the log lines it wrote.
struct GwProc {
    child: tokio::process::Child,
    logs: LogTail,
}

pub struct Gw {
    pub label: String,
    pub port: u16,
    pub admin_port: u16,
    config: PathBuf,
    redis: bool,
    redis_url: String,
    env: Vec<(String, String)>,
    proc: GwProc,
    _dir: tempfile::TempDir,
}

impl Gw {
    pub async fn start(label: &str, spec: GwSpec<'_>) -> Gw {
        Gw::start_on(label, free_port(), spec).await
    }

    pub async fn start_on(label: &str, port: u16, spec: GwSpec<'_>) -> Gw {
        let admin_port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &tls().cert_pem).expect("cert");
        std::fs::write(&key, &tls().key_pem).expect("key");
        let mut origins = vec![format!("https://127.0.0.1:{port}")];
        origins.extend(spec.extra_origins.iter().cloned());
        let origins = origins
            .iter()
            .map(|o| format!("\"{o}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let yaml = format!(
            "server:\n  threads: 2\n  drain_seconds: 0\n  pid_file: \"{d}/vncgate.pid\"\n  upgrade_sock: \"{d}/upgrade.sock\"\n\
             listeners:\n  - addr: \"127.0.0.1:{port}\"\n    tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n\
             paths: [\"/websockify\"]\n\
             web_root: \"{web}\"\n\
             admin:\n  addr: \"127.0.0.1:{admin_port}\"\n  token_env: VNCGATE_ADMIN_TOKEN\n\
             auth:\n  algorithms: [HS256]\n  secret_env: VNCGATE_JWT_SECRET\n  leeway_seconds: {leeway}\n  allowed_origins: [{origins}]\n\
             pools:\n  default:\n{pool}\
             store:\n  kind: {kind}\n  session_idle_ttl_seconds: 3600\n\
             limits:\n  max_sessions_per_user: 20\n\
             logging:\n  format: json\n  level: debug\n{extra}",
            d = dir.path().display(),
            cert = cert.display(),
            key = key.display(),
            web = spec
                .web_root
                .clone()
                .unwrap_or_else(|| root().join("web"))
                .display(),
            leeway = spec.leeway_seconds,
            pool = spec.pool_yaml(),
            extra = spec.extra,
            kind = if spec.redis.is_some() {
                "redis"
            } else {
                "memory"
            },
        );
        let config = dir.path().join("vncgate.yaml");
        std::fs::write(&config, yaml).expect("config");
        let redis_url = spec.redis.map(|r| r.url()).unwrap_or_default();
        let proc = GwProc::spawn(label, &config, &redis_url, &spec.env);
        let gw = Gw {
            label: label.to_owned(),
            port,
            admin_port,
            config,
            redis: spec.redis.is_some(),
            redis_url,
            env: spec.env,
            proc,
            _dir: dir,
        };
        gw.await_ready().await;
        gw
    }

    pub async fn await_ready(&self) {
        for addr in [self.port, self.admin_port] {
            self.wait_log(|v| {
                v["event"] == "listening" && v["addr"] == format!("127.0.0.1:{addr}")
            })
            .await;
        }
        if self.redis {
            self.wait_log(|v| v["event"] == "store_connected").await;
        }
    }

    pub fn origin(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The viewer page on this gateway, parameters in the fragment (never sent to a server).
    pub fn page_url(&self, fragment: &str) -> String {
        format!("{}/#{fragment}", self.origin())
    }

    pub fn ws_endpoint(&self) -> String {
        format!("wss://127.0.0.1:{}/websockify", self.port)
    }

    /// A non-browser WebSocket client for this gateway as a page from its origin would connect:
    /// wss:// trusting the gateway's certificate, the page's Origin, the token in the query.
    pub fn ws_client(&self, token: &str) -> WsConnect {
        let mut c = WsConnect::new(format!("{}?token={token}", self.ws_endpoint()));
        c.headers.push(("Origin".into(), self.origin()));
        c.tls = Some(rfb_client::tls_client_config(&tls().der));
        c
    }

    /// SIGTERM, then wait for the exit (drain_seconds is 0: live sessions get 1001 at once).
    pub async fn stop(&mut self) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.proc.child.id().expect("running") as i32, libc::SIGTERM);
        }
        let status = tokio::time::timeout(EVENT_TIMEOUT, self.proc.child.wait())
            .await
            .expect("gateway did not exit after SIGTERM")
            .expect("wait");
        assert_eq!(status.code(), Some(0), "{}: exit status", self.label);
    }

    /// A new process with the same config: same ports, same secret, same store.
    pub async fn restart(&mut self) {
        self.proc = GwProc::spawn(&self.label, &self.config, &self.redis_url, &self.env);
        self.await_ready().await;
    }

    pub async fn wait_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_logs(1, pred).await.remove(0)
    }

    pub async fn wait_logs(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.proc.logs.wait_logs(n, pred).await
    }

    pub fn logs(&self) -> Vec<Value> {
        self.proc.logs.logs()
    }

    /// Every line the process wrote on stderr, as written (to check what never appears in them).
    pub fn raw_logs(&self) -> Vec<String> {
        self.proc.logs.raw()
    }

    /// The value of one Prometheus series on `/metrics`: `name` and exactly the label pairs
    /// `labels` (in any order); 0 when the series is not exported (yet).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, body) = http_get(self.admin_port, "/metrics", &[]).await;
        assert_eq!(status, 200, "{}: /metrics", self.label);
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
                if n != name {
                    return None;
                }
                let inner = rest.strip_suffix('}')?;
                let mut got: Vec<String> = if inner.is_empty() {
                    Vec::new()
                } else {
                    inner.split(',').map(str::to_owned).collect()
                };
                got.sort();
                (got == want).then(|| value.parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Waits until `metric(name, labels)` is at least `at_least` (polls `/metrics`: a counter
    /// raises no event); returns the value.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let v = self.metric(name, labels).await;
            if v >= at_least {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {name}{labels:?} is {v}, not >= {at_least}, after {EVENT_TIMEOUT:?}",
                self.label
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    pub async fn admin(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        http_request(
            self.admin_port,
            method,
            path,
            &[("Authorization", &auth)],
            body,
        )
        .await
    }
}

impl GwProc {
    fn spawn(label: &str, config: &Path, redis_url: &str, env: &[(String, String)]) -> GwProc {
        let (child, logs) = spawn_vncgate_with_env(label, config, Some(redis_url), env, &[]);
        GwProc { child, logs }
    }
}

// ------------------------------------------------------------------------------------------
// Desktops: a real Xvnc, optionally with an xterm whose typed lines land in a file.

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn centre(&self) -> (u32, u32) {
        (self.x + self.w / 2, self.y + self.h / 2)
    }
}

/// The xterm's character grid in framebuffer coordinates (from its X window geometry).
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub x: u32,
    pub y: u32,
    pub cell_w: u32,
    pub cell_h: u32,
}

pub const XTERM_COLUMNS: u32 = 80;
pub const XTERM_ROWS: u32 = 24;
/// xterm's default internal border.
pub const XTERM_BORDER: u32 = 2;
/// xterm's default colours: black text on white.
pub const XTERM_BG: [u8; 3] = [255, 255, 255];

impl Grid {
    pub fn cell(&self, row: u32, col: u32) -> Rect {
        Rect {
            x: self.x + XTERM_BORDER + col * self.cell_w,
            y: self.y + XTERM_BORDER + row * self.cell_h,
            w: self.cell_w,
            h: self.cell_h,
        }
    }

    /// `cols` cells of one row.
    pub fn span(&self, row: u32, col: u32, cols: u32) -> Rect {
        Rect {
            w: cols * self.cell_w,
            ..self.cell(row, col)
        }
    }
}

pub struct Desk {
    pub xvnc: Xvnc,
    pub xterm: Option<std::process::Child>,
    pub grid: Option<Grid>,
    pub typed: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn xdotool(display: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("xdotool")
        .args(args)
        .env("DISPLAY", display)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("xdotool: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "xdotool {args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn shell_vars(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Polls a condition outside the browser (a file, the X pointer) until it holds.
pub async fn poll<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_within(what, EVENT_TIMEOUT, f).await
}

/// [`poll`] with another bound, for what legitimately takes longer than [`EVENT_TIMEOUT`] (e.g.
/// a minute of once-a-second health checks).
pub async fn poll_within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {limit:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

pub fn rgb(hex: &str) -> [u8; 3] {
    let n = u32::from_str_radix(hex.trim_start_matches('#'), 16).expect("hex colour");
    [(n >> 16) as u8, (n >> 8) as u8, n as u8]
}

impl Desk {
    /// An Xvnc with its root window painted `hex`; `name` is the RFB desktop name.
    pub async fn start(name: &str, hex: &str) -> Desk {
        let xvnc = Xvnc::start_async(name, GEOMETRY).await.expect("Xvnc");
        xvnc.set_root_color(hex).expect("xsetroot");
        // No server-side key autorepeat: on a loaded machine a key's release can reach Xvnc
        // later than the repeat delay (660 ms), and the xterm would see the key twice.
        let xset = Command::new("xset")
            .args(["-display", &xvnc.display_name(), "r", "off"])
            .stdin(Stdio::null())
            .output()
            .expect("xset");
        assert!(xset.status.success(), "xset r off: {xset:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        Desk {
            xvnc,
            xterm: None,
            grid: None,
            typed: dir.path().join("typed.txt"),
            _dir: dir,
        }
    }

    /// Plus an 80x24 xterm at +0+0 that runs `cat > typed.txt` (every line typed into it lands
    /// in the file) with the text cursor hidden (so a typed character changes exactly one cell),
    /// and has the X input focus. A double-click counts within 3 s (default 250 ms): the two
    /// clicks cross the browser, the gateway and Xvnc, which may space them out on a busy machine.
    pub async fn with_xterm(name: &str, hex: &str) -> Desk {
        let mut desk = Desk::start(name, hex).await;
        let display = desk.xvnc.display_name();
        let script = format!("printf '\\033[?25l'; exec cat > '{}'", desk.typed.display());
        let child = Command::new("xterm")
            .env("DISPLAY", &display)
            // No window border: the text area then starts at the window's origin plus xterm's
            // internal border (with the default 1-pixel border it would be one pixel further).
            .args(["-geometry", "80x24+0+0", "-bw", "0", "-b", "2"])
            .args(["-xrm", "XTerm*multiClickTime: 3000"])
            .args(["-e", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("xterm");
        desk.xterm = Some(child);
        // The file exists once the shell inside the xterm runs cat, which is after the cursor
        // was hidden; the window is mapped before xterm starts its child.
        let typed = desk.typed.clone();
        poll("xterm's cat started", || typed.exists().then_some(())).await;
        let wid = poll("xterm window visible", || {
            xdotool(&display, &["search", "--onlyvisible", "--class", "xterm"])
                .ok()
                .and_then(|o| o.lines().next().map(str::to_owned))
        })
        .await;
        let g = shell_vars(
            &xdotool(&display, &["getwindowgeometry", "--shell", &wid]).expect("geometry"),
        );
        let num = |k: &str| g[k].parse::<u32>().expect("number");
        let (w, h) = (num("WIDTH"), num("HEIGHT"));
        assert!(
            (w - 2 * XTERM_BORDER).is_multiple_of(XTERM_COLUMNS)
                && (h - 2 * XTERM_BORDER).is_multiple_of(XTERM_ROWS),
            "xterm window {w}x{h} is not an 80x24 grid plus borders"
        );
        desk.grid = Some(Grid {
            x: num("X"),
            y: num("Y"),
            cell_w: (w - 2 * XTERM_BORDER) / XTERM_COLUMNS,
            cell_h: (h - 2 * XTERM_BORDER) / XTERM_ROWS,
        });
        xdotool(&display, &["windowfocus", "--sync", &wid]).expect("focus the xterm");
        desk
    }

    pub fn grid(&self) -> Grid {
        self.grid.expect("this desk has an xterm")
    }

    pub fn display(&self) -> String {
        self.xvnc.display_name()
    }

    /// Waits until the xterm has written exactly `want` to its file (cat writes a line when
    /// Enter arrives); fails at once on content that cannot become `want`.
    pub async fn wait_typed(&self, want: &str) {
        poll(&format!("typed file to read {want:?}"), || {
            let got = std::fs::read_to_string(&self.typed).unwrap_or_default();
            assert!(
                want.starts_with(&got),
                "the xterm received {got:?}, expected {want:?}"
            );
            (got == want).then_some(())
        })
        .await;
    }

    pub fn pointer(&self) -> (i64, i64) {
        let v = shell_vars(
            &xdotool(&self.display(), &["getmouselocation", "--shell"]).expect("pointer"),
        );
        (v["X"].parse().expect("X"), v["Y"].parse().expect("Y"))
    }

    /// Waits until the X server's pointer is at (x, y).
    pub async fn wait_pointer(&self, x: i64, y: i64) {
        poll(&format!("X pointer at {x},{y}"), || {
            (self.pointer() == (x, y)).then_some(())
        })
        .await;
    }

    /// SIGKILL, as a crash: no chance to say goodbye to its clients. The harness keeps the
    /// child handle to itself, so the pid is found in /proc: the `Xvnc` child of this test
    /// process whose first argument is this desk's display.
    pub fn crash(&self) {
        let n = self.xvnc.display;
        let me = std::process::id();
        let pid = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let mut args = argv.split(|&b| b == 0);
                ppid == Some(me)
                    && args.next().is_some_and(|a| a.ends_with(b"Xvnc"))
                    && args.next() == Some(format!(":{n}").as_bytes())
            })
            .expect("our Xvnc in /proc");
        // SAFETY: kill(2) on our own child process (not reaped yet: the harness reaps it on drop).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        // A SIGKILLed X server leaves its socket (and lock, if any) behind; the harness cleans
        // up only after a SIGTERM that did not work.
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{n}"));
        let _ = std::fs::remove_file(format!("/tmp/.X{n}-lock"));
    }
}

impl Drop for Desk {
    fn drop(&mut self) {
        if let Some(mut c) = self.xterm.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tokens and small helpers.

/// An HS256 token: `sub`, `sid`, 10 minutes, plus `extra` claims.
pub fn jwt(sub: &str, sid: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "sid": sid, "exp": now() + 600 });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            claims[k] = v;
        }
    }
    token_with_claims(&claims)
}

/// Waits for the desktop picture: the root colour outside the xterm and, if there is one, the
/// xterm's white background.
pub async fn wait_desktop(page: &Page, desk: &Desk, root_hex: &str) {
    page.wait_color(rgb(root_hex), Some(&ROOT_POINTS)).await;
    if let Some(g) = desk.grid {
        let inside: Vec<[u32; 2]> = [(5, 40), (20, 70), (12, 3)]
            .iter()
            .map(|&(r, c)| {
                let (x, y) = g.cell(r, c).centre();
                [x, y]
            })
            .collect();
        page.wait_color(XTERM_BG, Some(&inside)).await;
    }
}

/// Median and 95th percentile (nearest rank) of a list of samples.
pub fn summary(samples: &[f64]) -> (f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    (rank(0.5), rank(0.95))
}
