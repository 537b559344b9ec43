//! Configuration: the YAML file schema (`file`), its validation with key paths (`validate`), and the
//! resolved internal [`Config`] that the rest of vncgate reads.
//!
//! Why two layers: the file schema mirrors what operators write (strings, optional keys, `*_env`
//! names), while the internal config holds what the code needs (parsed addresses, typed durations,
//! secrets already read). Only this module knows about the file; every other module reads `Config`.

mod file;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use jsonwebtoken::Algorithm;
use validate::Environment;
/// `host:port` as the config accepts it (a DNS name, an IPv4 address, or `[IPv6]`).
pub(crate) use validate::backend_addr as parse_backend_addr;
/// A pool or backend name as the config accepts it (`[A-Za-z0-9._-]{1,64}`).
pub(crate) use validate::is_valid_name;
pub use validate::{ConfigError, ConfigErrors};

/// A secret read from the environment. Its `Debug` never shows the value, so a config dump in a
/// log line cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The resolved configuration. Built once at start (and again on reload); never mutated.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub listeners: Vec<ListenerConfig>,
    /// Request paths (exact match, no query) that accept the WebSocket upgrade.
    pub paths: Vec<String>,
    pub web_root: Option<PathBuf>,
    /// `GET` on this path (exact, no query) streams the token's session events (contract §14).
    pub events_path: String,
    pub admin: Option<AdminConfig>,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    /// Pools by name; `BTreeMap` so iteration order (logs, metrics) is stable.
    pub pools: BTreeMap<String, PoolConfig>,
    pub limits: Limits,
    pub logging: LoggingConfig,
    /// `recording:` (contract §12); `dir: None` = recording off.
    pub recording: RecordingConfig,
    /// Hash of the YAML text (hex xxh3), for `vncgate_config_info{hash}` and reload logs.
    pub hash: String,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
    /// On shutdown or upgrade, live sessions are kept this long, then closed with 1001.
    pub drain: Duration,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// `Some`: every connection must start with a PROXY protocol v1/v2 header, accepted only
    /// from a peer in these networks; the address it carries is the client's everywhere.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// `None` when `token_env` is unset in the file: `/admin/*` then answers 401 to everyone.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExpiry {
    Close,
    Keep,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Allowed algorithms, from config only: the token header never widens this set.
    pub algorithms: Vec<Algorithm>,
    pub secret: Option<Secret>,
    pub public_key_files: Vec<PathBuf>,
    pub jwks_url: Option<String>,
    /// Keys fetched from `jwks_url` are refetched this often (a removed key stops working then).
    pub jwks_cache: Duration,
    /// An unknown `kid` triggers a refetch at most this often, so bad tokens cannot make vncgate
    /// hammer the identity provider.
    pub jwks_min_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub allowed_origins: Vec<String>,
    pub on_expiry: OnExpiry,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreKind {
    Memory,
    Redis { topology: RedisTopology },
}

/// How the gateway finds the Redis that holds the shared state (contract §13).
#[derive(Debug, Clone, PartialEq)]
pub enum RedisTopology {
    /// One server (or a proxy in front of one), `store.redis_url_env`.
    Standalone { url: Secret },
    /// The master named `master_name`, as the sentinels at `urls` report it (asked again on
    /// every reconnect, so a failover is followed).
    Sentinel {
        master_name: String,
        urls: Vec<Secret>,
    },
    /// A Redis Cluster reached through these seed nodes.
    Cluster { urls: Vec<Secret> },
}

impl RedisTopology {
    /// The label of `vncgate_store_topology` and the `store.topology` value.
    pub fn name(&self) -> &'static str {
        match self {
            RedisTopology::Standalone { .. } => "standalone",
            RedisTopology::Sentinel { .. } => "sentinel",
            RedisTopology::Cluster { .. } => "cluster",
        }
    }
}

/// Where a pool's backends come from (contract §13, `pools.*.discovery`).
#[derive(Debug, Clone)]
pub enum Discovery {
    /// The `backends` list of the config file.
    Static,
    /// The token's `backend` claim (required) names the backend; it must match `name_pattern`
    /// and fills `{backend}` in `addr_template`, resolved at upgrade time.
    Dns {
        addr_template: String,
        name_pattern: NamePattern,
    },
    /// Backends added and removed through the admin API, kept in the store.
    Registry { name_pattern: NamePattern },
}

impl Discovery {
    /// The `discovery.kind` value.
    pub fn kind(&self) -> &'static str {
        match self {
            Discovery::Static => "static",
            Discovery::Dns { .. } => "dns",
            Discovery::Registry { .. } => "registry",
        }
    }

    pub fn is_dynamic(&self) -> bool {
        !matches!(self, Discovery::Static)
    }

    pub fn name_pattern(&self) -> Option<&NamePattern> {
        match self {
            Discovery::Static => None,
            Discovery::Dns { name_pattern, .. } | Discovery::Registry { name_pattern } => {
                Some(name_pattern)
            }
        }
    }
}

/// `name_pattern`, matched against the whole name: the configured text is anchored, so a
/// pattern written as `[a-z]+` cannot be satisfied by a name with a `:` or `/` somewhere in it.
#[derive(Debug, Clone)]
pub struct NamePattern {
    pub text: String,
    regex: regex::Regex,
}

impl NamePattern {
    pub fn new(text: &str) -> Result<NamePattern, regex::Error> {
        let regex = regex::Regex::new(&format!("^(?:{text})$"))?;
        Ok(NamePattern {
            text: text.to_owned(),
            regex,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub key_prefix: String,
    pub session_idle_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub backends: Vec<BackendConfig>,
    pub failover: bool,
    /// Active health checks of this pool's backends; `None` = off (a backend then counts as
    /// up, and a failed connect answers 502).
    pub health_check_interval: Option<Duration>,
    pub health_check: HealthCheck,
    pub rfb: RfbConfig,
    /// The pool's clipboard ceiling; a token's `clipboard` claim narrows it.
    pub clipboard: Clipboard,
    pub discovery: Discovery,
    /// The pool's own credentials (`rfb.password_env`, `rfb.username_env`): what dynamic
    /// backends, which have no entry of their own, are logged in with.
    pub credentials: RfbCredentials,
}

pub use crate::rfb::policy::Clipboard;

/// What an active health check does (contract §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheck {
    /// A TCP connect. Servers with a pre-authentication blacklist (TigerVNC) count each one as
    /// a failed login from the gateway's address.
    Tcp,
    /// The RFB handshake through ServerInit with the pool's credentials, then a clean close.
    Rfb,
}

/// How the gateway treats the RFB stream of a pool's sessions (contract §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RfbMode {
    /// The gateway does the backend handshake itself and is the RFB server for the browser.
    Terminate,
    /// Bytes relayed untouched (the first wave's behaviour).
    Transparent,
}

#[derive(Debug, Clone)]
pub struct RfbConfig {
    pub mode: RfbMode,
    /// VeNCrypt X509* to the backends: the client config trusting `rfb.tls.ca_file`.
    pub tls: Option<RfbTls>,
}

#[derive(Debug, Clone)]
pub struct RfbTls {
    pub client: std::sync::Arc<rustls::ClientConfig>,
    /// The name the backend certificates are checked against; `None` = each backend's host.
    pub server_name: Option<String>,
}

/// The credentials the gateway presents to one backend (the pool's, or the backend's own).
#[derive(Debug, Clone, Default)]
pub struct RfbCredentials {
    pub password: Option<Secret>,
    pub username: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendProtocol {
    /// Raw RFB over TCP (a VNC server's own port).
    Rfb,
    /// A backend that itself speaks RFB over WebSocket (e.g. a websockify in front of a desktop).
    WebSocket { path: String },
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    /// `host:port`; a host name is resolved at connect time so DNS changes are followed.
    pub addr: BackendAddr,
    pub protocol: BackendProtocol,
    /// Terminate mode: what the gateway answers the backend's security handshake with.
    pub credentials: RfbCredentials,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_sessions_per_user: usize,
    pub auth_failures_per_minute: u32,
    /// `None` = off.
    pub idle_timeout: Option<Duration>,
    pub max_message_bytes: usize,
    /// Process-wide: bytes of unfinished client messages that sessions may hold beyond one
    /// read chunk each (src/bridge/budget.rs); a session that needs more is closed with 1009.
    pub message_buffer_budget_bytes: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// From accept (after the TLS handshake) to the end of the request head; on a keep-alive
    /// connection, from the first byte of the next request.
    pub head_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// A request head above this is answered 400 without being parsed.
    pub max_head_bytes: usize,
    /// Connections that have not (yet) presented a valid token: in total, and per client address.
    pub max_pre_auth_connections: usize,
    pub max_pre_auth_connections_per_address: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

/// When a connection is recorded (`recording.when`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordWhen {
    /// Every connection.
    Always,
    /// Only connections whose token carries `record: true`.
    Claim,
}

/// What the `.jsonl` audit file holds besides session events (`recording.input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordInput {
    None,
    /// Pointer clicks with coordinates.
    Pointer,
    /// Pointer clicks and keys.
    Keys,
}

#[derive(Debug, Clone)]
pub struct RecordingConfig {
    /// Where recordings go; `None` = recording off.
    pub dir: Option<PathBuf>,
    pub when: RecordWhen,
    pub input: RecordInput,
    /// Server->client bytes written to one connection's `.fbs` at most; beyond it the
    /// recording stops (marked incomplete, reason `max_bytes`) while the session goes on.
    pub max_bytes_per_session: u64,
    /// Day directories older than this are removed by the retention sweep.
    pub retention_days: u32,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            dir: None,
            when: RecordWhen::Claim,
            input: RecordInput::Pointer,
            max_bytes_per_session: 1 << 30,
            retention_days: 30,
        }
    }
}

impl Config {
    /// Read and validate a config file, reading secrets from the process environment.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
        let text = read(path)?;
        Config::from_yaml(&text, &|name| std::env::var(name).ok())
    }

    /// Parse and validate YAML text; `env` looks up the variables named by `*_env` keys (tests pass
    /// their own lookup instead of mutating the process environment).
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut config = check(text, Environment::Target(env))?;
        config.hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
        Ok(config)
    }

    /// `check-config --lint`: check a config file alone, as a CI job can before a deploy: the
    /// schema, every key, ranges and cross-key rules, but neither the files it names (read
    /// nowhere) nor the variables its `*_env` keys name (only checked to be variable names).
    /// There is no `Config` to return: its secrets and certificates were never read.
    pub fn lint(path: &std::path::Path) -> Result<(), ConfigErrors> {
        Config::lint_yaml(&read(path)?)
    }

    /// [`Config::lint`] on YAML text.
    pub fn lint_yaml(text: &str) -> Result<(), ConfigErrors> {
        check(text, Environment::Lint).map(drop)
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.get(name)
    }
}

fn read(path: &std::path::Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::single("", format!("cannot read {}: {e}", path.display())))
}

/// Every problem of the file at once: its unknown keys and what validation finds, in file order.
fn check(text: &str, env: Environment<'_>) -> Result<Config, ConfigErrors> {
    let file::Parsed { raw, unknown_keys } = file::parse(text)?;
    let resolved = validate::resolve(raw, env);
    if unknown_keys.is_empty() {
        return resolved;
    }
    let problems = resolved.err().map(|e| e.0).unwrap_or_default();
    Err(ConfigErrors(file::in_file_order(
        text,
        unknown_keys,
        problems,
    )))
}
