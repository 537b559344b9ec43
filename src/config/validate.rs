//! Turns the raw file into the resolved [`Config`]: applies the defaults of contract §2 and checks
//! every value. Problems are collected, never returned one at a time, so `check-config` shows an
//! operator everything to fix in one run; each names its key path (`listeners[0].tls.cert`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::file::{
    OrderedMap, RawAdmin, RawAuth, RawBackend, RawConfig, RawDiscovery, RawLimits, RawListener,
    RawLogging, RawPool, RawRecording, RawServer, RawStore,
};
#[path = "validate_rfb.rs"]
mod rfb;
use super::{
    AdminConfig, Algorithm, AuthConfig, BackendAddr, BackendConfig, BackendProtocol, Config,
    Discovery, Limits, ListenerConfig, LogFormat, LoggingConfig, NamePattern, OnExpiry, PoolConfig,
    RecordInput, RecordWhen, RecordingConfig, RedisTopology, RfbCredentials, Secret,
    ServerSettings, StoreConfig, StoreKind, TlsFiles,
};

/// One problem in the config, tied to the key it concerns (empty when it concerns the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one config; displayed one per line, as `check-config` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn single(key: &str, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError::new(key, message)])
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

const DEFAULT_SECRET_ENV: &str = "VNCGATE_JWT_SECRET";
const DEFAULT_REDIS_URL_ENV: &str = "VNCGATE_REDIS_URL";
const DEFAULT_SENTINEL_MASTER: &str = "vncgate";
const DEFAULT_SENTINEL_URLS_ENV: &str = "VNCGATE_SENTINEL_URLS";
const DEFAULT_CLUSTER_URLS_ENV: &str = "VNCGATE_REDIS_CLUSTER_URLS";
/// Below this an HS* key can be brute-forced offline from a single captured token.
const MIN_SECRET_BYTES: usize = 32;
const MAX_LEEWAY_SECONDS: u64 = 300;
/// Range for counts (threads, sessions, rates): at least one, and small enough for `u32`/`usize`.
const COUNT: RangeInclusive<u64> = 1..=u32::MAX as u64;
/// Range for intervals that must not be zero. Thirty days is far beyond any sensible value
/// and keeps every `Instant + Duration` the runtime computes from overflowing.
const SECONDS: RangeInclusive<u64> = 1..=MAX_SECONDS;
const MAX_SECONDS: u64 = 30 * 24 * 3600;
const MAX_MESSAGE_BYTES: u64 = 256 * 1024 * 1024;

/// The algorithms vncgate accepts. Deliberately narrower than `jsonwebtoken::Algorithm`: `none`
/// has no entry at all, and PS384/PS512/ES512 are left out.
const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// What validation may consult beyond the file itself.
#[derive(Clone, Copy)]
pub(super) enum Environment<'a> {
    /// Where the config is about to run: every file it names must be readable, every variable its
    /// `*_env` keys name set and non-empty, and the values usable (secret length, Redis URL). The
    /// function looks a variable up (tests pass their own instead of the process environment).
    Target(&'a dyn Fn(&str) -> Option<String>),
    /// The file alone (`check-config --lint`), for CI that has neither the certificates nor the
    /// secrets of the target environment: named files are not touched, `*_env` keys are checked
    /// to name a variable but not looked up, and checks that need those values are skipped. The
    /// config resolved this way holds no secrets and is never used, only its problems.
    Lint,
}

impl Environment<'_> {
    fn reads_files(self) -> bool {
        matches!(self, Environment::Target(_))
    }
}

/// The problems found so far. Resolvers record into it and still return a best-effort value, so
/// one bad key never hides the checks after it.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(key, message));
    }
}

pub(super) fn resolve(raw: RawConfig, env: Environment<'_>) -> Result<Config, ConfigErrors> {
    let mut p = Problems::default();
    let server = resolve_server(&mut p, raw.server.unwrap_or_default());
    let listeners = resolve_listeners(&mut p, env, raw.listeners.unwrap_or_default());
    let paths = resolve_paths(&mut p, raw.paths);
    let web_root = raw
        .web_root
        .map(|dir| check_dir(&mut p, env, "web_root", &dir));
    let events_path = resolve_events_path(&mut p, raw.events_path, &paths);
    let admin = raw
        .admin
        .map(|admin| resolve_admin(&mut p, admin, env, &listeners));
    let auth = resolve_auth(&mut p, raw.auth.unwrap_or_default(), env);
    let store = resolve_store(&mut p, raw.store.unwrap_or_default(), env);
    let pools = resolve_pools(&mut p, env, raw.pools.unwrap_or(OrderedMap(Vec::new())));
    let limits = resolve_limits(&mut p, raw.limits.unwrap_or_default());
    let logging = resolve_logging(&mut p, raw.logging.unwrap_or_default());
    let recording = resolve_recording(&mut p, env, raw.recording.unwrap_or_default());
    if recording.dir.is_some() && recording.when == super::RecordWhen::Always {
        // Every session is to be recorded, and a transparent pool's cannot be.
        for (name, pool) in &pools {
            if pool.rfb.mode == super::RfbMode::Transparent {
                p.add(
                    "recording.when",
                    format!("always cannot record pool {name}: it has rfb.mode transparent"),
                );
            }
        }
    }

    if !p.0.is_empty() {
        return Err(ConfigErrors(p.0));
    }
    Ok(Config {
        server,
        listeners,
        paths,
        web_root,
        events_path,
        admin,
        auth,
        store,
        pools,
        limits,
        logging,
        recording,
        hash: String::new(),
    })
}

fn resolve_server(p: &mut Problems, raw: RawServer) -> ServerSettings {
    ServerSettings {
        threads: to_usize(bounded(p, "server.threads", raw.threads, 2, COUNT)),
        pid_file: non_empty_path(p, "server.pid_file", raw.pid_file, "/tmp/vncgate.pid"),
        upgrade_sock: non_empty_path(
            p,
            "server.upgrade_sock",
            raw.upgrade_sock,
            "/tmp/vncgate_upgrade.sock",
        ),
        drain: Duration::from_secs(bounded(
            p,
            "server.drain_seconds",
            raw.drain_seconds,
            300,
            0..=86400,
        )),
    }
}

fn resolve_listeners(
    p: &mut Problems,
    env: Environment<'_>,
    raw: Vec<RawListener>,
) -> Vec<ListenerConfig> {
    if raw.is_empty() {
        p.add("listeners", "at least one listener is required");
    }
    let mut seen = HashSet::new();
    let mut listeners = Vec::new();
    for (i, listener) in raw.into_iter().enumerate() {
        let key = format!("listeners[{i}]");
        let addr = socket_addr(p, &format!("{key}.addr"), &listener.addr);
        if addr.is_some_and(|addr| !seen.insert(addr)) {
            p.add(
                format!("{key}.addr"),
                format!("duplicate listener address {:?}", listener.addr),
            );
        }
        let tls = listener.tls.map(|tls| TlsFiles {
            cert: check_file(p, env, &format!("{key}.tls.cert"), &tls.cert),
            key: check_file(p, env, &format!("{key}.tls.key"), &tls.key),
        });
        let proxy_protocol = proxy_protocol(
            p,
            &key,
            listener.proxy_protocol.unwrap_or(false),
            listener.trusted_proxies,
        );
        if let Some(addr) = addr {
            listeners.push(ListenerConfig {
                addr,
                tls,
                proxy_protocol,
            });
        }
    }
    listeners
}

/// `proxy_protocol: true` needs the networks its headers may come from: a header from anyone
/// would let any client choose the address the throttle and the logs see.
fn proxy_protocol(
    p: &mut Problems,
    key: &str,
    enabled: bool,
    trusted: Option<Vec<String>>,
) -> Option<Vec<ipnet::IpNet>> {
    let key = format!("{key}.trusted_proxies");
    let trusted = trusted.unwrap_or_default();
    if !enabled {
        if !trusted.is_empty() {
            p.add(key, "set only with proxy_protocol: true");
        }
        return None;
    }
    if trusted.is_empty() {
        p.add(
            key.clone(),
            "required with proxy_protocol: true (the networks of the load balancers)",
        );
    }
    let mut nets = Vec::new();
    for (i, text) in trusted.iter().enumerate() {
        // A bare address is a network of one.
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(net) => nets.push(net.trunc()),
            Err(_) => p.add(
                format!("{key}[{i}]"),
                format!("invalid network {text:?} (expected an address or CIDR, e.g. 10.0.0.0/8)"),
            ),
        }
    }
    Some(nets)
}

fn resolve_paths(p: &mut Problems, raw: Option<Vec<String>>) -> Vec<String> {
    let paths = raw.unwrap_or_else(|| vec!["/websockify".to_string()]);
    if paths.is_empty() {
        p.add("paths", "at least one path is required");
    }
    for (i, path) in paths.iter().enumerate() {
        if !path.starts_with('/') {
            p.add(
                format!("paths[{i}]"),
                format!("must start with \"/\": {path:?}"),
            );
        } else if path.contains('?') {
            // Matching is on the path alone, so a query here could never match a request.
            p.add(
                format!("paths[{i}]"),
                format!("must not contain \"?\": {path:?}"),
            );
        }
    }
    paths
}

/// The default path of the session events stream (contract §14).
pub const DEFAULT_EVENTS_PATH: &str = "/vncgate/events";

/// `events_path`: a path of its own, like `paths`, and neither an upgrade path nor `/healthz`
/// (a request goes to exactly one of them).
fn resolve_events_path(p: &mut Problems, raw: Option<String>, paths: &[String]) -> String {
    let path = raw.unwrap_or_else(|| DEFAULT_EVENTS_PATH.to_owned());
    if !path.starts_with('/') {
        p.add("events_path", format!("must start with \"/\": {path:?}"));
    } else if path.contains('?') {
        p.add("events_path", format!("must not contain \"?\": {path:?}"));
    } else if paths.contains(&path) {
        p.add(
            "events_path",
            format!("{path:?} is also in paths: a request goes to one or the other"),
        );
    } else if path == "/healthz" {
        p.add("events_path", "must not be /healthz");
    }
    path
}

fn resolve_admin(
    p: &mut Problems,
    raw: RawAdmin,
    env: Environment<'_>,
    listeners: &[ListenerConfig],
) -> AdminConfig {
    let addr = socket_addr(p, "admin.addr", &raw.addr);
    if addr.is_some_and(|addr| listeners.iter().any(|l| l.addr == addr)) {
        p.add(
            "admin.addr",
            format!("{:?} is also a listener address", raw.addr),
        );
    }
    let token = raw
        .token_env
        .and_then(|name| read_env(p, env, "admin.token_env", &name));
    AdminConfig {
        addr: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        token,
    }
}

fn resolve_auth(p: &mut Problems, raw: RawAuth, env: Environment<'_>) -> AuthConfig {
    let algorithms = resolve_algorithms(p, raw.algorithms);

    // Without an HS* algorithm the secret would never be used, so it is not required either.
    let secret = if algorithms.iter().any(|a| is_hmac(*a)) {
        hmac_secret(p, env, raw.secret_env.as_deref())
    } else {
        None
    };

    let public_key_files: Vec<PathBuf> = raw
        .public_key_files
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, file)| check_file(p, env, &format!("auth.public_key_files[{i}]"), file))
        .collect();
    let jwks_url = raw.jwks_url.inspect(|url| {
        // Keys fetched in clear text could be swapped in transit: https only, except for an
        // identity provider on this host (sidecars, tests).
        let https = url
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty());
        let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|prefix| {
                url.strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
            });
        if !https && !loopback {
            p.add(
                "auth.jwks_url",
                format!("must be an https:// URL (http:// only on loopback): {url:?}"),
            );
        }
    });
    let has_keys = !public_key_files.is_empty() || jwks_url.is_some();
    let asymmetric = algorithms.iter().find(|a| !is_hmac(**a));
    if let Some(alg) = asymmetric.filter(|_| !has_keys) {
        p.add(
            "auth",
            format!("{alg:?} needs public_key_files or jwks_url to verify tokens"),
        );
    }

    let issuer = non_empty_opt(p, "auth.issuer", raw.issuer);
    let audience = non_empty_opt(p, "auth.audience", raw.audience);
    let leeway_seconds = bounded(
        p,
        "auth.leeway_seconds",
        raw.leeway_seconds,
        30,
        0..=MAX_LEEWAY_SECONDS,
    );
    let allowed_origins = raw.allowed_origins.unwrap_or_default();
    for (i, origin) in allowed_origins.iter().enumerate() {
        if !is_origin(origin) {
            p.add(
                format!("auth.allowed_origins[{i}]"),
                format!("invalid origin {origin:?} (expected scheme://host[:port], no path)"),
            );
        }
    }
    // The cache lifetime bounds how long a key removed from the JWKS stays usable; the minimum
    // interval bounds how often tokens with unknown `kid`s can make us call the provider.
    let jwks_cache_seconds = bounded(
        p,
        "auth.jwks_cache_seconds",
        raw.jwks_cache_seconds,
        300,
        1..=86400,
    );
    let jwks_min_refresh_seconds = bounded(
        p,
        "auth.jwks_min_refresh_seconds",
        raw.jwks_min_refresh_seconds,
        30,
        0..=3600,
    );
    let on_expiry = one_of(
        p,
        "auth.on_expiry",
        raw.on_expiry,
        OnExpiry::Close,
        &[("close", OnExpiry::Close), ("keep", OnExpiry::Keep)],
    );

    AuthConfig {
        algorithms,
        secret,
        public_key_files,
        jwks_url,
        jwks_cache: Duration::from_secs(jwks_cache_seconds),
        jwks_min_refresh: Duration::from_secs(jwks_min_refresh_seconds),
        issuer,
        audience,
        leeway: Duration::from_secs(leeway_seconds),
        allowed_origins,
        on_expiry,
    }
}

fn resolve_algorithms(p: &mut Problems, raw: Option<Vec<String>>) -> Vec<Algorithm> {
    let names = raw.unwrap_or_else(|| vec!["HS256".to_string()]);
    if names.is_empty() {
        p.add("auth.algorithms", "at least one algorithm is required");
    }
    let mut algorithms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match ALGORITHMS.iter().find(|(n, _)| n == name) {
            // A repeated entry is harmless; keep the list a set so callers need not care.
            Some((_, alg)) if !algorithms.contains(alg) => algorithms.push(*alg),
            Some(_) => {}
            None => p.add(
                format!("auth.algorithms[{i}]"),
                format!(
                    "unsupported algorithm {name:?} (expected {})",
                    choice_list(ALGORITHMS.iter().map(|(n, _)| *n))
                ),
            ),
        }
    }
    algorithms
}

fn hmac_secret(p: &mut Problems, env: Environment<'_>, secret_env: Option<&str>) -> Option<Secret> {
    let name = secret_env.unwrap_or(DEFAULT_SECRET_ENV);
    let secret = read_env(p, env, "auth.secret_env", name)?;
    if secret.expose().len() < MIN_SECRET_BYTES {
        p.add(
            "auth.secret_env",
            format!("secret must be at least {MIN_SECRET_BYTES} bytes"),
        );
    }
    Some(secret)
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// Browsers send `Origin` as `scheme://host[:port]` with no path, and matching is exact, so
/// anything else (a trailing slash above all) would silently never match.
fn is_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let authority_ok = !authority.is_empty()
        && !authority
            .chars()
            .any(|c| matches!(c, '/' | '?' | '#') || c.is_whitespace());
    scheme_ok && authority_ok
}

fn resolve_store(p: &mut Problems, raw: RawStore, env: Environment<'_>) -> StoreConfig {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Memory,
        Redis,
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Topology {
        Standalone,
        Sentinel,
        Cluster,
    }
    let kind = one_of(
        p,
        "store.kind",
        raw.kind,
        Kind::Memory,
        &[("memory", Kind::Memory), ("redis", Kind::Redis)],
    );
    let topology = one_of(
        p,
        "store.topology",
        raw.topology.clone(),
        Topology::Standalone,
        &[
            ("standalone", Topology::Standalone),
            ("sentinel", Topology::Sentinel),
            ("cluster", Topology::Cluster),
        ],
    );
    // Settings for a topology that is not in use are a mistake, not something to ignore: an
    // operator who wrote `sentinel:` believes the gateway follows the sentinels.
    let in_use = |t: Topology| kind == Kind::Redis && topology == t;
    if raw.topology.is_some() && kind != Kind::Redis {
        p.add("store.topology", "only allowed with kind redis");
    }
    if raw.sentinel.is_some() && !in_use(Topology::Sentinel) {
        p.add(
            "store.sentinel",
            "only allowed with kind redis and topology sentinel",
        );
    }
    if raw.cluster.is_some() && !in_use(Topology::Cluster) {
        p.add(
            "store.cluster",
            "only allowed with kind redis and topology cluster",
        );
    }
    if raw.redis_url_env.is_some() && kind == Kind::Redis && topology != Topology::Standalone {
        p.add(
            "store.redis_url_env",
            "only allowed with topology standalone (sentinel and cluster name their own URLs)",
        );
    }
    let prefix = raw.key_prefix.unwrap_or_else(|| "vncgate:".to_string());
    if in_use(Topology::Cluster) && (prefix.contains('{') || prefix.contains('}')) {
        // The gateway's keys carry hash tags of their own; a brace in the prefix would make
        // Redis hash on the prefix instead and put every key in one slot (or split a script's
        // keys over two).
        p.add(
            "store.key_prefix",
            "must not contain { or } with topology cluster",
        );
    }
    let kind = match (kind, topology) {
        (Kind::Memory, _) => StoreKind::Memory,
        (Kind::Redis, Topology::Standalone) => {
            let name = raw
                .redis_url_env
                .as_deref()
                .unwrap_or(DEFAULT_REDIS_URL_ENV);
            let url = redis_url(p, env, "store.redis_url_env", name);
            // The placeholder only stands in when the config is dropped: an error was recorded, or
            // in lint mode, where the variable is not read.
            StoreKind::Redis {
                topology: RedisTopology::Standalone {
                    url: url.unwrap_or_else(|| Secret::new("")),
                },
            }
        }
        (Kind::Redis, Topology::Sentinel) => {
            let sentinel = raw.sentinel.unwrap_or_default();
            let master_name = sentinel
                .master_name
                .unwrap_or_else(|| DEFAULT_SENTINEL_MASTER.to_string());
            if master_name.is_empty() || master_name.chars().any(char::is_whitespace) {
                p.add(
                    "store.sentinel.master_name",
                    "must be a non-empty name without spaces",
                );
            }
            let name = sentinel
                .urls_env
                .unwrap_or_else(|| DEFAULT_SENTINEL_URLS_ENV.to_string());
            let urls = redis_urls(p, env, "store.sentinel.urls_env", &name);
            StoreKind::Redis {
                topology: RedisTopology::Sentinel { master_name, urls },
            }
        }
        (Kind::Redis, Topology::Cluster) => {
            let name = raw
                .cluster
                .unwrap_or_default()
                .urls_env
                .unwrap_or_else(|| DEFAULT_CLUSTER_URLS_ENV.to_string());
            let urls = redis_urls(p, env, "store.cluster.urls_env", &name);
            StoreKind::Redis {
                topology: RedisTopology::Cluster { urls },
            }
        }
    };
    let ttl = bounded(
        p,
        "store.session_idle_ttl_seconds",
        raw.session_idle_ttl_seconds,
        3600,
        SECONDS,
    );
    StoreConfig {
        kind,
        key_prefix: prefix,
        session_idle_ttl: Duration::from_secs(ttl),
    }
}

fn resolve_pools(
    p: &mut Problems,
    env: Environment<'_>,
    raw: OrderedMap<RawPool>,
) -> BTreeMap<String, PoolConfig> {
    if raw.0.is_empty() {
        p.add("pools", "at least one pool is required");
    }
    let mut pools = BTreeMap::new();
    for (name, pool) in raw.0 {
        let key = format!("pools.{name}");
        if !is_valid_name(&name) {
            p.add(
                &key,
                format!("invalid pool name {name:?} (expected [A-Za-z0-9._-]{{1,64}})"),
            );
        }
        if pools.contains_key(&name) {
            p.add(&key, format!("duplicate pool name {name:?}"));
            continue;
        }
        let resolved = resolve_pool(p, env, &key, pool);
        pools.insert(name, resolved);
    }
    pools
}

/// Active TCP checks every 5 s: a dead desktop stops receiving new sessions within ~10 s
/// (two failed checks), while 1 000 backends cost 200 connects/s.
const DEFAULT_HEALTH_CHECK_INTERVAL_SECS: u64 = 5;

fn resolve_pool(p: &mut Problems, env: Environment<'_>, key: &str, raw: RawPool) -> PoolConfig {
    let (rfb, pool_credentials) = rfb::resolve_rfb(p, env, key, raw.rfb);
    let (clipboard, health_check) =
        rfb::resolve_policy(p, key, rfb.mode, raw.clipboard, raw.health_check);
    let discovery = resolve_discovery(p, key, raw.discovery);
    if discovery.is_dynamic() {
        // Dynamic backends come and go (a sandbox per session): nobody checks them actively, a
        // failed connect is the answer (502, pin released). Asking for checks on such a pool
        // asks for something the gateway will not do.
        if raw.health_check_interval_seconds.is_some() {
            p.add(
                format!("{key}.health_check_interval_seconds"),
                "not allowed with discovery dns or registry (dynamic backends are not checked)",
            );
        }
        if !raw.backends.is_empty() {
            p.add(
                format!("{key}.backends"),
                "not allowed with discovery dns or registry (the backends come from the token or the admin API)",
            );
        }
    } else if raw.backends.is_empty() {
        p.add(
            format!("{key}.backends"),
            "at least one backend is required",
        );
    }
    let mut names = HashSet::new();
    let mut backends = Vec::new();
    for (i, backend) in raw.backends.into_iter().enumerate() {
        let key = format!("{key}.backends[{i}]");
        if !names.insert(backend.name.clone()) {
            p.add(
                format!("{key}.name"),
                format!("duplicate backend name {:?}", backend.name),
            );
        }
        let own_credentials = backend.password_env.is_some();
        let credentials = rfb::backend_credentials(
            p,
            env,
            &key,
            backend.password_env.clone(),
            &pool_credentials,
        );
        if let Some(backend) = resolve_backend(p, &key, backend, credentials) {
            backends.push((i, backend, own_credentials));
        }
    }
    rfb::check_backends(p, key, rfb.mode, &backends);
    let backends = backends.into_iter().map(|(_, b, _)| b).collect();
    let interval = raw
        .health_check_interval_seconds
        .unwrap_or(DEFAULT_HEALTH_CHECK_INTERVAL_SECS);
    if interval > 3600 {
        p.add(
            format!("{key}.health_check_interval_seconds"),
            "must be at most 3600 (0 turns active checks off)",
        );
    }
    PoolConfig {
        backends,
        failover: raw.failover.unwrap_or(false),
        health_check_interval: (interval > 0 && !discovery.is_dynamic())
            .then(|| Duration::from_secs(interval)),
        discovery,
        credentials: pool_credentials,
        health_check,
        rfb,
        clipboard,
    }
}

/// A DNS label: what a pod, VM or sandbox name usually is.
const DEFAULT_NAME_PATTERN: &str = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";

fn resolve_discovery(p: &mut Problems, key: &str, raw: Option<RawDiscovery>) -> Discovery {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Static,
        Dns,
        Registry,
    }
    let raw = raw.unwrap_or_default();
    let kind = one_of(
        p,
        &format!("{key}.discovery.kind"),
        raw.kind,
        Kind::Static,
        &[
            ("static", Kind::Static),
            ("dns", Kind::Dns),
            ("registry", Kind::Registry),
        ],
    );
    if kind == Kind::Static {
        for (field, set) in [
            ("addr_template", raw.addr_template.is_some()),
            ("name_pattern", raw.name_pattern.is_some()),
        ] {
            if set {
                p.add(
                    format!("{key}.discovery.{field}"),
                    "only allowed with discovery kind dns or registry",
                );
            }
        }
        return Discovery::Static;
    }
    let pattern_text = raw
        .name_pattern
        .unwrap_or_else(|| DEFAULT_NAME_PATTERN.to_string());
    let name_pattern = match NamePattern::new(&pattern_text) {
        Ok(pattern) => pattern,
        Err(e) => {
            p.add(
                format!("{key}.discovery.name_pattern"),
                format!("not a valid regular expression: {e}"),
            );
            NamePattern::new(DEFAULT_NAME_PATTERN).unwrap_or_else(|_| unreachable!())
        }
    };
    if kind == Kind::Registry {
        if raw.addr_template.is_some() {
            p.add(
                format!("{key}.discovery.addr_template"),
                "only allowed with discovery kind dns (registry backends carry their address)",
            );
        }
        return Discovery::Registry { name_pattern };
    }
    let addr_template = raw.addr_template.unwrap_or_default();
    let template_key = format!("{key}.discovery.addr_template");
    if addr_template.is_empty() {
        p.add(&template_key, "required with discovery kind dns");
    } else if addr_template.matches("{backend}").count() != 1 {
        p.add(&template_key, "must contain {backend} exactly once");
    } else if backend_addr(&addr_template.replace("{backend}", "x")).is_none() {
        p.add(
            &template_key,
            format!("{addr_template:?} does not make a host:port address"),
        );
    }
    Discovery::Dns {
        addr_template,
        name_pattern,
    }
}

fn resolve_backend(
    p: &mut Problems,
    key: &str,
    raw: RawBackend,
    credentials: RfbCredentials,
) -> Option<BackendConfig> {
    if !is_valid_name(&raw.name) {
        p.add(
            format!("{key}.name"),
            format!(
                "invalid backend name {:?} (expected [A-Za-z0-9._-]{{1,64}})",
                raw.name
            ),
        );
    }
    let addr = backend_addr(&raw.addr);
    if addr.is_none() {
        p.add(
            format!("{key}.addr"),
            format!("invalid socket address {:?}", raw.addr),
        );
    }
    #[derive(Clone, Copy)]
    enum Proto {
        Rfb,
        WebSocket,
    }
    let proto = one_of(
        p,
        &format!("{key}.protocol"),
        raw.protocol,
        Proto::Rfb,
        &[("rfb", Proto::Rfb), ("websocket", Proto::WebSocket)],
    );
    let protocol = match (proto, raw.path) {
        (Proto::Rfb, None) => BackendProtocol::Rfb,
        (Proto::Rfb, Some(_)) => {
            p.add(
                format!("{key}.path"),
                "only allowed with protocol websocket",
            );
            BackendProtocol::Rfb
        }
        (Proto::WebSocket, path) => {
            let path = path.unwrap_or_else(|| "/websockify".to_string());
            if !path.starts_with('/') {
                p.add(
                    format!("{key}.path"),
                    format!("must start with \"/\": {path:?}"),
                );
            }
            BackendProtocol::WebSocket { path }
        }
    };
    Some(BackendConfig {
        name: raw.name,
        addr: addr?,
        protocol,
        credentials,
    })
}

pub(crate) fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `host:port` where host is an IPv4 address, a bracketed IPv6 address or a DNS name. Names are
/// kept unresolved so the bridge follows DNS changes at connect time.
pub(crate) fn backend_addr(text: &str) -> Option<BackendAddr> {
    let (host, port) = text.rsplit_once(':')?;
    // `u16::from_str` would also take `+80`; a port is digits only.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|&port| port != 0)?;
    let host = if let Some(inner) = host.strip_prefix('[') {
        let ip: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
        ip.to_string()
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        // An unbracketed IPv6 address would make the port ambiguous (`::1:5901`).
        if ip.is_ipv6() {
            return None;
        }
        ip.to_string()
    } else if is_dns_name(host) {
        host.to_string()
    } else {
        return None;
    };
    Some(BackendAddr { host, port })
}

fn is_dns_name(host: &str) -> bool {
    let labels_ok = host.split('.').all(|label| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            // Underscores are not valid in hostnames, but container runtimes hand them out.
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    });
    // All-numeric labels would be a mistyped IPv4 address (`10.0.0.300`), not a name.
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    host.len() <= 253 && labels_ok && !numeric
}

fn resolve_limits(p: &mut Problems, raw: RawLimits) -> Limits {
    let key = |name: &str| format!("limits.{name}");
    let max_sessions = bounded(p, &key("max_sessions"), raw.max_sessions, 10_000, COUNT);
    let per_user = bounded(
        p,
        &key("max_sessions_per_user"),
        raw.max_sessions_per_user,
        5,
        COUNT,
    );
    let auth_failures = bounded(
        p,
        &key("auth_failures_per_minute"),
        raw.auth_failures_per_minute,
        60,
        COUNT,
    );
    let idle = bounded(
        p,
        &key("idle_timeout_seconds"),
        raw.idle_timeout_seconds,
        0,
        0..=MAX_SECONDS,
    );
    let message_bytes = bounded(
        p,
        &key("max_message_bytes"),
        raw.max_message_bytes,
        4 * 1024 * 1024,
        1024..=MAX_MESSAGE_BYTES,
    );
    // 256 MiB: 64 messages of the default `max_message_bytes` arriving at once, which is far
    // more concurrent multi-megabyte pastes than a farm sees, while `max_sessions` (10 000)
    // clients each holding a 4 MiB message unfinished would otherwise hold 40 GiB.
    let message_budget = bounded(
        p,
        &key("message_buffer_budget_bytes"),
        raw.message_buffer_budget_bytes,
        256 * 1024 * 1024,
        1024 * 1024..=1 << 40,
    );
    // Below `max_message_bytes`, a message of the allowed size could never be received. Only
    // compared with a valid `max_message_bytes`: one out of range is reported already.
    if message_budget < message_bytes && message_bytes <= MAX_MESSAGE_BYTES {
        p.add(
            key("message_buffer_budget_bytes"),
            format!("{message_budget} is below limits.max_message_bytes ({message_bytes})"),
        );
    }
    let ping = bounded(
        p,
        &key("ping_interval_seconds"),
        raw.ping_interval_seconds,
        20,
        SECONDS,
    );
    let pong = bounded(
        p,
        &key("pong_timeout_seconds"),
        raw.pong_timeout_seconds,
        20,
        SECONDS,
    );
    let head_timeout = bounded(
        p,
        &key("head_timeout_seconds"),
        raw.head_timeout_seconds,
        10,
        1..=300,
    );
    let tls_handshake_timeout = bounded(
        p,
        &key("tls_handshake_timeout_seconds"),
        raw.tls_handshake_timeout_seconds,
        10,
        1..=300,
    );
    let max_head_bytes = bounded(
        p,
        &key("max_head_bytes"),
        raw.max_head_bytes,
        64 * 1024,
        4096..=1024 * 1024,
    );
    let pre_auth = bounded(
        p,
        &key("max_pre_auth_connections"),
        raw.max_pre_auth_connections,
        8192,
        COUNT,
    );
    let pre_auth_per_address = bounded(
        p,
        &key("max_pre_auth_connections_per_address"),
        raw.max_pre_auth_connections_per_address,
        512,
        COUNT,
    );
    if pre_auth_per_address > pre_auth {
        p.add(
            key("max_pre_auth_connections_per_address"),
            format!("{pre_auth_per_address} is above limits.max_pre_auth_connections ({pre_auth})"),
        );
    }
    Limits {
        max_sessions: to_usize(max_sessions),
        max_sessions_per_user: to_usize(per_user),
        auth_failures_per_minute: u32::try_from(auth_failures).unwrap_or(u32::MAX),
        idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
        max_message_bytes: to_usize(message_bytes),
        message_buffer_budget_bytes: to_usize(message_budget),
        ping_interval: Duration::from_secs(ping),
        pong_timeout: Duration::from_secs(pong),
        head_timeout: Duration::from_secs(head_timeout),
        tls_handshake_timeout: Duration::from_secs(tls_handshake_timeout),
        max_head_bytes: to_usize(max_head_bytes),
        max_pre_auth_connections: to_usize(pre_auth),
        max_pre_auth_connections_per_address: to_usize(pre_auth_per_address),
    }
}

fn resolve_logging(p: &mut Problems, raw: RawLogging) -> LoggingConfig {
    let format = one_of(
        p,
        "logging.format",
        raw.format,
        LogFormat::Json,
        &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
    );
    let level = raw.level.unwrap_or_else(|| "info".to_string());
    if level.trim().is_empty() {
        p.add("logging.level", "must not be empty");
    } else if let Err(err) = tracing_subscriber::EnvFilter::try_new(&level) {
        // Plain levels (`info`) are filter directives too, so one check covers both forms.
        p.add(
            "logging.level",
            format!("invalid log filter {level:?}: {err}"),
        );
    }
    LoggingConfig { format, level }
}

/// `recording:` (contract §12). The directory need not exist yet (the recorder creates it),
/// but where it exists it must be a directory.
fn resolve_recording(p: &mut Problems, env: Environment<'_>, raw: RawRecording) -> RecordingConfig {
    let defaults = RecordingConfig::default();
    let dir = match raw.dir {
        None => None,
        Some(dir) if dir.is_empty() => {
            p.add(
                "recording.dir",
                "must not be empty (use null to turn recording off)",
            );
            None
        }
        Some(dir) => {
            if env.reads_files()
                && let Ok(meta) = std::fs::metadata(&dir)
                && !meta.is_dir()
            {
                p.add("recording.dir", format!("not a directory {dir:?}"));
            }
            Some(PathBuf::from(dir))
        }
    };
    let when = one_of(
        p,
        "recording.when",
        raw.when,
        defaults.when,
        &[("always", RecordWhen::Always), ("claim", RecordWhen::Claim)],
    );
    let input = one_of(
        p,
        "recording.input",
        raw.input,
        defaults.input,
        &[
            ("none", RecordInput::None),
            ("pointer", RecordInput::Pointer),
            ("keys", RecordInput::Keys),
        ],
    );
    // At least one ServerInit-sized update; at most 1 TiB, far beyond any one session.
    let max_bytes_per_session = bounded(
        p,
        "recording.max_bytes_per_session",
        raw.max_bytes_per_session,
        defaults.max_bytes_per_session,
        4096..=(1 << 40),
    );
    // Zero would delete today's recordings as they are written; a century is "keep".
    let retention_days = bounded(
        p,
        "recording.retention_days",
        raw.retention_days,
        u64::from(defaults.retention_days),
        1..=36500,
    );
    RecordingConfig {
        dir,
        when,
        input,
        max_bytes_per_session,
        retention_days: u32::try_from(retention_days).unwrap_or(defaults.retention_days),
    }
}

/// One `redis://` or `rediss://` URL from the variable `name`. The URL may carry a password, so
/// messages name the variable, never its value.
fn redis_url(p: &mut Problems, env: Environment<'_>, key: &str, name: &str) -> Option<Secret> {
    let url = read_env(p, env, key, name)?;
    if !is_redis_url(url.expose()) {
        p.add(
            key,
            format!("environment variable {name} must hold a redis:// or rediss:// URL"),
        );
        return None;
    }
    Some(url)
}

/// A comma-separated list of `redis://` URLs (sentinels, cluster seed nodes) from `name`.
fn redis_urls(p: &mut Problems, env: Environment<'_>, key: &str, name: &str) -> Vec<Secret> {
    let Some(list) = read_env(p, env, key, name) else {
        return Vec::new();
    };
    let urls: Vec<Secret> = list
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(Secret::new)
        .collect();
    if urls.is_empty() || urls.iter().any(|u| !is_redis_url(u.expose())) {
        p.add(
            key,
            format!(
                "environment variable {name} must hold comma-separated redis:// or rediss:// URLs"
            ),
        );
    }
    urls
}

fn is_redis_url(url: &str) -> bool {
    ["redis://", "rediss://"].iter().any(|s| url.starts_with(s))
}

// ---- shared checks -------------------------------------------------------------------------

/// Reads the variable a `*_env` key names. Unset and empty are both errors: an empty secret is
/// never what an operator meant. In lint mode the name is checked and nothing is read.
fn read_env(p: &mut Problems, env: Environment<'_>, key: &str, name: &str) -> Option<Secret> {
    if !is_env_name(name) {
        // The name is not echoed: what sits in a `*_env` key by mistake is most often the secret
        // itself, pasted where its variable's name belongs.
        p.add(
            key,
            "must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)",
        );
        return None;
    }
    let Environment::Target(lookup) = env else {
        return None;
    };
    match lookup(name) {
        Some(value) if !value.is_empty() => Some(Secret::new(value)),
        Some(_) => {
            p.add(key, format!("environment variable {name} is empty"));
            None
        }
        None => {
            p.add(key, format!("environment variable {name} is not set"));
            None
        }
    }
}

/// The portable variable names (POSIX shells, systemd, Docker, Kubernetes all pass them): one
/// that a shell cannot set is a typo (`$VNCGATE_JWT_SECRET`) or a value in the name's place.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn socket_addr(p: &mut Problems, key: &str, text: &str) -> Option<SocketAddr> {
    let addr = text.parse().ok();
    if addr.is_none() {
        p.add(key, format!("invalid socket address {text:?}"));
    }
    addr
}

/// The file must exist and be readable now: finding out at the first TLS handshake or the first
/// token is too late. Relative paths are relative to the current directory, as written. In lint
/// mode the file belongs to another machine, so only the path is taken.
fn check_file(p: &mut Problems, env: Environment<'_>, key: &str, path: &str) -> PathBuf {
    if !env.reads_files() {
        return PathBuf::from(path);
    }
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            p.add(key, format!("file not found {path:?}"));
        }
        Err(err) => p.add(key, format!("cannot read {path:?}: {err}")),
        Ok(meta) if meta.is_dir() => p.add(key, format!("not a file {path:?}")),
        Ok(_) => {
            if let Err(err) = std::fs::File::open(path) {
                p.add(key, format!("cannot read {path:?}: {err}"));
            }
        }
    }
    PathBuf::from(path)
}

fn check_dir(p: &mut Problems, env: Environment<'_>, key: &str, path: &str) -> PathBuf {
    if !env.reads_files() {
        return PathBuf::from(path);
    }
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            p.add(key, format!("directory not found {path:?}"));
        }
        Err(err) => p.add(key, format!("cannot read {path:?}: {err}")),
        Ok(meta) if !meta.is_dir() => p.add(key, format!("not a directory {path:?}")),
        Ok(_) => {}
    }
    PathBuf::from(path)
}

fn non_empty_path(p: &mut Problems, key: &str, raw: Option<String>, default: &str) -> PathBuf {
    let path = raw.unwrap_or_else(|| default.to_string());
    if path.is_empty() {
        p.add(key, "must not be empty");
    }
    PathBuf::from(path)
}

/// An empty `issuer`/`audience` would demand a claim no real token carries; `null` is how to
/// switch the check off.
fn non_empty_opt(p: &mut Problems, key: &str, raw: Option<String>) -> Option<String> {
    if raw.as_deref().is_some_and(str::is_empty) {
        p.add(key, "must not be empty (use null to disable the check)");
    }
    raw
}

/// Records a problem when the value is outside `range`, naming the bound it crosses.
fn bounded(
    p: &mut Problems,
    key: &str,
    raw: Option<u64>,
    default: u64,
    range: RangeInclusive<u64>,
) -> u64 {
    let value = raw.unwrap_or(default);
    if value < *range.start() {
        p.add(key, format!("must be at least {}", range.start()));
    } else if value > *range.end() {
        p.add(key, format!("must be at most {}", range.end()));
    }
    value
}

/// Counts are capped at `COUNT`, which fits `usize` on every supported target; the fallback only
/// matters for a value already reported as out of range.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Maps a keyword to its value, or records `invalid value "x" (expected a or b)`.
fn one_of<T: Copy>(
    p: &mut Problems,
    key: &str,
    raw: Option<String>,
    default: T,
    choices: &[(&str, T)],
) -> T {
    let Some(text) = raw else {
        return default;
    };
    match choices.iter().find(|(name, _)| *name == text) {
        Some((_, value)) => *value,
        None => {
            p.add(
                key,
                format!(
                    "invalid value {text:?} (expected {})",
                    choice_list(choices.iter().map(|(name, _)| *name))
                ),
            );
            default
        }
    }
}

/// `a`, `a or b`, `a, b or c`.
fn choice_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses() {
        let ok = |text: &str, host: &str, port: u16| {
            assert_eq!(
                backend_addr(text),
                Some(BackendAddr {
                    host: host.to_string(),
                    port
                }),
                "{text}"
            );
        };
        ok("10.0.0.11:5901", "10.0.0.11", 5901);
        ok("[::1]:5901", "::1", 5901);
        ok(
            "desk-a.vnc.svc.cluster.local:5900",
            "desk-a.vnc.svc.cluster.local",
            5900,
        );
        ok("desk_a:5900", "desk_a", 5900);
        for bad in [
            "x",
            "x:",
            "x:99999",
            ":80",
            "x:0",
            "::1:5901",
            "[::1]",
            "[x]:80",
            "10.0.0.300:80",
            "a..b:80",
            "x:+80",
            "-a:80",
            "a b:80",
            "[::1:80",
        ] {
            assert_eq!(backend_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn backend_addr_display_round_trips() {
        for text in ["10.0.0.11:5901", "[::1]:5901", "desk-a:5900"] {
            let addr = backend_addr(text).expect("valid");
            assert_eq!(addr.to_string(), text);
        }
    }

    #[test]
    fn origins() {
        for good in [
            "https://vnc.example.com",
            "http://localhost:8080",
            "app+x://h",
        ] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "https://vnc.example.com/",
            "vnc.example.com",
            "https://",
            "://h",
            "1x://h",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    #[test]
    fn choice_lists() {
        assert_eq!(choice_list(["a"].into_iter()), "a");
        assert_eq!(choice_list(["a", "b"].into_iter()), "a or b");
        assert_eq!(choice_list(["a", "b", "c"].into_iter()), "a, b or c");
    }

    #[test]
    fn errors_display_one_per_line() {
        let errors = ConfigErrors(vec![
            ConfigError::new("a.b", "bad"),
            ConfigError::new("", "whole file"),
        ]);
        assert_eq!(errors.to_string(), "a.b: bad\nwhole file");
    }
}
