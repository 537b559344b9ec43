//! noVNC through vncgate, every user-visible behaviour: real noVNC (the viewer page vncgate
//! serves) in real headless Chromium, over wss:// with a certificate the test process makes (and
//! Chromium trusts by its key, no blanket "ignore certificate errors"), to real Xvnc desktops
//! running a real xterm, with a real redis-server where replicas share pins.
//!
//! One Chromium per test process (`tests/browser/driver.mjs`, spoken to over stdin/stdout), one
//! browser context per user. Each test starts its own gateway(s) on ports it picks, so the
//! page's Origin is on `auth.allowed_origins` from the start and a restart reuses the ports. Every wait is for an event: a viewer state or canvas pixels polled
//! per animation frame in the page, a gateway log line, a file the xterm writes, the X pointer.
//! Every page's console is checked at the end: any uncaught error or console error fails the
//! scenario, except the exact messages a scenario provokes on purpose (listed where it does).
//! Screenshots go to `target/e2e/`; latencies are printed, never asserted.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::log_tail::LogTail;
use common::redis_server::RedisServer;
use common::rfb_client::{self, WsConnect};
use common::xvnc::Xvnc;
use common::{ADMIN_TOKEN, EVENT_TIMEOUT, free_port, now, token_with_claims};
use serde_json::{Value, json};
use tokio::sync::{RwLock, oneshot};

/// How long the page-side waits may take (a guard against a hung test, not a timing assertion).
const PAGE_WAIT_MS: u64 = 30_000;
/// Condition polls outside the browser (a file's content, the X pointer): how often to look.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Desktop size of every Xvnc here; the page's viewport is 1024x768, so noVNC scales it up.
const GEOMETRY: (u16, u16) = (800, 600);
/// Framebuffer points on the root window, outside the xterm (which sits at +0+0, 484x316).
const ROOT_POINTS: [[u32; 2]; 4] = [[600, 400], [700, 500], [550, 560], [760, 100]];
/// Samples per latency figure.
const LATENCY_SAMPLES: usize = 20;

/// The latency test takes this exclusively so its numbers are not measured while other
/// scenarios load the two cores; every other test holds it shared.
static EXCLUSIVE: RwLock<()> = RwLock::const_new(());

fn root() -> &'static Path {
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
struct Context {
    id: u64,
}

impl Context {
    async fn new() -> Context {
        let r = driver()
            .call("newContext", json!({ "ignoreHTTPSErrors": false }))
            .await
            .expect("newContext");
        Context {
            id: r["ctx"].as_u64().expect("ctx id"),
        }
    }

    async fn page(&self, name: &str) -> Page {
        let r = driver()
            .call("newPage", json!({ "ctx": self.id, "name": name }))
            .await
            .expect("newPage");
        Page {
            id: r["page"].as_u64().expect("page id"),
            name: name.to_owned(),
        }
    }

    async fn close(self) {
        driver()
            .call("closeContext", json!({ "ctx": self.id }))
            .await
            .expect("closeContext");
    }
}

/// A console message a scenario provokes on purpose: the text starts with `prefix` and
/// contains `contains`.
struct Allowed {
    prefix: String,
    contains: String,
}

impl Allowed {
    /// Chromium's own message for a WebSocket that failed before or during its handshake
    /// (refused upgrade, refused TCP connection); `url` is the endpoint without query.
    fn chromium_ws_failed(url: &str, contains: &str) -> Allowed {
        Allowed {
            prefix: format!("WebSocket connection to '{url}"),
            contains: format!("' failed: {contains}"),
        }
    }

    /// noVNC's error when the socket closes before the RFB session was established.
    fn novnc_failed_connecting() -> Allowed {
        Allowed {
            prefix: "Failed when connecting: Connection closed (code: 1006)".into(),
            contains: String::new(),
        }
    }

    fn matches(&self, text: &str) -> bool {
        text.starts_with(&self.prefix) && text.contains(&self.contains)
    }
}

struct Page {
    id: u64,
    name: String,
}

impl Page {
    async fn call(&self, cmd: &str, mut args: Value) -> Value {
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

    async fn goto(&self, url: &str) {
        let r = self
            .call("goto", json!({ "url": url, "timeoutMs": PAGE_WAIT_MS }))
            .await;
        assert_eq!(r["status"], 200, "viewer page: {r}");
    }

    async fn reload(&self) {
        let r = self
            .call("reload", json!({ "timeoutMs": PAGE_WAIT_MS }))
            .await;
        assert_eq!(r["status"], 200, "viewer page: {r}");
    }

    /// Waits until the viewer is connected (its RFB session initialised, desktop name known).
    async fn connected(&self) -> Value {
        self.wait_state(json!({ "state": "connected" })).await
    }

    async fn wait_state(&self, mut spec: Value) -> Value {
        spec["timeoutMs"] = json!(PAGE_WAIT_MS);
        self.call("waitState", spec).await
    }

    async fn disconnected(&self) -> Value {
        self.wait_state(json!({ "state": "disconnected" })).await
    }

    async fn snapshot(&self) -> Value {
        self.call("snapshot", json!({})).await
    }

    /// Waits until every point shows `rgb` (±8 per channel); `None` = centre and quarter points.
    async fn wait_color(&self, rgb: [u8; 3], points: Option<&[[u32; 2]]>) {
        self.call(
            "waitColor",
            json!({ "rgb": rgb, "points": points, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await;
    }

    /// Moves the mouse over framebuffer pixel (x, y); returns the pixel noVNC sends for it.
    async fn mouse_move(&self, x: u32, y: u32) -> (i64, i64) {
        let m = self.call("mouseMove", json!({ "x": x, "y": y })).await;
        (
            m["fbX"].as_i64().expect("fbX"),
            m["fbY"].as_i64().expect("fbY"),
        )
    }

    async fn click(&self, x: u32, y: u32, button: &str, count: u32) {
        self.call(
            "click",
            json!({ "x": x, "y": y, "button": button, "clickCount": count }),
        )
        .await;
    }

    async fn type_text(&self, text: &str) {
        self.call("type", json!({ "text": text })).await;
    }

    async fn press(&self, key: &str) {
        self.call("press", json!({ "key": key })).await;
    }

    async fn region_hash(&self, r: Rect) -> String {
        let h = self.call("regionHash", json!({ "rect": r })).await;
        h.as_str().expect("region painted").to_owned()
    }

    async fn wait_region_hash(&self, r: Rect, hash: &str) {
        self.call(
            "waitRegionHash",
            json!({ "rect": r, "hash": hash, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await;
    }

    async fn screenshot(&self, file: &str) {
        let dir = root().join("target/e2e");
        std::fs::create_dir_all(&dir).expect("target/e2e");
        let path = dir.join(format!("{file}.png"));
        self.call("screenshot", json!({ "path": path })).await;
    }

    /// Fails on any page error or console error that is not in `allowed`; returns the allowed
    /// ones that appeared.
    async fn assert_clean_console(&self, allowed: &[Allowed]) -> Vec<String> {
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
struct Tls {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    /// base64(SHA-256(SubjectPublicKeyInfo)), the form Chromium's flag takes.
    spki_sha256: String,
}

fn tls() -> &'static Tls {
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

struct GwSpec<'a> {
    backends: Vec<(&'a str, SocketAddr)>,
    redis: Option<&'a RedisServer>,
    /// Origins allowed besides the gateway's own `https://127.0.0.1:PORT`.
    extra_origins: Vec<String>,
    leeway_seconds: u64,
}

impl<'a> GwSpec<'a> {
    fn new(backends: Vec<(&'a str, SocketAddr)>) -> Self {
        GwSpec {
            backends,
            redis: None,
            extra_origins: Vec::new(),
            leeway_seconds: 30,
        }
    }
}

/// One running `vncgate` process and the log lines it wrote.
struct GwProc {
    child: tokio::process::Child,
    logs: LogTail,
}

struct Gw {
    label: String,
    port: u16,
    admin_port: u16,
    config: PathBuf,
    redis: bool,
    redis_url: String,
    proc: GwProc,
    _dir: tempfile::TempDir,
}

impl Gw {
    async fn start(label: &str, spec: GwSpec<'_>) -> Gw {
        Gw::start_on(label, free_port(), spec).await
    }

    async fn start_on(label: &str, port: u16, spec: GwSpec<'_>) -> Gw {
        let admin_port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &tls().cert_pem).expect("cert");
        std::fs::write(&key, &tls().key_pem).expect("key");
        let mut origins = vec![format!("https://127.0.0.1:{port}")];
        origins.extend(spec.extra_origins);
        let origins = origins
            .iter()
            .map(|o| format!("\"{o}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let backends: String = spec
            .backends
            .iter()
            .map(|(name, addr)| format!("      - {{ name: {name}, addr: \"{addr}\" }}\n"))
            .collect();
        let yaml = format!(
            "server:\n  threads: 2\n  drain_seconds: 0\n  pid_file: \"{d}/vncgate.pid\"\n  upgrade_sock: \"{d}/upgrade.sock\"\n\
             listeners:\n  - addr: \"127.0.0.1:{port}\"\n    tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n\
             paths: [\"/websockify\"]\n\
             web_root: \"{web}\"\n\
             admin:\n  addr: \"127.0.0.1:{admin_port}\"\n  token_env: VNCGATE_ADMIN_TOKEN\n\
             auth:\n  algorithms: [HS256]\n  secret_env: VNCGATE_JWT_SECRET\n  leeway_seconds: {leeway}\n  allowed_origins: [{origins}]\n\
             pools:\n  default:\n    health_check_interval_seconds: 0\n    backends:\n{backends}\
             store:\n  kind: {kind}\n  session_idle_ttl_seconds: 3600\n\
             limits:\n  max_sessions_per_user: 20\n\
             logging:\n  format: json\n  level: debug\n",
            d = dir.path().display(),
            cert = cert.display(),
            key = key.display(),
            web = root().join("web").display(),
            leeway = spec.leeway_seconds,
            kind = if spec.redis.is_some() {
                "redis"
            } else {
                "memory"
            },
        );
        let config = dir.path().join("vncgate.yaml");
        std::fs::write(&config, yaml).expect("config");
        let redis_url = spec.redis.map(|r| r.url()).unwrap_or_default();
        let proc = GwProc::spawn(label, &config, &redis_url);
        let gw = Gw {
            label: label.to_owned(),
            port,
            admin_port,
            config,
            redis: spec.redis.is_some(),
            redis_url,
            proc,
            _dir: dir,
        };
        gw.await_ready().await;
        gw
    }

    async fn await_ready(&self) {
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

    fn origin(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The viewer page on this gateway, parameters in the fragment (never sent to a server).
    fn page_url(&self, fragment: &str) -> String {
        format!("{}/#{fragment}", self.origin())
    }

    fn ws_endpoint(&self) -> String {
        format!("wss://127.0.0.1:{}/websockify", self.port)
    }

    /// SIGTERM, then wait for the exit (drain_seconds is 0: live sessions get 1001 at once).
    async fn stop(&mut self) {
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
    async fn restart(&mut self) {
        self.proc = GwProc::spawn(&self.label, &self.config, &self.redis_url);
        self.await_ready().await;
    }

    async fn wait_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_logs(1, pred).await.remove(0)
    }

    async fn wait_logs(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.proc.logs.wait_logs(n, pred).await
    }

    fn logs(&self) -> Vec<Value> {
        self.proc.logs.logs()
    }

    async fn admin(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        common::http_request(
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
    fn spawn(label: &str, config: &Path, redis_url: &str) -> GwProc {
        let (child, logs) = common::spawn_vncgate(label, config, Some(redis_url), &[]);
        GwProc { child, logs }
    }
}

// ------------------------------------------------------------------------------------------
// Desktops: a real Xvnc, optionally with an xterm whose typed lines land in a file.

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Rect {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

impl Rect {
    fn centre(&self) -> (u32, u32) {
        (self.x + self.w / 2, self.y + self.h / 2)
    }
}

/// The xterm's character grid in framebuffer coordinates (from its X window geometry).
#[derive(Clone, Copy, Debug)]
struct Grid {
    x: u32,
    y: u32,
    cell_w: u32,
    cell_h: u32,
}

const XTERM_COLUMNS: u32 = 80;
const XTERM_ROWS: u32 = 24;
/// xterm's default internal border.
const XTERM_BORDER: u32 = 2;
/// xterm's default colours: black text on white.
const XTERM_BG: [u8; 3] = [255, 255, 255];

impl Grid {
    fn cell(&self, row: u32, col: u32) -> Rect {
        Rect {
            x: self.x + XTERM_BORDER + col * self.cell_w,
            y: self.y + XTERM_BORDER + row * self.cell_h,
            w: self.cell_w,
            h: self.cell_h,
        }
    }

    /// `cols` cells of one row.
    fn span(&self, row: u32, col: u32, cols: u32) -> Rect {
        Rect {
            w: cols * self.cell_w,
            ..self.cell(row, col)
        }
    }
}

struct Desk {
    xvnc: Xvnc,
    xterm: Option<std::process::Child>,
    grid: Option<Grid>,
    typed: PathBuf,
    _dir: tempfile::TempDir,
}

fn xdotool(display: &str, args: &[&str]) -> Result<String, String> {
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

fn shell_vars(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Polls a condition outside the browser (a file, the X pointer) until it holds.
async fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {EVENT_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn rgb(hex: &str) -> [u8; 3] {
    let n = u32::from_str_radix(hex.trim_start_matches('#'), 16).expect("hex colour");
    [(n >> 16) as u8, (n >> 8) as u8, n as u8]
}

impl Desk {
    /// An Xvnc with its root window painted `hex`; `name` is the RFB desktop name.
    async fn start(name: &str, hex: &str) -> Desk {
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
    async fn with_xterm(name: &str, hex: &str) -> Desk {
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

    fn grid(&self) -> Grid {
        self.grid.expect("this desk has an xterm")
    }

    fn display(&self) -> String {
        self.xvnc.display_name()
    }

    /// Waits until the xterm has written exactly `want` to its file (cat writes a line when
    /// Enter arrives); fails at once on content that cannot become `want`.
    async fn wait_typed(&self, want: &str) {
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

    fn pointer(&self) -> (i64, i64) {
        let v = shell_vars(
            &xdotool(&self.display(), &["getmouselocation", "--shell"]).expect("pointer"),
        );
        (v["X"].parse().expect("X"), v["Y"].parse().expect("Y"))
    }

    /// Waits until the X server's pointer is at (x, y).
    async fn wait_pointer(&self, x: i64, y: i64) {
        poll(&format!("X pointer at {x},{y}"), || {
            (self.pointer() == (x, y)).then_some(())
        })
        .await;
    }

    /// SIGKILL, as a crash: no chance to say goodbye to its clients. The harness keeps the
    /// child handle to itself, so the pid is found in /proc: the `Xvnc` child of this test
    /// process whose first argument is this desk's display.
    fn crash(&self) {
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
fn jwt(sub: &str, sid: &str, extra: Value) -> String {
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
async fn wait_desktop(page: &Page, desk: &Desk, root_hex: &str) {
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

/// A session id whose rendezvous choice between desk-a and desk-b (both idle) is desk-a: a pin
/// on desk-b for it can only come from the store, never from placement.
fn sid_placed_on_desk_a(prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|sid| {
            vncgate::routing::placement::least_loaded(sid, &[("desk-a", 0), ("desk-b", 0)])
                == Some("desk-a")
        })
        .expect("some sid")
}

/// A non-browser RFB client holding a session on desk-a, so the least-loaded placement sends the
/// next new session to desk-b.
async fn occupy_desk_a(gw: &Gw) -> rfb_client::WsClient {
    let token = jwt("occupant", "occupant", json!({ "backend": "desk-a" }));
    let mut c = WsConnect::new(format!("{}?token={token}", gw.ws_endpoint()));
    c.headers.push(("Origin".into(), gw.origin()));
    c.tls = Some(rfb_client::tls_client_config(&tls().der));
    let (mut ws, _) = rfb_client::connect(&c).await.expect("occupant upgrade");
    let session = rfb_client::rfb_handshake(&mut ws)
        .await
        .expect("occupant handshake");
    assert_eq!(session.server_name, "desk-a");
    ws
}

fn sessions_of(gw: &Gw, sid: &str) -> Vec<Value> {
    gw.logs()
        .into_iter()
        .filter(|v| v["event"] == "session_started" && v["session_id"] == sid)
        .collect()
}

fn summary(samples: &[f64]) -> (f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    (rank(0.5), rank(0.95))
}

// ------------------------------------------------------------------------------------------
// Scenarios.

/// 1. Pixels: the desktop colour reaches the canvas, and so does a change made on the X side.
#[tokio::test]
async fn pixels_desktop_colour_and_x_side_changes_reach_the_canvas() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::start("pixels-desk", "#3366cc").await;
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("pixels").await;
    let token = jwt("alice", "pixels", json!({}));
    page.goto(&gw.page_url(&format!("token={token}&delivery=protocol")))
        .await;
    let state = page.connected().await;
    assert_eq!(state["desktopName"], "pixels-desk");
    page.wait_color([0x33, 0x66, 0xcc], None).await;

    desk.xvnc.set_root_color("#cc6633").expect("xsetroot");
    page.wait_color([0xcc, 0x66, 0x33], None).await;

    let started = gw.wait_log(|v| v["event"] == "session_started").await;
    assert_eq!(started["session_id"], "pixels");
    assert_eq!(started["user_id"], "alice");
    page.screenshot("pixels").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// 2. Input: keys typed in the page arrive in the xterm (read back from the file its `cat`
/// writes), mouse moves move the X pointer, and a double-click selects a word (read back by
/// pasting the PRIMARY selection with a middle click into the same xterm).
#[tokio::test]
async fn input_keys_pointer_and_selection_reach_the_x_desktop() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::with_xterm("input-desk", "#336633").await;
    let g = desk.grid();
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("input").await;
    let token = jwt("alice", "input", json!({}));
    page.goto(&gw.page_url(&format!("token={token}&delivery=query")))
        .await;
    page.connected().await;
    wait_desktop(&page, &desk, "#336633").await;

    // Pointer: on the root window, then over the xterm. noVNC computes the framebuffer pixel
    // from the page coordinate; the X server must put the pointer exactly there.
    for (x, y) in [(650, 450), (123, 77)] {
        let (fx, fy) = page.mouse_move(x, y).await;
        assert!(
            (fx - i64::from(x)).abs() <= 1 && (fy - i64::from(y)).abs() <= 1,
            "page point maps to {fx},{fy}, wanted {x},{y}"
        );
        desk.wait_pointer(fx, fy).await;
    }

    // Keys: a line typed into the page arrives in the xterm (cat writes it at Enter).
    page.type_text("hello vncgate").await;
    page.press("Enter").await;
    desk.wait_typed("hello vncgate\n").await;

    // Selection: double-click "vncgate" (row 0, columns 6..12), paste PRIMARY with the middle
    // button into the xterm's input line, Enter: cat writes the selected word.
    let (x, y) = g.cell(0, 9).centre();
    page.click(x, y, "left", 2).await;
    let (mx, my) = g.cell(10, 40).centre();
    page.click(mx, my, "middle", 1).await;
    page.press("Enter").await;
    desk.wait_typed("hello vncgate\nvncgate\n").await;

    page.screenshot("input").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// 3. Token delivery the ways a web app embeds noVNC, with the Origin allowlist on: in the
/// WebSocket URL (`path=websockify?token=...`) and as a `bearer.<jwt>` subprotocol next to
/// `binary`. The same page from an origin not on the list is refused.
#[tokio::test]
async fn token_in_the_url_and_in_the_subprotocol_pass_the_origin_allowlist() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::start("delivery-desk", "#5a3c8c").await;
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let ctx = Context::new().await;

    for (delivery, source) in [("query", "query"), ("protocol", "subprotocol")] {
        let page = ctx.page(&format!("delivery-{delivery}")).await;
        let sid = format!("delivery-{delivery}");
        let token = jwt("alice", &sid, json!({}));
        page.goto(&gw.page_url(&format!("token={token}&delivery={delivery}")))
            .await;
        let state = page.connected().await;
        assert_eq!(state["desktopName"], "delivery-desk");
        page.wait_color([0x5a, 0x3c, 0x8c], None).await;
        let accepted = gw
            .wait_log(|v| v["event"] == "token_accepted" && v["session_id"] == sid.as_str())
            .await;
        assert_eq!(accepted["source"], source);
        page.screenshot(&format!("delivery_{delivery}")).await;
        page.assert_clean_console(&[]).await;
    }

    // The same viewer page and a valid token, but loaded from https://evil.test:PORT (Chromium
    // resolves evil.test to loopback): the browser sends that Origin, the gateway refuses the
    // upgrade with 403 and the page shows the disconnect (a refused upgrade is 1006 to scripts).
    let page = ctx.page("delivery-foreign-origin").await;
    let token = jwt("alice", "delivery-foreign", json!({}));
    page.goto(&format!(
        "https://evil.test:{}/#token={token}&delivery=query",
        gw.port
    ))
    .await;
    let state = page.disconnected().await;
    assert_eq!(state["closeCode"], 1006, "{state}");
    assert_eq!(state["attempts"], 1, "{state}");
    assert!(
        state["statusText"].as_str().unwrap_or("").contains("1006"),
        "{state}"
    );
    let rejected = gw
        .wait_log(|v| v["event"] == "upgrade_rejected" && v["code"] == "origin_denied")
        .await;
    assert_eq!(rejected["status"], 403);
    page.screenshot("delivery_foreign_origin").await;
    // Exactly the refusal: Chromium reports the 403, noVNC the socket closed while connecting.
    let seen = page
        .assert_clean_console(&[
            Allowed::chromium_ws_failed(
                &format!("wss://evil.test:{}/websockify", gw.port),
                "Error during WebSocket handshake: Unexpected response code: 403",
            ),
            Allowed::novnc_failed_connecting(),
        ])
        .await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    ctx.close().await;
}

/// 4a. Reload: the page comes back to the same desktop, and the xterm still shows what was typed
/// before (the same pixels in the text's rectangle).
#[tokio::test]
async fn reload_returns_to_the_same_desktop_and_xterm() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::with_xterm("reload-desk", "#2f6f8f").await;
    let g = desk.grid();
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("reload").await;
    let token = jwt("alice", "reload", json!({}));
    page.goto(&gw.page_url(&format!("token={token}&delivery=protocol")))
        .await;
    let before = page.connected().await;
    wait_desktop(&page, &desk, "#2f6f8f").await;

    let text = "persist me";
    page.type_text(text).await;
    page.press("Enter").await;
    desk.wait_typed("persist me\n").await;
    // The echo is on the canvas once its last cell has ink; hash the whole line then.
    let last = g.cell(0, text.len() as u32 - 1);
    page.call(
        "waitInk",
        json!({ "rects": [g.cell(0, 0), last], "timeoutMs": PAGE_WAIT_MS }),
    )
    .await;
    let line = g.span(0, 0, 12);
    let hash = page.region_hash(line).await;

    page.reload().await;
    let after = page.connected().await;
    assert_eq!(after["desktopName"], before["desktopName"]);
    page.wait_region_hash(line, &hash).await;
    assert_eq!(
        std::fs::read_to_string(&desk.typed).expect("typed"),
        "persist me\n"
    );
    let started = gw
        .wait_logs(2, |v| {
            v["event"] == "session_started" && v["session_id"] == "reload"
        })
        .await;
    assert_eq!(started[0]["backend"], started[1]["backend"]);
    page.screenshot("reload").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// 4b. The gateway restarts (SIGTERM: live sessions get 1001; while no gateway runs the page's
/// retries fail; then a new process on the same ports with the same secret) while noVNC has
/// `reconnect` on: it reconnects to the same desktop. The
/// pin lives in Redis; the session was placed on desk-b while its rendezvous choice is desk-a,
/// so only the stored pin can bring it back to desk-b.
#[tokio::test]
async fn gateway_restart_reconnects_novnc_to_the_same_desktop_through_redis() {
    let _shared = EXCLUSIVE.read().await;
    let redis = RedisServer::start().await.expect("redis");
    let (a, b) = (
        Desk::start("desk-a", "#aa3333").await,
        Desk::start("desk-b", "#33aa55").await,
    );
    let mut spec = GwSpec::new(vec![
        ("desk-a", a.xvnc.rfb_addr()),
        ("desk-b", b.xvnc.rfb_addr()),
    ]);
    spec.redis = Some(&redis);
    let mut gw = Gw::start("gw", spec).await;
    let occupant = occupy_desk_a(&gw).await;

    let sid = sid_placed_on_desk_a("restart");
    let ctx = Context::new().await;
    let page = ctx.page("restart").await;
    let token = jwt("alice", &sid, json!({}));
    page.goto(&gw.page_url(&format!(
        "token={token}&delivery=protocol&reconnect=1&reconnect_delay=200"
    )))
    .await;
    let first = page.connected().await;
    assert_eq!(
        first["desktopName"], "desk-b",
        "least loaded: desk-a is busy"
    );
    page.wait_color(rgb("#33aa55"), None).await;
    drop(occupant);

    gw.stop().await;
    let drained = gw
        .wait_log(|v| v["event"] == "session_ended" && v["session_id"] == sid.as_str())
        .await;
    assert_eq!(drained["close_code"], 1001, "{drained}");
    // The gateway stays down until the page has retried at least once in vain (so the
    // backoff path is exercised every run, not only when the restart happens to be slow).
    let down = page
        .wait_state(json!({ "state": "disconnected", "minAttempts": 2 }))
        .await;
    assert!(
        down["statusText"]
            .as_str()
            .unwrap_or("")
            .contains("reconnecting"),
        "{down}"
    );
    gw.restart().await;
    let again = page
        .wait_state(json!({ "state": "connected", "minAttempts": 3, "desktopName": "desk-b" }))
        .await;
    page.wait_color(rgb("#33aa55"), None).await;
    let codes: Vec<i64> = again["closeCodes"]
        .as_array()
        .expect("closeCodes")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert_eq!(
        codes.first(),
        Some(&1001),
        "drain closes with 1001: {again}"
    );
    // The attempts between the two processes failed without a WebSocket (1006).
    assert!(
        codes.len() >= 2 && codes[1..].iter().all(|&c| c == 1006),
        "{again}"
    );
    let restarted = gw
        .wait_log(|v| v["event"] == "session_started" && v["session_id"] == sid.as_str())
        .await;
    assert_eq!(restarted["backend"], "desk-b");
    page.screenshot("restart").await;
    // Allowed: one pair per reconnect attempt that hit no gateway (refused connection, or the
    // old process's listener while it exits): Chromium's failure and noVNC's.
    let failed = codes.len() - 1;
    let seen = page
        .assert_clean_console(&[
            Allowed::chromium_ws_failed(&gw.ws_endpoint(), ""),
            Allowed::novnc_failed_connecting(),
        ])
        .await;
    assert_eq!(seen.len(), 2 * failed, "{seen:?} for {codes:?}");
    eprintln!("restart: close codes seen by the page {codes:?}; expected console errors {seen:?}");
    ctx.close().await;
}

/// 4c. The backend dies (Xvnc SIGKILLed): the page sees the disconnect and the close code. An
/// idle Xvnc killed by the kernel sends FIN (its receive queue is empty), which the gateway
/// reports as "backend closed the session", 1000.
#[tokio::test]
async fn a_killed_backend_shows_the_disconnect_with_1000() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::start("doomed-desk", "#804020").await;
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("killed").await;
    let token = jwt("alice", "doomed", json!({}));
    page.goto(&gw.page_url(&format!("token={token}&delivery=protocol")))
        .await;
    page.connected().await;
    page.wait_color(rgb("#804020"), None).await;

    desk.crash();
    let state = page.disconnected().await;
    assert_eq!(state["closeCode"], 1000, "{state}");
    assert_eq!(state["closeReason"], "backend closed the session");
    let status = state["statusText"].as_str().unwrap_or("");
    assert!(
        status.contains("code 1000: backend closed the session"),
        "{status}"
    );
    let ended = gw.wait_log(|v| v["event"] == "session_ended").await;
    assert_eq!(ended["close_code"], 1000);
    assert_eq!(ended["closed_by"], "gateway");
    page.screenshot("backend_killed").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// A TCP round-robin balancer in front of the replicas (L4, TLS passes through): the i-th
/// connection that sends anything goes to `upstreams[i % n]`. Chromium may open a spare
/// connection it never uses; only connections that start speaking take a turn. Returns the
/// balancer's port and the replica index of every routed connection.
async fn round_robin(upstreams: Vec<u16>) -> (u16, Arc<Mutex<Vec<usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let routed = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    {
        let routed = Arc::clone(&routed);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (routed, next, upstreams) =
                    (Arc::clone(&routed), Arc::clone(&next), upstreams.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    if !matches!(client.peek(&mut first).await, Ok(n) if n > 0) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst) % upstreams.len();
                    routed.lock().expect("routed").push(i);
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstreams[i])).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
    }
    (port, routed)
}

/// 4d. Two replicas sharing Redis behind a balancer that alternates connections: every page
/// load lands on the other replica and reaches the same desktop.
#[tokio::test]
async fn two_replicas_behind_alternating_connections_serve_the_same_desktop() {
    let _shared = EXCLUSIVE.read().await;
    let redis = RedisServer::start().await.expect("redis");
    let (a, b) = (
        Desk::start("desk-a", "#aa3333").await,
        Desk::start("desk-b", "#33aa55").await,
    );
    let backends = vec![("desk-a", a.xvnc.rfb_addr()), ("desk-b", b.xvnc.rfb_addr())];
    // The page comes from replica 1; both replicas allow its origin.
    let port1 = free_port();
    let page_origin = format!("https://127.0.0.1:{port1}");
    let mut spec1 = GwSpec::new(backends.clone());
    spec1.redis = Some(&redis);
    let mut spec2 = GwSpec::new(backends);
    spec2.redis = Some(&redis);
    spec2.extra_origins = vec![page_origin];
    let (gw1, gw2) = tokio::join!(
        Gw::start_on("replica-1", port1, spec1),
        Gw::start("replica-2", spec2)
    );
    let (lb_port, routed) = round_robin(vec![gw1.port, gw2.port]).await;
    let _occupant = occupy_desk_a(&gw1).await;

    let sid = sid_placed_on_desk_a("replicas");
    let ctx = Context::new().await;
    let page = ctx.page("replicas").await;
    let token = jwt("alice", &sid, json!({}));
    page.goto(&gw1.page_url(&format!(
        "token={token}&delivery=protocol&host=127.0.0.1:{lb_port}"
    )))
    .await;
    for load in 0..4 {
        if load > 0 {
            page.reload().await;
        }
        let state = page.connected().await;
        assert_eq!(state["desktopName"], "desk-b", "load {load}: {state}");
        page.wait_color(rgb("#33aa55"), None).await;
    }
    assert_eq!(*routed.lock().expect("routed"), vec![0, 1, 0, 1]);
    let on1 = gw1
        .wait_logs(2, |v| {
            v["event"] == "session_started" && v["session_id"] == sid.as_str()
        })
        .await;
    let on2 = gw2
        .wait_logs(2, |v| {
            v["event"] == "session_started" && v["session_id"] == sid.as_str()
        })
        .await;
    for s in on1.iter().chain(&on2) {
        assert_eq!(s["backend"], "desk-b", "{s}");
    }
    assert_eq!(
        sessions_of(&gw1, &sid).len() + sessions_of(&gw2, &sid).len(),
        4
    );
    page.screenshot("replicas").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// 5. Isolation: two users in two browser contexts on two desktops each see only their own; the
/// second user's token carrying the first user's `sid` is refused and the page shows it.
#[tokio::test]
async fn two_users_see_only_their_own_desktops_and_cannot_take_each_others_session() {
    let _shared = EXCLUSIVE.read().await;
    let (a, b) = (
        Desk::start("desk-a", "#c03030").await,
        Desk::start("desk-b", "#30a050").await,
    );
    let gw = Gw::start(
        "gw",
        GwSpec::new(vec![
            ("desk-a", a.xvnc.rfb_addr()),
            ("desk-b", b.xvnc.rfb_addr()),
        ]),
    )
    .await;
    let (alice_ctx, bob_ctx) = (Context::new().await, Context::new().await);
    let alice = alice_ctx.page("alice").await;
    let bob = bob_ctx.page("bob").await;
    let alice_token = jwt("alice", "alice-desk", json!({ "backend": "desk-a" }));
    let bob_token = jwt("bob", "bob-desk", json!({ "backend": "desk-b" }));
    alice
        .goto(&gw.page_url(&format!("token={alice_token}&delivery=protocol")))
        .await;
    bob.goto(&gw.page_url(&format!("token={bob_token}&delivery=protocol")))
        .await;
    assert_eq!(alice.connected().await["desktopName"], "desk-a");
    assert_eq!(bob.connected().await["desktopName"], "desk-b");
    // All five sample points of each canvas show that user's desktop colour.
    alice.wait_color(rgb("#c03030"), None).await;
    bob.wait_color(rgb("#30a050"), None).await;

    // Bob, with a valid token of his own that names Alice's session.
    let thief = bob_ctx.page("bob-with-alices-sid").await;
    let stolen = jwt("bob", "alice-desk", json!({}));
    thief
        .goto(&gw.page_url(&format!("token={stolen}&delivery=protocol")))
        .await;
    let state = thief.disconnected().await;
    assert_eq!(state["closeCode"], 1006, "{state}");
    assert_eq!(state["desktopName"], Value::Null, "{state}");
    assert!(
        state["statusText"].as_str().unwrap_or("").contains("1006"),
        "{state}"
    );
    gw.wait_log(|v| v["event"] == "upgrade_rejected" && v["code"] == "session_owned_by_other_user")
        .await;
    // Alice's session is untouched.
    let alice_state = alice.snapshot().await;
    assert_eq!(alice_state["state"], "connected");
    assert_eq!(alice_state["attempts"], 1);
    alice.wait_color(rgb("#c03030"), None).await;

    alice.screenshot("isolation_alice").await;
    bob.screenshot("isolation_bob").await;
    thief.screenshot("isolation_refused").await;
    alice.assert_clean_console(&[]).await;
    bob.assert_clean_console(&[]).await;
    let seen = thief
        .assert_clean_console(&[
            Allowed::chromium_ws_failed(
                &gw.ws_endpoint(),
                "Error during WebSocket handshake: Unexpected response code: 403",
            ),
            Allowed::novnc_failed_connecting(),
        ])
        .await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    alice_ctx.close().await;
    bob_ctx.close().await;
}

/// 6. Token lifetime: a token that expires mid-session ends it with 4001; revoking a token's
/// `jti` ends its session with 4003. The viewer has reconnect on and does not retry either.
#[tokio::test]
async fn token_expiry_ends_the_session_with_4001_and_revocation_with_4003() {
    let _shared = EXCLUSIVE.read().await;
    let desk = Desk::start("lifetime-desk", "#406080").await;
    let mut spec = GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())]);
    spec.leeway_seconds = 0;
    let gw = Gw::start("gw", spec).await;
    let ctx = Context::new().await;

    // Expires 6 s from now: long enough to connect on a busy machine, short for a test.
    let expiring = ctx.page("expiring").await;
    let short = token_with_claims(&json!({ "sub": "carol", "sid": "expiring", "exp": now() + 6 }));
    expiring
        .goto(&gw.page_url(&format!("token={short}&delivery=protocol&reconnect=1")))
        .await;
    let revoked = ctx.page("revoked").await;
    let long = jwt("dave", "revoked", json!({ "jti": "jti-revoke-me" }));
    revoked
        .goto(&gw.page_url(&format!("token={long}&delivery=query&reconnect=1")))
        .await;
    expiring.connected().await;
    revoked.connected().await;
    revoked.wait_color(rgb("#406080"), None).await;

    let (status, body) = gw
        .admin("POST", "/admin/revoke", r#"{"jti":"jti-revoke-me"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    let state = revoked.disconnected().await;
    assert_eq!(state["closeCode"], 4003, "{state}");
    assert_eq!(state["closeReason"], "session kicked or token revoked");
    let text = state["statusText"].as_str().unwrap_or("");
    assert!(
        text.contains("code 4003") && !text.contains("reconnecting"),
        "{text}"
    );
    gw.wait_log(|v| {
        v["event"] == "session_ended" && v["session_id"] == "revoked" && v["close_code"] == 4003
    })
    .await;

    let state = expiring.disconnected().await;
    assert_eq!(state["closeCode"], 4001, "{state}");
    assert_eq!(state["closeReason"], "token expired");
    let text = state["statusText"].as_str().unwrap_or("");
    assert!(
        text.contains("code 4001") && !text.contains("reconnecting"),
        "{text}"
    );
    gw.wait_log(|v| {
        v["event"] == "session_ended" && v["session_id"] == "expiring" && v["close_code"] == 4001
    })
    .await;

    expiring.screenshot("token_expired").await;
    revoked.screenshot("token_revoked").await;
    expiring.assert_clean_console(&[]).await;
    revoked.assert_clean_console(&[]).await;
    ctx.close().await;
}

/// 8. Latency, printed (and written to target/e2e/latency.json), never asserted: key press in
/// the page -> the xterm's echo on the canvas, and xsetroot on the X side -> the new colour on
/// the canvas. Runs alone (the other scenarios wait) so the figures are not the neighbours'.
#[tokio::test]
async fn latency_key_press_and_x_change_to_canvas_are_measured() {
    let _alone = EXCLUSIVE.write().await;
    let desk = Desk::with_xterm("latency-desk", "#202020").await;
    let g = desk.grid();
    let gw = Gw::start("gw", GwSpec::new(vec![("desk", desk.xvnc.rfb_addr())])).await;
    let ctx = Context::new().await;
    let page = ctx.page("latency").await;
    let token = jwt("alice", "latency", json!({}));
    page.goto(&gw.page_url(&format!("token={token}&delivery=protocol")))
        .await;
    page.connected().await;
    wait_desktop(&page, &desk, "#202020").await;

    let keys: Vec<String> = (0..LATENCY_SAMPLES)
        .map(|i| ((b'a' + (i % 26) as u8) as char).to_string())
        .collect();
    let cells: Vec<Rect> = (0..LATENCY_SAMPLES as u32).map(|c| g.cell(0, c)).collect();
    let key_ms = page
        .call(
            "keyLatency",
            json!({ "cells": cells, "keys": keys, "timeoutMs": PAGE_WAIT_MS }),
        )
        .await;
    page.press("Enter").await;
    desk.wait_typed(&format!("{}\n", keys.concat())).await;

    let palette = ["#c04040", "#40c040", "#4040c0", "#c0c040"];
    let colors: Vec<Value> = (0..LATENCY_SAMPLES)
        .map(|i| {
            let hex = palette[i % palette.len()];
            json!({ "hex": hex, "rgb": rgb(hex) })
        })
        .collect();
    let x_ms = page
        .call(
            "xLatency",
            json!({
                "display": desk.display(),
                "colors": colors,
                "points": ROOT_POINTS,
                "timeoutMs": PAGE_WAIT_MS,
            }),
        )
        .await;

    let key: Vec<f64> = key_ms
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let x: Vec<f64> = x_ms
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!((key.len(), x.len()), (LATENCY_SAMPLES, LATENCY_SAMPLES));
    let (km, kp) = summary(&key);
    let (xm, xp) = summary(&x);
    let line = format!(
        "latency through vncgate (wss, this build): key press -> pixel median {km:.1} ms p95 {kp:.1} ms; \
         X change -> pixel median {xm:.1} ms p95 {xp:.1} ms ({LATENCY_SAMPLES} samples each)"
    );
    eprintln!("{line}");
    let dir = root().join("target/e2e");
    std::fs::create_dir_all(&dir).expect("target/e2e");
    std::fs::write(
        dir.join("latency.json"),
        json!({
            "key_to_pixel_ms": { "median": km, "p95": kp, "samples": key },
            "x_change_to_pixel_ms": { "median": xm, "p95": xp, "samples": x },
        })
        .to_string(),
    )
    .expect("latency.json");
    page.screenshot("latency").await;
    page.assert_clean_console(&[]).await;
    ctx.close().await;
}
