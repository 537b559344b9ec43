//! The command line as operators meet it (contract §1): exit codes and one-line errors of
//! `check-config` and `token`, the example configs in `conf/`, a token from `vncgate token`
//! opening a session on `vncgate run`, and `vncgate demo` end to end, including that the desktop
//! it starts goes away with it.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::rfb_client::{self, WsConnect};
use common::rfb_server::{Mode, RfbServer};
use common::{ADMIN_TOKEN, EVENT_TIMEOUT, SECRET, free_port};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rstest::rstest;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

const BIN: &str = env!("CARGO_BIN_EXE_vncgate");
/// Every command runs from the repository root, as an operator following the README would: the
/// configs name `conf/...` relative to it, and the demo finds `./web` there.
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

fn command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .current_dir(REPO)
        // It would override `logging.level` and could hide the `listening` line tests await.
        .env_remove("VNCGATE_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs to completion with exactly `env`: a developer's own `VNCGATE_*` variables must not make
/// a config valid (or invalid) here.
fn vncgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run vncgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

fn lines(bytes: &[u8]) -> Vec<String> {
    text(bytes).lines().map(str::to_owned).collect()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn replace_once(haystack: &str, from: &str, to: &str) -> String {
    assert_eq!(
        haystack.matches(from).count(),
        1,
        "expected {from:?} exactly once in:\n{haystack}"
    );
    haystack.replacen(from, to, 1)
}

// ---- check-config ---------------------------------------------------------------------------

/// A self-signed pair standing in for the TLS files a config names (the repository ships none;
/// see the top of conf/example.yaml). Returns the directory and the config text pointing into it.
fn with_generated_tls(yaml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).expect("cert");
    std::fs::write(
        dir.path().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .expect("key");
    // Every listener's certificate and key point at the generated pair, whatever paths the
    // file names (conf/example.yaml uses conf/tls/, deployment configs use their mount).
    let mut doc: serde_yaml::Value = serde_yaml::from_str(yaml).expect("YAML");
    if let Some(listeners) = doc.get_mut("listeners").and_then(|l| l.as_sequence_mut()) {
        for tls in listeners.iter_mut().filter_map(|l| l.get_mut("tls")) {
            if let Some(tls) = tls.as_mapping_mut() {
                for (key, file) in [("cert", "cert.pem"), ("key", "key.pem")] {
                    let path = dir.path().join(file).display().to_string();
                    tls.insert(key.into(), path.into());
                }
            }
        }
    }
    let yaml = serde_yaml::to_string(&doc).expect("YAML");
    (dir, yaml)
}

/// Values for every `*_env` key the config names, plus the default secret variable, which a
/// config relies on when it leaves `auth.secret_env` out (as conf/minimal.yaml does).
fn env_for(yaml: &str) -> Vec<(String, String)> {
    fn walk(value: &serde_yaml::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_yaml::Value::Mapping(map) => {
                for (key, value) in map {
                    match (key.as_str(), value.as_str()) {
                        (Some(key), Some(name)) if key.ends_with("_env") => {
                            let value = match key {
                                "secret_env" => SECRET,
                                "redis_url_env" => REDIS_URL,
                                _ => ADMIN_TOKEN,
                            };
                            out.push((name.to_owned(), value.to_owned()));
                        }
                        _ => {}
                    }
                    walk(value, out);
                }
            }
            serde_yaml::Value::Sequence(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).expect("YAML");
    let mut env = vec![("VNCGATE_JWT_SECRET".to_owned(), SECRET.to_owned())];
    walk(&doc, &mut env);
    env
}

fn check_config_text(yaml: &str, env: &[(String, String)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vncgate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    vncgate(&["check-config", "--config", path_str(&path)], &env)
}

fn conf_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(REPO).join("conf"))
        .expect("conf/")
        .map(|entry| entry.expect("conf/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_config_in_conf_passes_check_config() {
    let files = conf_files();
    let names: Vec<_> = files.iter().filter_map(|p| p.file_name()).collect();
    assert!(
        names.contains(&"example.yaml".as_ref()) && names.contains(&"minimal.yaml".as_ref()),
        "{names:?}"
    );
    for file in files {
        let yaml = std::fs::read_to_string(&file).expect("read config");
        let (_tls, yaml) = with_generated_tls(&yaml);
        let out = check_config_text(&yaml, &env_for(&yaml));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            file.display(),
            describe(&out)
        );
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{}",
            describe(&out)
        );
    }
}

/// The example presents Redis as the production store; switching to it must not need more than
/// the one-word change and the URL variable it already names.
#[test]
fn example_passes_check_config_with_the_redis_store() {
    let yaml = std::fs::read_to_string(Path::new(REPO).join("conf/example.yaml")).expect("read");
    let yaml = replace_once(&yaml, "kind: memory", "kind: redis");
    let (_tls, yaml) = with_generated_tls(&yaml);
    let env = env_for(&yaml);
    assert!(
        env.iter()
            .any(|(k, v)| k == "VNCGATE_REDIS_URL" && v == REDIS_URL)
    );
    let out = check_config_text(&yaml, &env);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// conf/example.yaml is the reference operators copy from, so it must show every key of the
/// schema (contract §2 and the per-pool `health_check_interval_seconds`).
#[test]
fn example_shows_every_config_key() {
    fn walk(value: &serde_yaml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match value {
            serde_yaml::Value::Mapping(map) => {
                for (key, value) in map {
                    let key = key.as_str().expect("string key");
                    // Pool names are the operator's own; what matters is the keys inside them.
                    let key = if prefix == "pools" { "*" } else { key };
                    let path = if prefix.is_empty() {
                        key.to_owned()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    out.insert(path.clone());
                    walk(value, &path, out);
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for item in items {
                    walk(item, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }
    let yaml = std::fs::read_to_string(Path::new(REPO).join("conf/example.yaml")).expect("read");
    let mut shown = BTreeSet::new();
    walk(&serde_yaml::from_str(&yaml).expect("YAML"), "", &mut shown);
    let expected: BTreeSet<String> = [
        "server",
        "server.threads",
        "server.pid_file",
        "server.upgrade_sock",
        "server.drain_seconds",
        "listeners",
        "listeners[].addr",
        "listeners[].tls",
        "listeners[].tls.cert",
        "listeners[].tls.key",
        "paths",
        "events_path",
        "web_root",
        "admin",
        "admin.addr",
        "admin.token_env",
        "auth",
        "auth.algorithms",
        "auth.secret_env",
        "auth.public_key_files",
        "auth.jwks_url",
        "auth.jwks_cache_seconds",
        "auth.jwks_min_refresh_seconds",
        "auth.issuer",
        "auth.audience",
        "auth.leeway_seconds",
        "auth.allowed_origins",
        "auth.on_expiry",
        "store",
        "store.kind",
        "store.redis_url_env",
        "store.key_prefix",
        "store.session_idle_ttl_seconds",
        "pools",
        "pools.*",
        "pools.*.backends",
        "pools.*.backends[].name",
        "pools.*.backends[].addr",
        "pools.*.backends[].protocol",
        "pools.*.backends[].path",
        "pools.*.backends[].password_env",
        "pools.*.failover",
        "pools.*.health_check",
        "pools.*.health_check_interval_seconds",
        "pools.*.rfb",
        "pools.*.rfb.mode",
        "pools.*.rfb.password_env",
        "pools.*.rfb.username_env",
        "pools.*.rfb.tls",
        "pools.*.clipboard",
        "pools.*.discovery",
        "pools.*.discovery.kind",
        "pools.*.discovery.addr_template",
        "pools.*.discovery.name_pattern",
        "limits",
        "limits.max_sessions",
        "limits.max_sessions_per_user",
        "limits.auth_failures_per_minute",
        "limits.idle_timeout_seconds",
        "limits.max_message_bytes",
        "limits.ping_interval_seconds",
        "limits.pong_timeout_seconds",
        "recording",
        "recording.dir",
        "recording.when",
        "recording.input",
        "recording.max_bytes_per_session",
        "recording.retention_days",
        "logging",
        "logging.format",
        "logging.level",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(shown, expected);
}

#[test]
fn check_config_prints_one_line_per_problem_naming_its_key() {
    let yaml = r#"
listeners:
  - addr: "127.0.0.1:6080"
  - addr: "nowhere"
pools:
  default:
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901" }
      - { name: desk-b, addr: "x" }
limits:
  max_message_bytes: 10
logging:
  format: xml
"#;
    // No VNCGATE_JWT_SECRET: a missing secret is one more problem, reported with the others.
    let out = check_config_text(yaml, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    // The set, not the order: the contract promises a line per problem, not a sequence.
    let got: BTreeSet<String> = lines(&out.stderr).into_iter().collect();
    let expected: BTreeSet<String> = [
        r#"listeners[1].addr: invalid socket address "nowhere""#,
        "auth.secret_env: environment variable VNCGATE_JWT_SECRET is not set",
        r#"pools.default.backends[1].addr: invalid socket address "x""#,
        "limits.max_message_bytes: must be at least 1024",
        r#"logging.format: invalid value "xml" (expected json or pretty)"#,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(got, expected);
    assert_eq!(
        lines(&out.stderr).len(),
        expected.len(),
        "{}",
        describe(&out)
    );
}

/// A config as CI sees it before a deploy: its certificates and secrets exist only in the target
/// environment.
const TARGET_ONLY: &str = r#"
listeners:
  - addr: "0.0.0.0:8443"
    tls: { cert: /etc/vncgate/tls/cert.pem, key: /etc/vncgate/tls/key.pem }
admin: { addr: "127.0.0.1:9600", token_env: VNCGATE_ADMIN_TOKEN }
auth:
  algorithms: [HS256, RS256]
  public_key_files: [/etc/vncgate/jwt-public.pem]
store: { kind: redis }
pools:
  default:
    rfb: { password_env: VNCGATE_VNC_PASSWORD }
    backends:
      - { name: desk-a, addr: "10.0.0.11:5901" }
"#;

#[test]
fn check_config_lint_needs_neither_the_files_nor_the_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vncgate.yaml");
    std::fs::write(&path, TARGET_ONLY).expect("write config");
    let config = path_str(&path);

    let out = vncgate(&["check-config", "--config", config, "--lint"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        describe(&out)
    );

    // Without --lint, the same file is checked for this machine: each missing file and variable.
    let out = vncgate(&["check-config", "--config", config], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let keys: BTreeSet<String> = lines(&out.stderr)
        .iter()
        .map(|line| line.split(": ").next().unwrap_or_default().to_owned())
        .collect();
    let expected: BTreeSet<String> = [
        "listeners[0].tls.cert",
        "listeners[0].tls.key",
        "admin.token_env",
        "auth.secret_env",
        "auth.public_key_files[0]",
        "store.redis_url_env",
        "pools.default.rfb.password_env",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(keys, expected, "{}", describe(&out));
}

#[test]
fn check_config_lint_still_reports_unknown_keys_and_ranges() {
    let yaml = format!("{TARGET_ONLY}limits:\n  max_session: 5\n  max_sessions_per_user: 0\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vncgate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let out = vncgate(
        &["check-config", "--lint", "--config", path_str(&path)],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let err = lines(&out.stderr);
    assert_eq!(err.len(), 2, "{}", describe(&out));
    assert!(
        err[0].starts_with("limits.max_session: unknown field `max_session`, expected"),
        "{}",
        describe(&out)
    );
    assert_eq!(err[1], "limits.max_sessions_per_user: must be at least 1");
}

/// What a CI job would run on the repository's own configs: as shipped, with no environment.
#[test]
fn every_config_in_conf_passes_check_config_lint() {
    for file in conf_files() {
        let out = vncgate(
            &["check-config", "--lint", "--config", path_str(&file)],
            &[],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            file.display(),
            describe(&out)
        );
    }
}

#[test]
fn check_config_on_a_missing_file_is_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.yaml");
    let out = vncgate(&["check-config", "--config", path_str(&missing)], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let err = lines(&out.stderr);
    assert_eq!(err.len(), 1, "{}", describe(&out));
    assert!(err[0].contains(path_str(&missing)), "{err:?}");
}

/// Usage errors exit 2 with one line on stderr that names the problem (contract §1).
#[rstest]
#[case::no_command(&[], "run, check-config, token, demo")]
#[case::unknown_command(&["frobnicate"], "frobnicate")]
#[case::check_config_without_config(&["check-config"], "--config")]
#[case::run_without_config(&["run"], "--config")]
#[case::token_without_sub(&["token", "--config", "conf/minimal.yaml"], "--sub")]
fn usage_errors_exit_2(#[case] args: &[&str], #[case] named: &str) {
    let out = vncgate(args, &[("VNCGATE_JWT_SECRET", SECRET)]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert!(text(&out.stderr).contains(named), "{}", describe(&out));
    assert_eq!(lines(&out.stderr).len(), 1, "{}", describe(&out));
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    let out = vncgate(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("check-config"),
        "{}",
        describe(&out)
    );
    assert!(out.stderr.is_empty(), "{}", describe(&out));
    let out = vncgate(&["check-config", "--help"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(text(&out.stdout).contains("--lint"), "{}", describe(&out));
}

// ---- token ----------------------------------------------------------------------------------

#[test]
fn token_prints_one_hs256_jwt_with_the_requested_claims() {
    let before = common::now();
    let out = vncgate(
        &[
            "token",
            "--config",
            "conf/minimal.yaml",
            "--sub",
            "alice",
            "--sid",
            "s1",
            "--ttl",
            "5m",
            "--backend",
            "desktop",
            "--view-only",
            "--jti",
            "j1",
        ],
        &[("VNCGATE_JWT_SECRET", SECRET)],
    );
    let after = common::now();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(out.stderr.is_empty(), "{}", describe(&out));
    let printed = lines(&out.stdout);
    assert_eq!(printed.len(), 1, "{}", describe(&out));

    let data = jsonwebtoken::decode::<Value>(
        &printed[0],
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &Validation::new(Algorithm::HS256),
    )
    .expect("a valid HS256 token for the configured secret");
    assert_eq!(data.header.alg, Algorithm::HS256);
    let iat = data.claims["iat"].as_u64().expect("iat");
    // Brackets the command's own clock reading; says nothing about how long it took.
    assert!(
        (before..=after).contains(&iat),
        "iat {iat} not in {before}..={after}"
    );
    assert_eq!(
        data.claims,
        json!({
            "sub": "alice",
            "sid": "s1",
            "backend": "desktop",
            "view_only": true,
            "jti": "j1",
            "iat": iat,
            "exp": iat + 300,
        })
    );
}

#[rstest]
#[case::unknown_backend(&["--backend", "nosuch"], "--backend")]
#[case::unknown_pool(&["--pool", "nosuch"], "--pool")]
#[case::bad_ttl(&["--ttl", "15x"], "--ttl")]
#[case::bad_sid(&["--sid", "has space"], "--sid")]
fn token_refuses_what_the_gateway_would_refuse(#[case] extra: &[&str], #[case] named: &str) {
    let mut args = vec!["token", "--config", "conf/minimal.yaml", "--sub", "alice"];
    args.extend_from_slice(extra);
    let out = vncgate(&args, &[("VNCGATE_JWT_SECRET", SECRET)]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    let first = lines(&out.stderr).into_iter().next().unwrap_or_default();
    assert!(first.contains(named), "{}", describe(&out));
}

#[test]
fn token_without_the_secret_names_the_key() {
    let out = vncgate(
        &["token", "--config", "conf/minimal.yaml", "--sub", "alice"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert_eq!(
        lines(&out.stderr),
        ["auth.secret_env: environment variable VNCGATE_JWT_SECRET is not set"]
    );
}

// ---- long-running commands ------------------------------------------------------------------

/// The lines of one output stream of a child, as they arrive.
#[derive(Clone, Default)]
struct Captured(Arc<(Mutex<CapturedLines>, Notify)>);

#[derive(Default)]
struct CapturedLines {
    lines: Vec<String>,
    ended: bool,
}

impl Captured {
    fn start(stream: impl AsyncRead + Unpin + Send + 'static) -> Captured {
        let captured = Captured::default();
        let writer = captured.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                writer.update(|c| c.lines.push(line));
            }
            writer.update(|c| c.ended = true);
        });
        captured
    }

    fn update(&self, f: impl FnOnce(&mut CapturedLines)) {
        f(&mut self.0.0.lock().unwrap_or_else(|e| e.into_inner()));
        self.0.1.notify_waiters();
    }

    fn text(&self) -> String {
        self.0
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .join("\n")
    }

    /// The first line matching `pred`, or `None` once the stream has ended without one.
    async fn find(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        loop {
            let notified = self.0.1.notified();
            tokio::pin!(notified);
            // Registered before looking, so a line arriving in between still wakes us.
            notified.as_mut().enable();
            {
                let c = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(line) = c.lines.iter().find(|l| pred(l)) {
                    return Some(line.clone());
                }
                if c.ended {
                    return None;
                }
            }
            notified.await;
        }
    }
}

/// A `vncgate` that keeps running (`run`, `demo`); killed if the test ends early.
struct Running {
    child: tokio::process::Child,
    stdout: Captured,
    stderr: Captured,
}

impl Running {
    fn spawn(cmd: std::process::Command) -> Running {
        let mut cmd = tokio::process::Command::from(cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn vncgate");
        let stdout = Captured::start(child.stdout.take().expect("stdout"));
        let stderr = Captured::start(child.stderr.take().expect("stderr"));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout.text(),
            self.stderr.text()
        )
    }

    async fn wait_line(
        &self,
        stream: &Captured,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match tokio::time::timeout(EVENT_TIMEOUT, stream.find(pred)).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "vncgate closed the stream without {what}\n{}",
                self.output()
            ),
            Err(_) => panic!("no {what} from vncgate\n{}", self.output()),
        }
    }

    async fn wait_stdout(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line(&self.stdout, what, pred).await
    }

    async fn wait_stderr(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line(&self.stderr, what, pred).await
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.id().expect("still running") as i32;
        // SAFETY: kill(2) on our own child, which has not been reaped yet (`id()` is Some).
        unsafe {
            libc::kill(pid, sig);
        }
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(EVENT_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("vncgate did not exit\n{}", self.output()),
        }
    }
}

/// True when `line` names `addr` as a whole word; the demo's pretty logs wrap fields in ANSI
/// escapes, which this splits away along with `=` and quotes.
fn mentions_addr(line: &str, addr: &str) -> bool {
    line.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .any(|word| word == addr)
}

/// GET over a fresh connection: (status, Content-Type).
async fn http_get_content_type(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response);
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type)
}

async fn rfb_desktop_name(url: &str) -> String {
    let (mut ws, _) = rfb_client::connect(&WsConnect::new(url))
        .await
        .expect("WebSocket upgrade");
    rfb_client::rfb_handshake(&mut ws)
        .await
        .expect("RFB handshake")
        .server_name
}

#[tokio::test]
async fn a_token_from_vncgate_token_opens_a_session_on_vncgate_run() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "minimal-desk".into(),
        width: 64,
        height: 48,
        rgb: [1, 2, 3],
    })
    .await
    .expect("backend");
    let listen = format!("127.0.0.1:{}", free_port());
    // conf/minimal.yaml itself with its two addresses moved, so this also shows it runs.
    let yaml = std::fs::read_to_string(Path::new(REPO).join("conf/minimal.yaml")).expect("read");
    let yaml = replace_once(
        &yaml,
        r#"addr: "127.0.0.1:6080""#,
        &format!("addr: \"{listen}\""),
    );
    let yaml = replace_once(
        &yaml,
        r#"addr: "127.0.0.1:5901""#,
        &format!("addr: \"{}\"", desk.addr),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("minimal.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let config = path_str(&config);
    let env = [("VNCGATE_JWT_SECRET", SECRET)];

    let out = vncgate(
        &[
            "token",
            "--config",
            config,
            "--sub",
            "alice",
            "--sid",
            "s1",
            "--backend",
            "desktop",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let token = text(&out.stdout).trim().to_owned();

    let mut cmd = command(&["run", "--config", config]);
    cmd.env_clear().envs(env);
    let gateway = Running::spawn(cmd);
    gateway
        .wait_stderr("`listening` log line", |line| {
            serde_json::from_str::<Value>(line)
                .is_ok_and(|v| v["event"] == "listening" && v["addr"] == listen.as_str())
        })
        .await;
    let name = rfb_desktop_name(&format!("ws://{listen}/websockify?token={token}")).await;
    assert_eq!(name, "minimal-desk");
}

/// What `vncgate demo` printed once it is serving.
struct DemoReady {
    backend: String,
    ws_url: String,
}

async fn wait_demo_ready(demo: &Running, listen: &str) -> DemoReady {
    let token_line = demo
        .wait_stdout("`token:` line", |l| l.starts_with("token: "))
        .await;
    let token = token_line.strip_prefix("token: ").expect("prefix");
    // The token line comes last, so the others are already captured.
    let backend = demo
        .wait_stdout("backend line", |l| l.starts_with("vncgate demo: backend "))
        .await
        .strip_prefix("vncgate demo: backend ")
        .expect("prefix")
        .to_owned();
    let ws_url = demo
        .wait_stdout("noVNC line", |l| l.starts_with("noVNC: "))
        .await
        .strip_prefix("noVNC: ")
        .expect("prefix")
        .to_owned();
    assert_eq!(ws_url, format!("ws://{listen}/websockify?token={token}"));
    demo.wait_stderr("`listening` log line", |l| {
        l.contains("listening") && mentions_addr(l, listen)
    })
    .await;
    DemoReady { backend, ws_url }
}

/// Xvnc is the demo's child, not ours, so its exit (SIGTERM from `PR_SET_PDEATHSIG` once the
/// demo is gone, then Xvnc's own teardown) is no event this process can await. Each probe checks
/// the real condition; the pause between probes only paces them and is not assumed to be long
/// enough for anything, and the deadline turns a survivor into a failure instead of a hang.
async fn wait_until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Err(e) => panic!("probing {addr}: {e}"),
            Ok(_) => assert!(
                Instant::now() < deadline,
                "{addr} still accepts connections after the demo exited"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn demo_serves_its_own_xvnc_desktop_and_takes_it_down_on_exit() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut demo = Running::spawn(command(&["demo", "--listen", &listen]));
    let ready = wait_demo_ready(&demo, &listen).await;
    let xvnc: SocketAddr = ready.backend.parse().expect("backend address");
    assert!(xvnc.ip().is_loopback(), "{xvnc}");
    demo.wait_stdout("viewer URL", |l| {
        l.starts_with(&format!("open   http://{listen}/#token="))
    })
    .await;

    let (mut ws, _) = rfb_client::connect(&WsConnect::new(&ready.ws_url))
        .await
        .expect("WebSocket upgrade");
    let mut session = rfb_client::rfb_handshake(&mut ws)
        .await
        .expect("RFB handshake");
    assert_eq!(session.server_name, "vncgate-demo");
    let update = rfb_client::first_framebuffer_update(&mut ws, &mut session)
        .await
        .expect("framebuffer update");
    assert!(update.pixels > 0, "{update:?}");
    drop(ws);

    let (status, content_type) = http_get_content_type(&listen, "/").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type:?}");

    demo.signal(libc::SIGINT);
    let status = demo.wait_exit().await;
    assert!(status.success(), "{status}\n{}", demo.output());
    wait_until_refused(xvnc).await;
}

#[tokio::test]
async fn demo_with_backend_uses_that_backend() {
    let desk = RfbServer::start(Mode::Rfb {
        name: "fixture-desk".into(),
        width: 64,
        height: 48,
        rgb: [9, 8, 7],
    })
    .await
    .expect("backend");
    let listen = format!("127.0.0.1:{}", free_port());
    let backend = desk.addr.to_string();
    let mut demo = Running::spawn(command(&[
        "demo",
        "--backend",
        &backend,
        "--listen",
        &listen,
    ]));
    let ready = wait_demo_ready(&demo, &listen).await;
    assert_eq!(ready.backend, backend);
    assert_eq!(rfb_desktop_name(&ready.ws_url).await, "fixture-desk");

    demo.signal(libc::SIGINT);
    let status = demo.wait_exit().await;
    assert!(status.success(), "{status}\n{}", demo.output());
}
