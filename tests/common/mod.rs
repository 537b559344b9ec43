//! Test harness: the real `vncgate` binary as a child process, configured per test, with its
//! JSON log lines captured so tests await events (`listening`, `session_ended`) instead of
//! sleeping. Fixtures: an in-process RFB server, an RFB-over-WebSocket client, a real Xvnc.
#![allow(dead_code)]

pub mod browser;
pub mod desktop;
pub mod fault_proxy;
pub mod jwks_server;
pub mod log_tail;
pub mod netns;
pub mod redis_server;
pub mod redis_topology;
pub mod rfb_client;
pub mod rfb_server;
pub mod x11vnc;
pub mod xvnc;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;

use std::time::Duration;

use serde_json::Value;

use tokio::process::{Child, Command};

pub const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// A guard against a hung test, not a timing assertion: every awaited event normally arrives in
/// milliseconds.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A free TCP port on loopback for a gateway to bind (bound and released here; the gateway
/// binds it right after).
///
/// Not `bind(0)`: a port from the kernel's ephemeral range, once released, can be handed to a
/// fixture's `bind(0)` or a client socket before the gateway binds it; Pingora then retries
/// the bind while its readiness probe reaches the fixture. So ports come from below the
/// ephemeral range (Linux: 32768+), each handed out once per test process, starting at an
/// offset derived from the pid so consecutive test binaries do not reuse each other's ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// One backend in the generated config.
pub struct BackendSpec {
    pub name: String,
    pub addr: String,
    pub websocket_path: Option<String>,
    /// Speaks RFB (a VNC server or the RFB fixture), as opposed to a byte fixture (flood, echo)
    /// that only a transparent pool can relay.
    pub speaks_rfb: bool,
    /// The name of the environment variable with this backend's own VNC password.
    pub password_env: Option<String>,
}

impl BackendSpec {
    /// A VNC server (or the in-process RFB fixture): the pool terminates RFB, as by default.
    pub fn rfb(name: &str, addr: impl ToString) -> Self {
        BackendSpec {
            name: name.into(),
            addr: addr.to_string(),
            websocket_path: None,
            speaks_rfb: true,
            password_env: None,
        }
    }

    /// A byte fixture (flood source, echo) that does not speak RFB: the pool relays bytes
    /// untouched (`rfb.mode: transparent`) and does not health-check it, since a check's
    /// connection would be one more stream in the fixture's digests.
    pub fn raw(name: &str, addr: impl ToString) -> Self {
        BackendSpec {
            speaks_rfb: false,
            ..BackendSpec::rfb(name, addr)
        }
    }

    /// The right spec for an in-process fixture: RFB or raw bytes.
    pub fn fixture(name: &str, server: &rfb_server::RfbServer) -> Self {
        if server.speaks_rfb {
            BackendSpec::rfb(name, server.addr)
        } else {
            BackendSpec::raw(name, server.addr)
        }
    }

    pub fn with_password_env(mut self, name: &str) -> Self {
        self.password_env = Some(name.into());
        self
    }
}

/// The `rfb:` section of the default pool (contract §11).
#[derive(Default, Clone)]
pub struct RfbSpec {
    /// `None`: the mode follows the backends (terminate unless one of them is raw).
    pub mode: Option<&'static str>,
    pub password_env: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// The shared store of a gateway (contract §13 `store.topology`): its YAML and environment.
#[derive(Clone, Debug)]
pub enum StoreSpec {
    Standalone(String),
    Sentinel { master: String, urls: Vec<String> },
    Cluster { urls: Vec<String> },
}

impl StoreSpec {
    /// The `store:` keys after `kind: redis`, indented by 2 spaces.
    fn yaml(&self) -> String {
        match self {
            StoreSpec::Standalone(_) => "  topology: standalone\n".into(),
            StoreSpec::Sentinel { master, .. } => format!(
                "  topology: sentinel\n  sentinel: {{ master_name: {master}, urls_env: VNCGATE_SENTINEL_URLS }}\n"
            ),
            StoreSpec::Cluster { .. } => {
                "  topology: cluster\n  cluster: { urls_env: VNCGATE_REDIS_CLUSTER_URLS }\n".into()
            }
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        match self {
            StoreSpec::Standalone(_) => Vec::new(),
            StoreSpec::Sentinel { urls, .. } => {
                vec![("VNCGATE_SENTINEL_URLS".into(), urls.join(","))]
            }
            StoreSpec::Cluster { urls } => {
                vec![("VNCGATE_REDIS_CLUSTER_URLS".into(), urls.join(","))]
            }
        }
    }

    fn standalone_url(&self) -> Option<String> {
        match self {
            StoreSpec::Standalone(url) => Some(url.clone()),
            _ => None,
        }
    }
}

/// The knobs tests turn; everything else is a sensible default.
pub struct GatewayConfig {
    pub backends: Vec<BackendSpec>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub web_root: Option<PathBuf>,
    /// Extra YAML appended verbatim (e.g. a `limits:` section).
    pub extra: String,
    /// Extra YAML keys of the `default` pool, one per line, already indented by 4 spaces.
    pub pool_extra: String,
    pub rfb: RfbSpec,
    /// `clipboard:` of the default pool; `None` = the default (`both`).
    pub clipboard: Option<&'static str>,
    /// Environment variables the gateway gets (VNC passwords named by `*_env` keys).
    pub env: Vec<(String, String)>,
    /// The lines of the `auth:` section, indented by 2 spaces.
    pub auth: String,
    pub drain_seconds: u64,
    /// `Some(url)`: `store.kind: redis` with this URL (and the start waits for the store to
    /// connect); `None`: the embedded store.
    pub redis_url: Option<String>,
    /// `Some(spec)`: `store.kind: redis` with this topology (wins over `redis_url`).
    pub store: Option<StoreSpec>,
    /// Whether `start` waits for `store_connected` (off for a Redis that is down on purpose).
    pub await_store: bool,
    pub session_idle_ttl_seconds: u64,
    /// `Some(trusted)`: the listener takes a PROXY protocol header from these networks.
    pub proxy_protocol: Option<Vec<String>>,
    /// `Some`: the default pool's backends are found at run time (then `backends` is empty).
    pub discovery: Option<DiscoverySpec>,
}

/// `pools.default.discovery` (contract §13).
pub enum DiscoverySpec {
    /// Backends registered through `PUT /admin/pools/default/backends/{name}`.
    Registry,
    /// The token's `backend` claim fills `{backend}` in the template.
    Dns { addr_template: String },
}

impl DiscoverySpec {
    fn yaml(&self) -> String {
        match self {
            DiscoverySpec::Registry => "    discovery: { kind: registry }
"
            .into(),
            DiscoverySpec::Dns { addr_template } => {
                format!("    discovery: {{ kind: dns, addr_template: \"{addr_template}\" }}\n")
            }
        }
    }
}

impl GatewayConfig {
    pub fn new(backends: Vec<BackendSpec>) -> Self {
        // Health checks as a user runs them (the default interval and kind): turning them off
        // is how TigerVNC's lock-out of the gateway stayed hidden. Byte fixtures are the
        // exception (see `BackendSpec::raw`).
        GatewayConfig {
            backends,
            tls: None,
            web_root: None,
            extra: String::new(),
            pool_extra: String::new(),
            rfb: RfbSpec::default(),
            clipboard: None,
            env: Vec::new(),
            auth: "  algorithms: [HS256]\n  secret_env: VNCGATE_JWT_SECRET\n".into(),
            drain_seconds: 5,
            redis_url: None,
            store: None,
            await_store: true,
            session_idle_ttl_seconds: 3600,
            proxy_protocol: None,
            discovery: None,
        }
    }
}

/// Start `vncgate run --config CONFIG` with the tests' secrets, its stderr collected.
pub fn spawn_vncgate(
    label: &str,
    config: &std::path::Path,
    redis_url: Option<&str>,
    extra_args: &[&str],
) -> (Child, log_tail::LogTail) {
    spawn_vncgate_with_env(label, config, redis_url, &[], extra_args)
}

/// [`spawn_vncgate`] with extra environment variables (VNC passwords).
pub fn spawn_vncgate_with_env(
    label: &str,
    config: &std::path::Path,
    redis_url: Option<&str>,
    env: &[(String, String)],
    extra_args: &[&str],
) -> (Child, log_tail::LogTail) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(["run", "--config"])
        .arg(config)
        .args(extra_args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("VNCGATE_JWT_SECRET", SECRET)
        .env("VNCGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("VNCGATE_REDIS_URL", redis_url.unwrap_or_default())
        .env_remove("VNCGATE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn vncgate");
    let stderr = child.stderr.take().expect("stderr");
    (child, log_tail::LogTail::capture(label, stderr))
}

pub struct Gateway {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    /// The directory of the config file, pid file and upgrade socket; owned by the first
    /// process started with it (an upgraded successor shares it).
    pub dir: Option<tempfile::TempDir>,
    pub config_path: PathBuf,
    redis_url: Option<String>,
    env: Vec<(String, String)>,
    logs: log_tail::LogTail,
}

/// The default pool's keys the typed fields of [`GatewayConfig`] stand for, indented for the
/// pool mapping.
fn pool_section(cfg: &GatewayConfig) -> String {
    let raw = cfg
        .backends
        .iter()
        .any(|b| !b.speaks_rfb || b.websocket_path.is_some());
    let mode = cfg
        .rfb
        .mode
        .unwrap_or(if raw { "transparent" } else { "terminate" });
    let mut rfb = vec![format!("mode: {mode}")];
    if let Some(env) = &cfg.rfb.password_env {
        rfb.push(format!("password_env: {env}"));
    }
    if let Some(ca) = &cfg.rfb.ca_file {
        let name = cfg
            .rfb
            .server_name
            .as_ref()
            .map(|n| format!(", server_name: \"{n}\""))
            .unwrap_or_default();
        rfb.push(format!("tls: {{ ca_file: \"{}\"{name} }}", ca.display()));
    }
    let mut out = format!("    rfb: {{ {} }}\n", rfb.join(", "));
    if let Some(clipboard) = cfg.clipboard {
        out.push_str(&format!("    clipboard: {clipboard}\n"));
    }
    if cfg.backends.iter().any(|b| !b.speaks_rfb) {
        out.push_str("    health_check_interval_seconds: 0\n");
    }
    out
}

impl Gateway {
    pub async fn start(cfg: GatewayConfig) -> Gateway {
        let port = free_port();
        let admin_port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut backends = String::new();
        for b in &cfg.backends {
            let password = b
                .password_env
                .as_ref()
                .map(|e| format!(", password_env: {e}"))
                .unwrap_or_default();
            match &b.websocket_path {
                None => backends.push_str(&format!(
                    "      - {{ name: {}, addr: \"{}\"{password} }}\n",
                    b.name, b.addr
                )),
                Some(p) => backends.push_str(&format!(
                    "      - {{ name: {}, addr: \"{}\", protocol: websocket, path: \"{}\" }}\n",
                    b.name, b.addr, p
                )),
            }
        }
        let mut pool_extra = format!("{}{}", pool_section(&cfg), cfg.pool_extra);
        if let Some(discovery) = &cfg.discovery {
            pool_extra.push_str(&discovery.yaml());
            backends = "      []\n".into();
        }
        let mut listener = match &cfg.tls {
            None => format!("  - addr: \"127.0.0.1:{port}\"\n"),
            Some((cert, key)) => format!(
                "  - addr: \"127.0.0.1:{port}\"\n    tls: {{ cert: \"{}\", key: \"{}\" }}\n",
                cert.display(),
                key.display()
            ),
        };
        if let Some(trusted) = &cfg.proxy_protocol {
            listener.push_str(&format!(
                "    proxy_protocol: true\n    trusted_proxies: {}\n",
                serde_json::to_string(trusted).expect("json list")
            ));
        }
        let web_root = cfg
            .web_root
            .as_ref()
            .map(|p| format!("\"{}\"", p.display()))
            .unwrap_or("null".into());
        let yaml = format!(
            "server:\n  threads: 2\n  drain_seconds: {drain}\n  pid_file: \"{d}/vncgate.pid\"\n  upgrade_sock: \"{d}/upgrade.sock\"\n\
             listeners:\n{listener}\
             paths: [\"/websockify\"]\n\
             web_root: {web_root}\n\
             admin:\n  addr: \"127.0.0.1:{admin_port}\"\n  token_env: VNCGATE_ADMIN_TOKEN\n\
             auth:\n{auth}\
             pools:\n  default:\n{pool_extra}    backends:\n{backends}\
             store:\n  kind: {store_kind}\n{store_topology}  session_idle_ttl_seconds: {idle_ttl}\n\
             logging:\n  format: json\n  level: debug\n{extra}",
            store_kind = if cfg.redis_url.is_some() || cfg.store.is_some() {
                "redis"
            } else {
                "memory"
            },
            store_topology = cfg.store.as_ref().map(StoreSpec::yaml).unwrap_or_default(),
            idle_ttl = cfg.session_idle_ttl_seconds,
            drain = cfg.drain_seconds,
            d = dir.path().display(),
            extra = cfg.extra,
            auth = cfg.auth,
        );
        let config_path = dir.path().join("vncgate.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        let (redis_url, env) = match &cfg.store {
            Some(spec) => {
                let mut env = cfg.env.clone();
                env.extend(spec.env());
                (spec.standalone_url().or(cfg.redis_url.clone()), env)
            }
            None => (cfg.redis_url.clone(), cfg.env.clone()),
        };
        let mut gw = Gateway::spawn(&config_path, port, admin_port, redis_url, &env, &[]);
        gw.dir = Some(dir);
        gw.wait_log(|v| v["event"] == "listening" && v["addr"] == format!("127.0.0.1:{port}"))
            .await;
        gw.wait_log(|v| {
            v["event"] == "listening" && v["addr"] == format!("127.0.0.1:{admin_port}")
        })
        .await;
        if (cfg.redis_url.is_some() || cfg.store.is_some()) && cfg.await_store {
            gw.wait_log(|v| v["event"] == "store_connected").await;
        }
        gw
    }

    /// Start the binary on an existing config file (`extra_args`: e.g. `--upgrade`).
    fn spawn(
        config_path: &std::path::Path,
        port: u16,
        admin_port: u16,
        redis_url: Option<String>,
        env: &[(String, String)],
        extra_args: &[&str],
    ) -> Gateway {
        let (child, logs) = spawn_vncgate_with_env(
            "gateway",
            config_path,
            redis_url.as_deref(),
            env,
            extra_args,
        );
        Gateway {
            child,
            port,
            admin_port,
            dir: None,
            config_path: config_path.to_owned(),
            redis_url,
            env: env.to_vec(),
            logs,
        }
    }

    /// A successor process started with `--upgrade` on the same config: it takes the
    /// listening sockets once this one is sent SIGQUIT.
    pub fn spawn_upgrade(&self) -> Gateway {
        Gateway::spawn(
            &self.config_path,
            self.port,
            self.admin_port,
            self.redis_url.clone(),
            &self.env,
            &["--upgrade"],
        )
    }

    /// Edit the config file in place (then send SIGHUP to apply it).
    pub fn rewrite_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        std::fs::write(&self.config_path, edit(text)).expect("write config");
    }

    /// The first log line matching `pred`, waiting for it if it has not been written yet.
    pub async fn wait_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_logs(1, pred).await.remove(0)
    }

    /// Wait until at least `n` log lines match `pred`; returns them all.
    pub async fn wait_logs(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.logs.wait_logs(n, pred).await
    }

    pub fn logs(&self) -> Vec<Value> {
        self.logs.logs()
    }

    pub fn raw_logs(&self) -> Vec<String> {
        self.logs.raw()
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/websockify{query}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(EVENT_TIMEOUT, self.child.wait())
            .await
            .expect("gateway did not exit")
            .expect("wait")
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path, &[]).await
    }

    /// An authenticated admin call: (status, body).
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

    /// One Prometheus sample value, e.g. `metric("vncgate_upgrades_total{result=\"ok\"}")`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("series {series} not in /metrics:\n{body}"))
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http_request(port, "GET", path, headers, "").await
}

/// Any method, with a body (sent with Content-Length when not empty): (status, body).
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An HS256 token for the test secret.
pub fn token(sub: &str, sid: Option<&str>) -> String {
    let req = vncgate::auth::mint::TokenRequest {
        sub: sub.into(),
        sid: sid.map(Into::into),
        ttl: Duration::from_secs(600),
        ..Default::default()
    };
    vncgate::auth::mint::mint_hs256(SECRET.as_bytes(), &req).expect("mint")
}

/// Sign arbitrary claims (for refusal cases).
pub fn token_with_claims(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

pub fn now() -> u64 {
    vncgate::auth::mint::now_unix()
}

/// A live RFB session through a gateway: the WebSocket and what the handshake told.
pub struct Live {
    pub ws: rfb_client::WsClient,
    pub session: rfb_client::RfbSession,
}

/// Upgrade with `connect` and complete the RFB handshake.
pub async fn open_with(connect: rfb_client::WsConnect) -> Live {
    let (mut ws, _) = rfb_client::connect(&connect).await.expect("upgrade");
    let session = rfb_client::rfb_handshake(&mut ws).await.expect("handshake");
    Live { ws, session }
}

/// Open a session with the token in the query string.
pub async fn open_session(gw: &Gateway, token: &str) -> Live {
    open_with(rfb_client::WsConnect::new(
        gw.ws_url(&format!("?token={token}")),
    ))
    .await
}

/// Upgrade by hand over raw TCP and return the socket: a peer we can make misbehave in ways no
/// WebSocket library allows (never read, never answer a ping: a half-open connection).
pub async fn raw_upgrade(gw: &Gateway, sub: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    let request = format!(
        "GET /websockify?token={} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(sub, None)
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.expect("read"),
            1,
            "closed during upgrade"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// `n` RFB desktops named d0, d1, ... (8x8, a different colour each).
pub async fn desks(n: usize) -> Vec<rfb_server::RfbServer> {
    let mut out = Vec::new();
    for i in 0..n {
        let mode = rfb_server::Mode::Rfb {
            name: format!("d{i}"),
            width: 8,
            height: 8,
            rgb: [i as u8, 0, 0],
        };
        out.push(rfb_server::RfbServer::start(mode).await.expect("fixture"));
    }
    out
}
