//! The config file contract (§2) as seen through the public API: defaults, every key resolved,
//! and `check-config`'s one-line-per-problem errors with their key paths.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rstest::rstest;
use vncgate::config::{
    Algorithm, BackendAddr, BackendProtocol, Config, ConfigError, ConfigErrors, LogFormat,
    OnExpiry, RedisTopology, StoreKind,
};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

const MINIMAL: &str = r#"
listeners:
  - addr: "127.0.0.1:6080"
pools:
  default:
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901" }
"#;

fn env_of(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let env = env_of(vars);
    Config::from_yaml(yaml, &|name| env.get(name).cloned())
}

fn load_ok(yaml: &str, vars: &[(&str, &str)]) -> Config {
    match load(yaml, vars) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

/// The errors as `check-config` prints them, one string per line.
fn errors(yaml: &str, vars: &[(&str, &str)]) -> Vec<String> {
    match load(yaml, vars) {
        Ok(config) => panic!("expected errors, got {config:?}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// The minimal config with `extra` top-level sections appended.
fn minimal_with(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

/// A config whose single pool holds one backend with the given inline YAML mapping body.
fn with_backend(backend: &str) -> String {
    format!(
        "listeners:\n  - addr: \"127.0.0.1:6080\"\npools:\n  default:\n    backends:\n      - {{ {backend} }}\n"
    )
}

fn touch(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, "-----BEGIN PUBLIC KEY-----\n").expect("write test file");
    path_str(&path)
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

#[test]
fn minimal_config_gets_the_defaults() {
    let config = load_ok(MINIMAL, &[("VNCGATE_JWT_SECRET", SECRET)]);

    assert_eq!(config.server.threads, 2);
    assert_eq!(config.server.pid_file, PathBuf::from("/tmp/vncgate.pid"));
    assert_eq!(
        config.server.upgrade_sock,
        PathBuf::from("/tmp/vncgate_upgrade.sock")
    );
    assert_eq!(config.server.drain, Duration::from_secs(300));

    assert_eq!(config.listeners.len(), 1);
    assert_eq!(
        config.listeners[0].addr,
        "127.0.0.1:6080".parse::<SocketAddr>().expect("addr")
    );
    assert!(config.listeners[0].tls.is_none());
    assert_eq!(config.paths, ["/websockify"]);
    assert_eq!(config.web_root, None);
    assert!(config.admin.is_none());

    let auth = &config.auth;
    assert_eq!(auth.algorithms, [Algorithm::HS256]);
    assert_eq!(auth.secret.as_ref().map(|s| s.expose()), Some(SECRET));
    assert!(auth.public_key_files.is_empty());
    assert_eq!(auth.jwks_url, None);
    assert_eq!(auth.issuer, None);
    assert_eq!(auth.audience, None);
    assert_eq!(auth.leeway, Duration::from_secs(30));
    assert!(auth.allowed_origins.is_empty());
    assert_eq!(auth.on_expiry, OnExpiry::Close);

    assert!(matches!(config.store.kind, StoreKind::Memory));
    assert_eq!(config.store.key_prefix, "vncgate:");
    assert_eq!(config.store.session_idle_ttl, Duration::from_secs(3600));

    let pool = config.pool("default").expect("default pool");
    assert!(!pool.failover);
    assert_eq!(pool.backends.len(), 1);
    assert_eq!(pool.backends[0].name, "desk-a");
    assert_eq!(
        pool.backends[0].addr,
        BackendAddr {
            host: "10.0.0.11".into(),
            port: 5901
        }
    );
    assert_eq!(pool.backends[0].protocol, BackendProtocol::Rfb);

    let limits = &config.limits;
    assert_eq!(limits.max_sessions, 10_000);
    assert_eq!(limits.max_sessions_per_user, 5);
    assert_eq!(limits.auth_failures_per_minute, 60);
    assert_eq!(limits.idle_timeout, None);
    assert_eq!(limits.max_message_bytes, 4_194_304);
    assert_eq!(limits.ping_interval, Duration::from_secs(20));
    assert_eq!(limits.pong_timeout, Duration::from_secs(20));

    assert_eq!(config.logging.format, LogFormat::Json);
    assert_eq!(config.logging.level, "info");
}

#[test]
fn full_config_resolves_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = touch(dir.path(), "cert.pem");
    let key = touch(dir.path(), "key.pem");
    let public_key = touch(dir.path(), "jwt-public.pem");
    let web_root = dir.path().join("novnc");
    std::fs::create_dir(&web_root).expect("mkdir");
    let web_root = path_str(&web_root);

    let yaml = format!(
        r#"
server:
  threads: 4
  pid_file: /run/vncgate.pid
  upgrade_sock: /run/vncgate_upgrade.sock
  drain_seconds: 120
listeners:
  - addr: "127.0.0.1:6080"
  - addr: "[::1]:8443"
    tls: {{ cert: "{cert}", key: "{key}" }}
paths: ["/websockify", "/vnc/ws"]
web_root: "{web_root}"
admin:
  addr: "127.0.0.1:9600"
  token_env: ADMIN_TOKEN
auth:
  algorithms: [HS512, RS256, EdDSA]
  secret_env: JWT_SECRET
  public_key_files: ["{public_key}"]
  jwks_url: https://idp.example.com/.well-known/jwks.json
  issuer: https://idp.example.com
  audience: vncgate
  leeway_seconds: 10
  allowed_origins: ["https://vnc.example.com", "http://localhost:8080"]
  on_expiry: keep
store:
  kind: redis
  redis_url_env: REDIS_URL
  key_prefix: "vg:"
  session_idle_ttl_seconds: 600
pools:
  default:
    backends:
      - {{ name: desk-a, addr: "10.0.0.11:5901" }}
      - {{ name: desk-b, addr: "desk-b.vnc.internal:6901", protocol: websocket, path: "/ws" }}
      - {{ name: desk-c, addr: "[fd00::1]:5900", protocol: websocket }}
      - {{ name: desk.d_1, addr: "10.0.0.14:5901", protocol: rfb }}
    failover: true
  lab:
    backends:
      - {{ name: desk-a, addr: "10.1.0.11:5901" }}
limits:
  max_sessions: 500
  max_sessions_per_user: 2
  auth_failures_per_minute: 10
  idle_timeout_seconds: 900
  max_message_bytes: 1048576
  ping_interval_seconds: 15
  pong_timeout_seconds: 10
logging:
  format: pretty
  level: "vncgate=debug,info"
"#
    );
    let config = load_ok(
        &yaml,
        &[
            ("ADMIN_TOKEN", "admin-token-value"),
            ("JWT_SECRET", SECRET),
            ("REDIS_URL", "rediss://:pw@redis.internal:6380/2"),
        ],
    );

    assert_eq!(config.server.threads, 4);
    assert_eq!(config.server.pid_file, PathBuf::from("/run/vncgate.pid"));
    assert_eq!(
        config.server.upgrade_sock,
        PathBuf::from("/run/vncgate_upgrade.sock")
    );
    assert_eq!(config.server.drain, Duration::from_secs(120));

    let addrs: Vec<String> = config
        .listeners
        .iter()
        .map(|l| l.addr.to_string())
        .collect();
    assert_eq!(addrs, ["127.0.0.1:6080", "[::1]:8443"]);
    assert!(config.listeners[0].tls.is_none());
    let tls = config.listeners[1].tls.as_ref().expect("tls");
    assert_eq!(tls.cert, PathBuf::from(&cert));
    assert_eq!(tls.key, PathBuf::from(&key));
    assert_eq!(config.paths, ["/websockify", "/vnc/ws"]);
    assert_eq!(config.web_root, Some(PathBuf::from(&web_root)));

    let admin = config.admin.as_ref().expect("admin");
    assert_eq!(admin.addr.to_string(), "127.0.0.1:9600");
    assert_eq!(
        admin.token.as_ref().map(|t| t.expose()),
        Some("admin-token-value")
    );

    let auth = &config.auth;
    assert_eq!(
        auth.algorithms,
        [Algorithm::HS512, Algorithm::RS256, Algorithm::EdDSA]
    );
    assert_eq!(auth.secret.as_ref().map(|s| s.expose()), Some(SECRET));
    assert_eq!(auth.public_key_files, [PathBuf::from(&public_key)]);
    assert_eq!(
        auth.jwks_url.as_deref(),
        Some("https://idp.example.com/.well-known/jwks.json")
    );
    assert_eq!(auth.issuer.as_deref(), Some("https://idp.example.com"));
    assert_eq!(auth.audience.as_deref(), Some("vncgate"));
    assert_eq!(auth.leeway, Duration::from_secs(10));
    assert_eq!(
        auth.allowed_origins,
        ["https://vnc.example.com", "http://localhost:8080"]
    );
    assert_eq!(auth.on_expiry, OnExpiry::Keep);

    match &config.store.kind {
        StoreKind::Redis {
            topology: RedisTopology::Standalone { url },
        } => assert_eq!(url.expose(), "rediss://:pw@redis.internal:6380/2"),
        other => panic!("expected redis, got {other:?}"),
    }
    assert_eq!(config.store.key_prefix, "vg:");
    assert_eq!(config.store.session_idle_ttl, Duration::from_secs(600));

    let names: Vec<&str> = config.pools.keys().map(String::as_str).collect();
    assert_eq!(names, ["default", "lab"]);
    let pool = config.pool("default").expect("default pool");
    assert!(pool.failover);
    let backends: Vec<(&str, String, &BackendProtocol)> = pool
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr.to_string(), &b.protocol))
        .collect();
    let ws = |path: &str| BackendProtocol::WebSocket { path: path.into() };
    assert_eq!(
        backends,
        [
            (
                "desk-a",
                "10.0.0.11:5901".to_string(),
                &BackendProtocol::Rfb
            ),
            ("desk-b", "desk-b.vnc.internal:6901".to_string(), &ws("/ws")),
            ("desk-c", "[fd00::1]:5900".to_string(), &ws("/websockify")),
            (
                "desk.d_1",
                "10.0.0.14:5901".to_string(),
                &BackendProtocol::Rfb
            ),
        ]
    );
    assert_eq!(pool.backends[2].addr.host, "fd00::1");
    let lab = config.pool("lab").expect("lab pool");
    assert!(!lab.failover);
    assert_eq!(lab.backends[0].addr.to_string(), "10.1.0.11:5901");

    let limits = &config.limits;
    assert_eq!(limits.max_sessions, 500);
    assert_eq!(limits.max_sessions_per_user, 2);
    assert_eq!(limits.auth_failures_per_minute, 10);
    assert_eq!(limits.idle_timeout, Some(Duration::from_secs(900)));
    assert_eq!(limits.max_message_bytes, 1_048_576);
    assert_eq!(limits.ping_interval, Duration::from_secs(15));
    assert_eq!(limits.pong_timeout, Duration::from_secs(10));

    assert_eq!(config.logging.format, LogFormat::Pretty);
    assert_eq!(config.logging.level, "vncgate=debug,info");

    // No secret may surface in a config dump (e.g. a debug log line at start).
    let dump = format!("{config:?}");
    for secret in [SECRET, "admin-token-value", "rediss://", ":pw@"] {
        assert!(!dump.contains(secret), "{secret:?} leaked in {dump}");
    }
}

/// The example of contract §2, verbatim except for the TLS file paths, which must exist.
const CONTRACT_EXAMPLE: &str = r#"
server:                          # optional; passed to Pingora's server conf
  threads: 2
  pid_file: /run/vncgate.pid
  upgrade_sock: /run/vncgate_upgrade.sock
  drain_seconds: 300             # on upgrade/shutdown: keep live sessions this long, then close 1001
listeners:
  - addr: "127.0.0.1:6080"       # plain (ws://)
  - addr: "0.0.0.0:8443"         # TLS (wss://)
    tls: { cert: conf/tls/cert.pem, key: conf/tls/key.pem }
paths: ["/websockify"]           # request paths that accept the WebSocket upgrade
web_root: null                   # optional directory served as static files on the listeners (e.g. noVNC)
admin:
  addr: "127.0.0.1:9600"         # /metrics /healthz /readyz (open) and /admin/* (bearer token)
  token_env: VNCGATE_ADMIN_TOKEN
auth:
  algorithms: [HS256]            # any of HS256 HS384 HS512 RS256 RS384 RS512 PS256 ES256 ES384 EdDSA
  secret_env: VNCGATE_JWT_SECRET # for HS*
  public_key_files: []           # PEM files for RS*/PS*/ES*/EdDSA
  jwks_url: null                 # JWKS endpoint, cached; refreshed on unknown kid
  issuer: null                   # when set, `iss` is required and must match
  audience: null                 # when set, `aud` is required and must match
  leeway_seconds: 30
  allowed_origins: []            # exact matches; empty = any Origin (logged as a warning at start)
  on_expiry: close               # close | keep : what happens to a live session when its token expires
store:
  kind: memory                   # memory (single instance) | redis (shared by replicas)
  redis_url_env: VNCGATE_REDIS_URL   # redis://[:password@]host:port[/db] or rediss://
  key_prefix: "vncgate:"
  session_idle_ttl_seconds: 3600 # a pin outlives its last connection by this long
pools:
  default:
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901" }                                   # raw RFB over TCP
      - { name: desk-b, addr: "10.0.0.12:6901", protocol: websocket, path: "/websockify" }  # WebSocket-native backend
    failover: false              # true: re-pin to a healthy backend when the pinned one is down
limits:
  max_sessions: 10000            # per process; above it new upgrades get 503
  max_sessions_per_user: 5       # live connections per `sub`; above it 429
  auth_failures_per_minute: 60   # per client address; above it 429 until the minute passes
  idle_timeout_seconds: 0        # 0 = off; no client->backend bytes for this long -> close 4008
  max_message_bytes: 4194304     # larger client message -> close 1009
  ping_interval_seconds: 20
  pong_timeout_seconds: 20       # no pong in time -> connection dropped as dead
logging:
  format: json                   # json | pretty
  level: info                    # overridden by env VNCGATE_LOG (tracing filter syntax)
"#;

#[test]
fn contract_example_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = touch(dir.path(), "cert.pem");
    let key = touch(dir.path(), "key.pem");
    let yaml = CONTRACT_EXAMPLE
        .replace("conf/tls/cert.pem", &cert)
        .replace("conf/tls/key.pem", &key);
    let config = load_ok(
        &yaml,
        &[
            ("VNCGATE_JWT_SECRET", SECRET),
            ("VNCGATE_ADMIN_TOKEN", "admin"),
        ],
    );
    assert_eq!(config.listeners.len(), 2);
    assert!(config.listeners[1].tls.is_some());
    let pool = config.pool("default").expect("default pool");
    assert_eq!(
        pool.backends[1].protocol,
        BackendProtocol::WebSocket {
            path: "/websockify".into()
        }
    );
    assert_eq!(config.server.pid_file, PathBuf::from("/run/vncgate.pid"));
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let yaml = r#"
server:
  threads: 0
listeners:
  - addr: "127.0.0.1:6080"
  - addr: "127.0.0.1:6080"
  - addr: "localhost:6080"
    tls: { cert: conf/x.pem, key: conf/x-key.pem }
paths: ["websockify", "/a?b"]
web_root: /nonexistent/vncgate-web-root
admin:
  addr: "127.0.0.1:6080"
  token_env: ADMIN_TOKEN
auth:
  algorithms: [HS256, none, RS256]
  jwks_url: ftp://idp.example.com/jwks
  issuer: ""
  leeway_seconds: 301
  allowed_origins: ["https://vnc.example.com/"]
  on_expiry: never
store:
  kind: redis
  session_idle_ttl_seconds: 0
pools:
  default:
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901" }
      - { name: desk-a, addr: "x" }
      - { name: "bad name", addr: "10.0.0.13:5901", path: "/ws" }
      - { name: desk-d, addr: "10.0.0.14:5901", protocol: vnc }
      - { name: desk-e, addr: "10.0.0.15:5901", protocol: websocket, path: "ws" }
  empty:
    backends: []
limits:
  max_sessions: 0
  max_sessions_per_user: 0
  auth_failures_per_minute: 0
  max_message_bytes: 100
  ping_interval_seconds: 0
  pong_timeout_seconds: 0
logging:
  format: xml
  level: ""
"#;
    assert_eq!(
        errors(yaml, &[]),
        [
            "server.threads: must be at least 1",
            r#"listeners[1].addr: duplicate listener address "127.0.0.1:6080""#,
            r#"listeners[2].addr: invalid socket address "localhost:6080""#,
            r#"listeners[2].tls.cert: file not found "conf/x.pem""#,
            r#"listeners[2].tls.key: file not found "conf/x-key.pem""#,
            r#"paths[0]: must start with "/": "websockify""#,
            r#"paths[1]: must not contain "?": "/a?b""#,
            r#"web_root: directory not found "/nonexistent/vncgate-web-root""#,
            r#"admin.addr: "127.0.0.1:6080" is also a listener address"#,
            "admin.token_env: environment variable ADMIN_TOKEN is not set",
            r#"auth.algorithms[1]: unsupported algorithm "none" (expected HS256, HS384, HS512, RS256, RS384, RS512, PS256, ES256, ES384 or EdDSA)"#,
            "auth.secret_env: environment variable VNCGATE_JWT_SECRET is not set",
            r#"auth.jwks_url: must be an https:// URL (http:// only on loopback): "ftp://idp.example.com/jwks""#,
            "auth.issuer: must not be empty (use null to disable the check)",
            "auth.leeway_seconds: must be at most 300",
            r#"auth.allowed_origins[0]: invalid origin "https://vnc.example.com/" (expected scheme://host[:port], no path)"#,
            r#"auth.on_expiry: invalid value "never" (expected close or keep)"#,
            "store.redis_url_env: environment variable VNCGATE_REDIS_URL is not set",
            "store.session_idle_ttl_seconds: must be at least 1",
            r#"pools.default.backends[1].name: duplicate backend name "desk-a""#,
            r#"pools.default.backends[1].addr: invalid socket address "x""#,
            r#"pools.default.backends[2].name: invalid backend name "bad name" (expected [A-Za-z0-9._-]{1,64})"#,
            "pools.default.backends[2].path: only allowed with protocol websocket",
            r#"pools.default.backends[3].protocol: invalid value "vnc" (expected rfb or websocket)"#,
            r#"pools.default.backends[4].path: must start with "/": "ws""#,
            "pools.empty.backends: at least one backend is required",
            "limits.max_sessions: must be at least 1",
            "limits.max_sessions_per_user: must be at least 1",
            "limits.auth_failures_per_minute: must be at least 1",
            "limits.max_message_bytes: must be at least 1024",
            "limits.ping_interval_seconds: must be at least 1",
            "limits.pong_timeout_seconds: must be at least 1",
            r#"logging.format: invalid value "xml" (expected json or pretty)"#,
            "logging.level: must not be empty",
        ]
    );
}

#[test]
fn empty_file_names_every_required_section() {
    assert_eq!(
        errors("# nothing yet\n", &[("VNCGATE_JWT_SECRET", SECRET)]),
        [
            "listeners: at least one listener is required",
            "pools: at least one pool is required",
        ]
    );
}

#[test]
fn errors_display_one_per_line() {
    let errors = load("listeners: []\npools: {}\n", &[]).expect_err("invalid");
    assert_eq!(
        errors.to_string(),
        "listeners: at least one listener is required\n\
         auth.secret_env: environment variable VNCGATE_JWT_SECRET is not set\n\
         pools: at least one pool is required"
    );
    let whole_file = ConfigError {
        key: String::new(),
        message: "cannot read vncgate.yaml".into(),
    };
    assert_eq!(whole_file.to_string(), "cannot read vncgate.yaml");
    assert_eq!(ConfigErrors::single("a.b", "bad").to_string(), "a.b: bad");
}

#[rstest]
#[case::top_level("bogus: 1\n", "bogus")]
#[case::server("server:\n  thread: 2\n", "server.thread")]
#[case::tls(
    "listeners:\n  - addr: \"127.0.0.1:6080\"\n    tls: { cert: a, key: b, chain: c }\n",
    "listeners[0].tls.chain"
)]
#[case::backend(
    "pools:\n  default:\n    backends:\n      - { name: a, addr: \"h:1\", protocl: rfb }\n",
    "pools.default.backends[0].protocl"
)]
#[case::limits("limits:\n  max_session: 5\n", "limits.max_session")]
fn unknown_keys_are_rejected_with_their_path(#[case] yaml: &str, #[case] key: &str) {
    // These fragments are incomplete configs: their other problems (no listeners, no pools) are
    // reported too, now that an unknown key no longer stops the check.
    let errors = load(yaml, &[("VNCGATE_JWT_SECRET", SECRET)]).expect_err("unknown key");
    let unknown: Vec<&ConfigError> = errors
        .iter()
        .filter(|e| e.message.starts_with("unknown field"))
        .collect();
    assert_eq!(unknown.len(), 1, "{errors}");
    assert_eq!(unknown[0].key, key);
    let field = key.rsplit('.').next().unwrap_or(key);
    assert!(
        unknown[0]
            .message
            .starts_with(&format!("unknown field `{field}`")),
        "{errors}"
    );
}

/// `run` and a reload use the same loader: a config that is otherwise valid is refused for a typo.
#[test]
fn an_unknown_key_alone_makes_a_config_invalid() {
    let yaml = minimal_with("limits:\n  max_session: 5\n");
    let errors = load(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]).expect_err("unknown key");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].key, "limits.max_session");
}

/// An operator fixes every typo in one run: each unknown key, wherever it is, and the other
/// problems of the file, one line each and in the order of the file.
#[test]
fn every_unknown_key_is_reported_with_the_other_problems_in_file_order() {
    let yaml = r#"
server:
  thread: 4
listeners:
  - addr: "127.0.0.1:6080"
    tls: { cert: /nonexistent/cert.pem, key: /nonexistent/key.pem, chain: x }
pools:
  default:
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901", adr: "10.0.0.12:5901" }
limits:
  max_session: 5
"#;
    let got: Vec<(String, String)> = load(yaml, &[("VNCGATE_JWT_SECRET", SECRET)])
        .expect_err("invalid")
        .iter()
        .map(|e| (e.key.clone(), e.message.clone()))
        .collect();
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "server.thread",
            "listeners[0].tls.cert",
            "listeners[0].tls.key",
            "listeners[0].tls.chain",
            "pools.default.backends[0].adr",
            "limits.max_session",
        ],
        "{got:#?}"
    );
    for (key, message) in [&got[0], &got[3], &got[4], &got[5]] {
        let field = key.rsplit('.').next().unwrap_or(key);
        assert!(
            message.starts_with(&format!("unknown field `{field}`, expected")),
            "{key}: {message}"
        );
    }
    assert_eq!(got[1].1, r#"file not found "/nonexistent/cert.pem""#);
    // The message keeps serde's hint of what was meant.
    assert!(got[5].1.contains("`max_sessions`"), "{}", got[5].1);
}

#[test]
fn a_wrong_type_is_reported_after_the_unknown_keys_before_it() {
    let yaml =
        minimal_with("server:\n  thread: 4\nlimits:\n  max_session: 5\n  max_sessions: lots\n");
    let errors = load(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]).expect_err("invalid");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["server.thread", "limits.max_session", "limits.max_sessions"],
        "{errors}"
    );
}

/// `check-config --lint`: the file alone. Files and variables belong to the target environment.
#[test]
fn lint_checks_the_file_without_its_files_or_variables() {
    let yaml = r#"
listeners:
  - addr: "0.0.0.0:8443"
    tls: { cert: /nonexistent/cert.pem, key: /nonexistent/key.pem }
web_root: /nonexistent/web
admin: { addr: "127.0.0.1:9600", token_env: VNCGATE_ADMIN_TOKEN }
auth:
  algorithms: [HS256, RS256]
  secret_env: VNCGATE_JWT_SECRET
  public_key_files: [/nonexistent/jwt.pem]
store: { kind: redis, redis_url_env: VNCGATE_REDIS_URL }
pools:
  default:
    rfb:
      password_env: VNCGATE_VNC_PASSWORD
      tls: { ca_file: /nonexistent/ca.pem, server_name: desk.internal }
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901", password_env: VNCGATE_DESK_A_PASSWORD }
"#;
    assert_eq!(Config::lint_yaml(yaml), Ok(()));
    // The same file where it runs: every file and variable is checked.
    let keys: Vec<String> = errors(yaml, &[])
        .iter()
        .map(|line| line.split(':').next().unwrap_or_default().to_string())
        .collect();
    for key in [
        "listeners[0].tls.cert",
        "listeners[0].tls.key",
        "web_root",
        "admin.token_env",
        "auth.secret_env",
        "auth.public_key_files[0]",
        "store.redis_url_env",
        "pools.default.rfb.password_env",
        "pools.default.rfb.tls.ca_file",
        "pools.default.backends[0].password_env",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing in {keys:?}");
    }
}

#[test]
fn lint_still_reports_the_schema_ranges_and_cross_key_rules() {
    let yaml = r#"
listeners:
  - addr: "0.0.0.0:8080"
    proxy_protocol: true
auth:
  secret_env: "$VNCGATE_JWT_SECRET"
pools:
  default:
    rfb:
      mode: transparent
      username_env: VNC_USER
      tls: { ca_file: /nonexistent/ca.pem, server_name: "bad name!" }
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901", password_env: VNC_PW }
limits:
  max_sessions: 0
  max_sesions: 5
"#;
    let errors = Config::lint_yaml(yaml).expect_err("invalid");
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let (unknown, problems) = lines.split_last().expect("problems");
    assert_eq!(
        problems,
        [
            "listeners[0].trusted_proxies: required with proxy_protocol: true (the networks of the load balancers)",
            "auth.secret_env: must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)",
            r#"pools.default.rfb.tls.server_name: invalid server name "bad name!""#,
            "pools.default.rfb: password_env, username_env and tls need mode: terminate",
            "pools.default.backends[0].password_env: backend credentials need rfb.mode: terminate",
            "limits.max_sessions: must be at least 1",
        ]
    );
    assert!(
        unknown.starts_with("limits.max_sesions: unknown field `max_sesions`, expected"),
        "{errors}"
    );
}

#[rstest]
#[case::negative("server:\n  threads: -1\n", "server.threads")]
#[case::word("limits:\n  max_sessions: lots\n", "limits.max_sessions")]
#[case::list_for_map("server: [1, 2]\n", "server")]
#[case::not_a_bool(
    "pools:\n  default:\n    failover: maybe\n    backends: []\n",
    "pools.default.failover"
)]
#[case::missing_required("listeners:\n  - tls: { cert: a, key: b }\n", "listeners[0]")]
fn wrong_types_name_their_key(#[case] yaml: &str, #[case] key: &str) {
    let errors = load(yaml, &[]).expect_err("wrong type");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].key, key, "{errors}");
    // The message must not repeat the key it is printed after.
    assert!(!errors.0[0].message.starts_with(key), "{errors}");
}

#[test]
fn yaml_syntax_error_is_reported_without_a_key() {
    let errors = load("server:\n  threads: 1\n bad: [\n", &[]).expect_err("syntax");
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].key, "");
    assert!(errors.0[0].message.contains("line"), "{errors}");
}

#[test]
fn duplicate_pool_names_are_an_error() {
    let yaml = "listeners:\n  - addr: \"127.0.0.1:6080\"\npools:\n  a:\n    backends: [{ name: x, addr: \"h:1\" }]\n  a:\n    backends: [{ name: y, addr: \"h:2\" }]\n";
    assert_eq!(
        errors(yaml, &[("VNCGATE_JWT_SECRET", SECRET)]),
        [r#"pools.a: duplicate pool name "a""#]
    );
}

#[test]
fn pool_names_are_checked() {
    let yaml = "listeners:\n  - addr: \"127.0.0.1:6080\"\npools:\n  \"no/slash\":\n    backends: [{ name: x, addr: \"h:1\" }]\n";
    assert_eq!(
        errors(yaml, &[("VNCGATE_JWT_SECRET", SECRET)]),
        [r#"pools.no/slash: invalid pool name "no/slash" (expected [A-Za-z0-9._-]{1,64})"#]
    );
}

#[rstest]
#[case::ipv4("10.0.0.11:5901", "10.0.0.11", 5901)]
#[case::ipv6("[fd00::11]:5901", "fd00::11", 5901)]
#[case::dns(
    "desk-a.vnc.svc.cluster.local:5900",
    "desk-a.vnc.svc.cluster.local",
    5900
)]
#[case::short_name("desk:1", "desk", 1)]
fn backend_addresses_are_parsed(#[case] addr: &str, #[case] host: &str, #[case] port: u16) {
    let config = load_ok(
        &with_backend(&format!("name: d, addr: \"{addr}\"")),
        &[("VNCGATE_JWT_SECRET", SECRET)],
    );
    let backend = &config.pool("default").expect("pool").backends[0];
    assert_eq!(
        backend.addr,
        BackendAddr {
            host: host.into(),
            port
        }
    );
}

#[rstest]
#[case::no_port("x")]
#[case::empty_port("x:")]
#[case::port_too_big("x:99999")]
#[case::no_host(":80")]
#[case::port_zero("x:0")]
#[case::bare_ipv6("fd00::1:5901")]
#[case::bad_ipv4("10.0.0.300:5901")]
#[case::space("desk a:5901")]
#[case::scheme("tcp://desk:5901")]
fn invalid_backend_addresses(#[case] addr: &str) {
    assert_eq!(
        errors(
            &with_backend(&format!("name: d, addr: \"{addr}\"")),
            &[("VNCGATE_JWT_SECRET", SECRET)]
        ),
        [format!(
            "pools.default.backends[0].addr: invalid socket address \"{addr}\""
        )]
    );
}

#[rstest]
#[case("none")]
#[case("PS384")]
#[case("PS512")]
#[case("ES512")]
#[case("hs256")]
fn unsupported_algorithms(#[case] name: &str) {
    let yaml = minimal_with(&format!("auth:\n  algorithms: [HS256, \"{name}\"]\n"));
    assert_eq!(
        errors(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]),
        [format!(
            "auth.algorithms[1]: unsupported algorithm \"{name}\" (expected HS256, HS384, HS512, \
             RS256, RS384, RS512, PS256, ES256, ES384 or EdDSA)"
        )]
    );
}

#[rstest]
#[case::unset(&[], "auth.secret_env: environment variable VNCGATE_JWT_SECRET is not set")]
#[case::empty(&[("VNCGATE_JWT_SECRET", "")], "auth.secret_env: environment variable VNCGATE_JWT_SECRET is empty")]
#[case::short(&[("VNCGATE_JWT_SECRET", "too-short")], "auth.secret_env: secret must be at least 32 bytes")]
#[case::wrong_variable(&[("OTHER", SECRET)], "auth.secret_env: environment variable VNCGATE_JWT_SECRET is not set")]
fn hmac_secret_must_be_set_and_long(#[case] vars: &[(&str, &str)], #[case] expected: &str) {
    assert_eq!(errors(MINIMAL, vars), [expected]);
}

#[test]
fn secrets_come_from_the_named_variables() {
    let yaml = minimal_with(
        "admin:\n  addr: \"127.0.0.1:9600\"\n  token_env: MY_ADMIN\nauth:\n  secret_env: MY_SECRET\n\
         store:\n  kind: redis\n  redis_url_env: MY_REDIS\n",
    );
    let config = load_ok(
        &yaml,
        &[
            ("MY_SECRET", SECRET),
            ("MY_ADMIN", "let-me-in"),
            ("MY_REDIS", "redis://redis:6379/0"),
            (
                "VNCGATE_JWT_SECRET",
                "not-this-one-not-this-one-not-this-one",
            ),
        ],
    );
    assert_eq!(
        config.auth.secret.as_ref().map(|s| s.expose()),
        Some(SECRET)
    );
    let admin = config.admin.expect("admin");
    assert_eq!(admin.token.as_ref().map(|t| t.expose()), Some("let-me-in"));
    match config.store.kind {
        StoreKind::Redis {
            topology: RedisTopology::Standalone { url },
        } => assert_eq!(url.expose(), "redis://redis:6379/0"),
        other => panic!("expected redis, got {other:?}"),
    }
}

#[test]
fn admin_without_token_env_has_no_token() {
    let yaml = minimal_with("admin:\n  addr: \"[::1]:9600\"\n");
    let config = load_ok(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]);
    let admin = config.admin.expect("admin");
    assert_eq!(admin.addr.to_string(), "[::1]:9600");
    assert!(admin.token.is_none());
}

#[rstest]
#[case::unset(&[], "store.redis_url_env: environment variable VNCGATE_REDIS_URL is not set")]
#[case::wrong_scheme(
    &[("VNCGATE_REDIS_URL", "http://:hunter2@redis:6379")],
    "store.redis_url_env: environment variable VNCGATE_REDIS_URL must hold a redis:// or rediss:// URL"
)]
fn redis_url_is_checked_without_echoing_it(#[case] vars: &[(&str, &str)], #[case] expected: &str) {
    let mut vars = vars.to_vec();
    vars.push(("VNCGATE_JWT_SECRET", SECRET));
    let yaml = minimal_with("store:\n  kind: redis\n");
    let found = errors(&yaml, &vars);
    assert_eq!(found, [expected]);
    assert!(!found[0].contains("hunter2"));
}

#[test]
fn secret_debug_is_redacted() {
    let secret = vncgate::config::Secret::new("super-secret-value");
    assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    let config = load_ok(MINIMAL, &[("VNCGATE_JWT_SECRET", SECRET)]);
    assert!(!format!("{config:?}").contains(SECRET));
    assert!(!format!("{:#?}", config.auth).contains(SECRET));
}

#[test]
fn asymmetric_only_needs_keys_but_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = touch(dir.path(), "pub.pem");
    let yaml = minimal_with(&format!(
        "auth:\n  algorithms: [RS256, ES256]\n  public_key_files: [\"{key}\"]\n"
    ));
    let config = load_ok(&yaml, &[]);
    assert_eq!(config.auth.algorithms, [Algorithm::RS256, Algorithm::ES256]);
    assert!(config.auth.secret.is_none());
    assert_eq!(config.auth.public_key_files, [PathBuf::from(key)]);
}

#[rstest]
#[case::no_keys(
    "auth:\n  algorithms: [ES256]\n",
    "auth: ES256 needs public_key_files or jwks_url to verify tokens"
)]
#[case::missing_key_file(
    "auth:\n  algorithms: [RS256]\n  public_key_files: [keys/missing.pem]\n",
    r#"auth.public_key_files[0]: file not found "keys/missing.pem""#
)]
#[case::no_algorithms(
    "auth:\n  algorithms: []\n",
    "auth.algorithms: at least one algorithm is required"
)]
fn asymmetric_key_problems(#[case] auth: &str, #[case] expected: &str) {
    assert_eq!(errors(&minimal_with(auth), &[]), [expected]);
}

#[test]
fn jwks_url_alone_is_enough_for_asymmetric() {
    let yaml =
        minimal_with("auth:\n  algorithms: [EdDSA]\n  jwks_url: https://idp.internal/jwks\n");
    let config = load_ok(&yaml, &[]);
    assert_eq!(
        config.auth.jwks_url.as_deref(),
        Some("https://idp.internal/jwks")
    );
}

#[test]
fn files_must_be_files_and_web_root_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = touch(dir.path(), "index.html");
    let dir_path = path_str(dir.path());
    let yaml = format!(
        "listeners:\n  - addr: \"127.0.0.1:8443\"\n    tls: {{ cert: \"{dir_path}\", key: \"{file}\" }}\n\
         web_root: \"{file}\"\n\
         pools:\n  default:\n    backends: [{{ name: a, addr: \"h:1\" }}]\n"
    );
    assert_eq!(
        errors(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]),
        [
            format!("listeners[0].tls.cert: not a file \"{dir_path}\""),
            format!("web_root: not a directory \"{file}\""),
        ]
    );
}

#[rstest]
#[case::plain_level("debug")]
#[case::directives("vncgate=trace,pingora_core=warn,info")]
fn log_filters_are_accepted(#[case] level: &str) {
    let yaml = minimal_with(&format!("logging:\n  level: \"{level}\"\n"));
    let config = load_ok(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]);
    assert_eq!(config.logging.level, level);
}

#[test]
fn invalid_log_filter_is_rejected() {
    let yaml = minimal_with("logging:\n  level: \"vncgate=loud\"\n");
    let found = errors(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]);
    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with(r#"logging.level: invalid log filter "vncgate=loud": "#),
        "{found:?}"
    );
}

#[rstest]
#[case::message_min("max_message_bytes: 1024", true)]
#[case::message_max("max_message_bytes: 268435456", true)]
#[case::message_too_big("max_message_bytes: 268435457", false)]
#[case::idle_timeout_zero_is_off("idle_timeout_seconds: 0", true)]
fn limit_bounds(#[case] line: &str, #[case] valid: bool) {
    let yaml = minimal_with(&format!("limits:\n  {line}\n"));
    let result = load(&yaml, &[("VNCGATE_JWT_SECRET", SECRET)]);
    assert_eq!(result.is_ok(), valid, "{line}: {result:?}");
    if let Err(errors) = result {
        assert_eq!(
            errors.to_string(),
            "limits.max_message_bytes: must be at most 268435456"
        );
    }
}

#[test]
fn proxy_protocol_listeners_need_trusted_networks() {
    let yaml = |listener: &str| {
        format!(
            "listeners:\n  - {{ {listener} }}\npools:\n  default:\n    backends:\n      - {{ name: a, addr: \"10.0.0.11:5901\" }}\n"
        )
    };
    let secret = [("VNCGATE_JWT_SECRET", SECRET)];
    let config = load_ok(
        &yaml(
            r#"addr: "0.0.0.0:8080", proxy_protocol: true, trusted_proxies: ["10.0.0.0/8", "192.0.2.10"]"#,
        ),
        &secret,
    );
    let nets: Vec<String> = config.listeners[0]
        .proxy_protocol
        .as_ref()
        .expect("proxy protocol on")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.10/32"]);
    assert!(
        load_ok(MINIMAL, &secret).listeners[0]
            .proxy_protocol
            .is_none()
    );

    let errs = errors(
        &yaml(r#"addr: "0.0.0.0:8080", proxy_protocol: true"#),
        &secret,
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("listeners[0].trusted_proxies: required"),
        "{errs:?}"
    );
    let errs = errors(
        &yaml(
            r#"addr: "0.0.0.0:8080", proxy_protocol: true, trusted_proxies: ["10.0.0.0/33", "lb"]"#,
        ),
        &secret,
    );
    assert_eq!(
        errs.iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect::<Vec<_>>(),
        [
            "listeners[0].trusted_proxies[0]",
            "listeners[0].trusted_proxies[1]"
        ]
    );
    let errs = errors(
        &yaml(r#"addr: "0.0.0.0:8080", trusted_proxies: ["10.0.0.0/8"]"#),
        &secret,
    );
    assert!(
        errs[0].starts_with("listeners[0].trusted_proxies: set only with"),
        "{errs:?}"
    );
}

#[test]
fn connection_limits_have_defaults_and_bounds() {
    let secret = [("VNCGATE_JWT_SECRET", SECRET)];
    let limits = load_ok(MINIMAL, &secret).limits;
    assert_eq!(limits.head_timeout, Duration::from_secs(10));
    assert_eq!(limits.tls_handshake_timeout, Duration::from_secs(10));
    assert_eq!(limits.max_head_bytes, 64 * 1024);
    assert_eq!(limits.max_pre_auth_connections, 8192);
    assert_eq!(limits.max_pre_auth_connections_per_address, 512);
    let errs = errors(
        &minimal_with(
            "limits:\n  head_timeout_seconds: 0\n  max_pre_auth_connections: 10\n  max_pre_auth_connections_per_address: 11\n",
        ),
        &secret,
    );
    let keys: Vec<&str> = errs
        .iter()
        .map(|e| e.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            "limits.head_timeout_seconds",
            "limits.max_pre_auth_connections_per_address"
        ]
    );
}

/// `events_path` (contract §14): default `/vncgate/events`, a path of its own.
#[rstest]
#[case::custom("events_path: /app/events\n", Ok("/app/events"))]
#[case::relative(
    "events_path: events\n",
    Err(r#"events_path: must start with "/": "events""#)
)]
#[case::query(
    "events_path: \"/e?x=1\"\n",
    Err(r#"events_path: must not contain "?": "/e?x=1""#)
)]
#[case::an_upgrade_path(
    "events_path: /websockify\n",
    Err(r#"events_path: "/websockify" is also in paths: a request goes to one or the other"#)
)]
#[case::healthz("events_path: /healthz\n", Err("events_path: must not be /healthz"))]
fn events_path(#[case] yaml: &str, #[case] want: Result<&str, &str>) {
    let vars = [("VNCGATE_JWT_SECRET", SECRET)];
    assert_eq!(load_ok(MINIMAL, &vars).events_path, "/vncgate/events");
    match want {
        Ok(path) => assert_eq!(load_ok(&minimal_with(yaml), &vars).events_path, path),
        Err(line) => assert_eq!(errors(&minimal_with(yaml), &vars), [line]),
    }
}
