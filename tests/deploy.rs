//! The deployment artefacts agree with each other and with the code: conf/staging.yaml and
//! conf/production.yaml (same keys, both accepted by `vncgate check-config`), the Dockerfile and
//! .dockerignore, and the Kubernetes manifests in deploy/. Everything here is static: no Docker,
//! no cluster, no network. The only process started is `vncgate check-config`.
//!
//! deploy/configmap.yaml embeds conf/production.yaml, and each overlay's configmap.yaml
//! (deploy/overlays/*) embeds it with the overlay's store.yaml as its `store` section; after
//! editing either, regenerate them with `VNCGATE_BLESS=1 cargo test --test deploy` (or as
//! deploy/README.md says).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde::Deserialize;
use serde_yaml::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vncgate");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Where the configs expect the TLS Secret; the tests substitute a generated pair.
const TLS_DIR: &str = "/etc/vncgate/tls/";
const CONFIGS: [&str; 2] = ["conf/staging.yaml", "conf/production.yaml"];

// ---- reading files --------------------------------------------------------------------------

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a multi-document YAML file (`---` separated), as Kubernetes reads it.
fn documents(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one object of `kind` (and `name`, when given) in a manifest file.
fn object(rel: &str, kind: &str, name: Option<&str>) -> Value {
    let matching: Vec<Value> = documents(rel)
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .filter(|d| name.is_none_or(|n| d["metadata"]["name"].as_str() == Some(n)))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "{rel}: expected one {kind} {name:?}, found {}",
        matching.len()
    );
    matching.into_iter().next().expect("one object")
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value:?}"))
}

fn u64_of(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a number, got {value:?}"))
}

fn seq<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, got {value:?}"))
}

fn string_map(value: &Value, what: &str) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: expected a mapping, got {value:?}"))
        .iter()
        .map(|(k, v)| (str_of(k, what).to_owned(), str_of(v, what).to_owned()))
        .collect()
}

// ---- the production config, as the other artefacts need it ----------------------------------

struct Listener {
    addr: SocketAddr,
    tls: Option<(String, String)>,
}

struct Production {
    text: String,
    listeners: Vec<Listener>,
    admin: SocketAddr,
    drain_seconds: u64,
    pid_file: String,
    upgrade_sock: String,
    /// Values of every `*_env` key: the variables the process reads.
    env_names: BTreeSet<String>,
}

fn socket_addr(value: &Value, what: &str) -> SocketAddr {
    str_of(value, what)
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn production() -> Production {
    let text = read("conf/production.yaml");
    let doc: Value = serde_yaml::from_str(&text).expect("conf/production.yaml");
    let listeners = seq(&doc["listeners"], "listeners")
        .iter()
        .map(|l| Listener {
            addr: socket_addr(&l["addr"], "listeners[].addr"),
            tls: (!l["tls"].is_null()).then(|| {
                (
                    str_of(&l["tls"]["cert"], "tls.cert").to_owned(),
                    str_of(&l["tls"]["key"], "tls.key").to_owned(),
                )
            }),
        })
        .collect();
    Production {
        listeners,
        admin: socket_addr(&doc["admin"]["addr"], "admin.addr"),
        drain_seconds: u64_of(&doc["server"]["drain_seconds"], "server.drain_seconds"),
        pid_file: str_of(&doc["server"]["pid_file"], "server.pid_file").to_owned(),
        upgrade_sock: str_of(&doc["server"]["upgrade_sock"], "server.upgrade_sock").to_owned(),
        env_names: env_keys(&doc).into_values().collect(),
        text,
    }
}

impl Production {
    fn tls_listener(&self) -> (&Listener, &str, &str) {
        let tls: Vec<_> = self
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref().map(|(c, k)| (l, c.as_str(), k.as_str())))
            .collect();
        assert_eq!(tls.len(), 1, "production has one TLS listener");
        tls[0]
    }

    /// Listener ports and the admin port: what the image and the pod must open.
    fn ports(&self) -> BTreeSet<u16> {
        let mut ports: BTreeSet<u16> = self.listeners.iter().map(|l| l.addr.port()).collect();
        ports.insert(self.admin.port());
        ports
    }
}

/// `key path -> variable name` for every `*_env` key of a config.
fn env_keys(doc: &Value) -> BTreeMap<String, String> {
    fn walk(value: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
        match value {
            Value::Mapping(map) => {
                for (key, value) in map {
                    let key = str_of(key, prefix);
                    let path = if prefix.is_empty() {
                        key.to_owned()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    if key.ends_with("_env") {
                        out.insert(path.clone(), str_of(value, &path).to_owned());
                    }
                    walk(value, &path, out);
                }
            }
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{prefix}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(doc, "", &mut out);
    out
}

// ---- (a) the two environments have the same keys ---------------------------------------------

/// Key paths as tests/cli.rs walks conf/example.yaml: `pools.*` for the operator's pool names,
/// `[]` for list items (the union over the items).
fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Mapping(map) => {
            for (key, value) in map {
                let key = str_of(key, prefix);
                let key = if prefix == "pools" { "*" } else { key };
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                out.insert(path.clone());
                key_paths(value, &path, out);
            }
        }
        Value::Sequence(items) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn staging_and_production_have_the_same_keys() {
    let [staging, production] = CONFIGS.map(|rel| {
        let mut keys = BTreeSet::new();
        key_paths(&yaml(rel), "", &mut keys);
        keys
    });
    let only_staging: Vec<_> = staging.difference(&production).collect();
    let only_production: Vec<_> = production.difference(&staging).collect();
    assert!(
        only_staging.is_empty() && only_production.is_empty(),
        "only in staging: {only_staging:?}; only in production: {only_production:?}"
    );
    // Not trivially equal: both spell out the settings that matter in a deployment.
    for key in [
        "server.drain_seconds",
        "store.kind",
        "store.redis_url_env",
        "admin.token_env",
        "auth.issuer",
        "auth.audience",
        "auth.allowed_origins",
        "limits.max_sessions",
    ] {
        assert!(production.contains(key), "{key} missing");
    }
}

/// Both configs are written for the pod of deploy/deployment.yaml: shared Redis store, wss://
/// on 0.0.0.0:8443 with the certificate from the TLS Secret, no plain listener, the admin
/// listener reachable by the kubelet and Prometheus, JSON logs, no static files.
#[test]
fn both_configs_are_shaped_for_a_pod() {
    for rel in CONFIGS {
        let doc = yaml(rel);
        assert_eq!(doc["store"]["kind"].as_str(), Some("redis"), "{rel}");
        let listeners = seq(&doc["listeners"], "listeners");
        assert_eq!(listeners.len(), 1, "{rel}: only the TLS listener");
        assert_eq!(listeners[0]["addr"].as_str(), Some("0.0.0.0:8443"), "{rel}");
        for file in ["cert", "key"] {
            let path = str_of(&listeners[0]["tls"][file], "tls");
            assert!(path.starts_with(TLS_DIR), "{rel}: tls.{file} {path}");
        }
        assert_eq!(doc["admin"]["addr"].as_str(), Some("0.0.0.0:9600"), "{rel}");
        assert!(doc["web_root"].is_null(), "{rel}: web_root");
        assert_eq!(doc["logging"]["format"].as_str(), Some("json"), "{rel}");
        for key in ["pid_file", "upgrade_sock"] {
            let path = str_of(&doc["server"][key], key);
            assert!(path.starts_with("/run/vncgate/"), "{rel}: server.{key}");
        }
        let jwks = doc["auth"]["jwks_url"].as_str().unwrap_or("");
        assert!(jwks.starts_with("https://"), "{rel}: auth.jwks_url {jwks}");
        for origin in seq(&doc["auth"]["allowed_origins"], "allowed_origins") {
            assert!(str_of(origin, "origin").starts_with("https://"), "{rel}");
        }
    }
}

// ---- (b) both pass check-config --------------------------------------------------------------

/// A self-signed pair standing in for the TLS Secret; returns the directory (keep it alive) and
/// the config text pointing into it.
fn with_generated_tls(yaml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    std::fs::write(dir.path().join("tls.crt"), certified.cert.pem()).expect("cert");
    std::fs::write(
        dir.path().join("tls.key"),
        certified.signing_key.serialize_pem(),
    )
    .expect("key");
    assert!(yaml.contains(TLS_DIR), "expected {TLS_DIR} in the config");
    let yaml = yaml.replace(TLS_DIR, &format!("{}/", dir.path().display()));
    (dir, yaml)
}

/// Runs `vncgate check-config` on `yaml` with exactly `env`: the developer's own `VNCGATE_*`
/// variables must not make a config valid here.
fn check_config(yaml: &str, env: &[(String, String)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vncgate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    std::process::Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("run vncgate check-config")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A plausible value for the variable a `*_env` key names.
fn value_for(key_path: &str) -> &'static str {
    if key_path.ends_with("redis_url_env") {
        "redis://127.0.0.1:6379/0"
    } else if key_path.ends_with("urls_env") {
        // store.sentinel.urls_env, store.cluster.urls_env: comma-separated.
        "redis://127.0.0.1:26379,redis://127.0.0.2:26379,redis://127.0.0.3:26379"
    } else if key_path.ends_with("secret_env") {
        "deploy-test-secret-0123456789-0123456789"
    } else {
        "deploy-test-admin-token"
    }
}

#[test]
fn staging_and_production_pass_check_config() {
    for rel in CONFIGS {
        let (_tls, text) = with_generated_tls(&read(rel));
        let doc: Value = serde_yaml::from_str(&text).expect("YAML");
        let env: Vec<(String, String)> = env_keys(&doc)
            .into_iter()
            .map(|(key, name)| (name, value_for(&key).to_owned()))
            .collect();
        let out = check_config(&text, &env);
        assert_eq!(out.status.code(), Some(0), "{rel}: {}", describe(&out));
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{rel}: {}",
            describe(&out)
        );
    }
}

/// With no environment at all, check-config names every variable the config needs, one line
/// each, and nothing else: so the `*_env` keys are the whole list (no default variable such as
/// VNCGATE_JWT_SECRET is read behind their back), and the Deployment can be checked against it.
#[test]
fn production_needs_exactly_the_variables_it_names() {
    let prod = production();
    let (_tls, text) = with_generated_tls(&prod.text);
    let out = check_config(&text, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut missing = BTreeSet::new();
    for line in stderr.lines() {
        let name = line
            .split_once(": environment variable ")
            .and_then(|(_, rest)| rest.strip_suffix(" is not set"))
            .unwrap_or_else(|| panic!("unexpected problem: {line}"));
        missing.insert(name.to_owned());
    }
    assert_eq!(missing, prod.env_names);
}

// ---- the Dockerfile ----------------------------------------------------------------------------

struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's instructions by stage (a stage starts at FROM), with continuation lines
/// joined and comments dropped, as Docker reads them.
fn dockerfile() -> Vec<Vec<Instruction>> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "Dockerfile ends in a continuation");
    let mut stages: Vec<Vec<Instruction>> = vec![Vec::new()];
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages.last_mut().expect("a stage").push(Instruction {
            keyword,
            args: args.trim().to_owned(),
        });
    }
    stages
}

fn instructions<'a>(stage: &'a [Instruction], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// The single `keyword` instruction of the runtime (last) stage.
fn runtime_instruction(keyword: &str) -> String {
    let stages = dockerfile();
    let runtime = stages.last().expect("stages");
    let found = instructions(runtime, keyword);
    assert_eq!(found.len(), 1, "runtime stage: {keyword} {found:?}");
    found[0].to_owned()
}

fn json_array(text: &str, what: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not an exec-form array: {e}"))
}

/// The config path the image runs with (`CMD ["run", "--config", PATH]`).
fn image_cmd() -> Vec<String> {
    json_array(&runtime_instruction("CMD"), "CMD")
}

fn image_config_path() -> String {
    let cmd = image_cmd();
    let at = cmd
        .iter()
        .position(|a| a == "--config")
        .expect("CMD has --config");
    cmd[at + 1].clone()
}

fn image_uid() -> u32 {
    let user = runtime_instruction("USER");
    let uid = user.split(':').next().unwrap_or_default();
    uid.parse()
        .unwrap_or_else(|_| panic!("USER {user}: use a numeric uid so runAsNonRoot can check it"))
}

#[test]
fn dockerfile_builds_vncgate_and_runs_it_unprivileged_from_the_mounted_config() {
    let stages = dockerfile();
    let froms: Vec<&str> = stages
        .iter()
        .flat_map(|s| instructions(s, "FROM"))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with("AS builder"),
        "{froms:?}"
    );
    let runtime_from = froms.last().expect("runtime FROM");
    assert!(
        runtime_from.starts_with("debian:") && runtime_from.contains("-slim"),
        "{runtime_from}"
    );
    let builder_runs = instructions(&stages[1], "RUN").join("\n");
    assert!(
        builder_runs.contains("cargo build --release --locked -p vncgate"),
        "{builder_runs}"
    );
    assert!(builder_runs.contains("cmake"), "cmake for libz-ng-sys");

    let runtime = stages.last().expect("runtime stage");
    let runtime_runs = instructions(runtime, "RUN").join("\n");
    assert!(runtime_runs.contains("ca-certificates"), "{runtime_runs}");
    // Production serves no pages (web_root: null): the viewer stays out of the image.
    for copy in instructions(runtime, "COPY") {
        assert!(!copy.contains("web"), "runtime copies {copy}");
    }

    assert_ne!(image_uid(), 0, "the image must not run as root");
    assert_eq!(runtime_instruction("STOPSIGNAL"), "SIGTERM");
    assert_eq!(
        json_array(&runtime_instruction("ENTRYPOINT"), "ENTRYPOINT"),
        ["vncgate"]
    );
    let cmd = image_cmd();
    assert_eq!(cmd.first().map(String::as_str), Some("run"), "{cmd:?}");
    assert_eq!(image_config_path(), "/etc/vncgate/vncgate.yaml");
}

#[test]
fn dockerfile_exposes_the_production_ports_and_probes_the_admin_healthz() {
    let prod = production();
    let exposed: BTreeSet<u16> = runtime_instruction("EXPOSE")
        .split_whitespace()
        .map(|p| {
            p.trim_end_matches("/tcp")
                .parse()
                .unwrap_or_else(|_| panic!("EXPOSE {p}"))
        })
        .collect();
    assert_eq!(exposed, prod.ports());

    let healthcheck = runtime_instruction("HEALTHCHECK");
    let (options, cmd) = healthcheck
        .split_once(" CMD ")
        .expect("HEALTHCHECK [OPTIONS] CMD [...]");
    assert!(options.contains("--timeout="), "{options}");
    let cmd = json_array(cmd.trim(), "HEALTHCHECK CMD").join(" ");
    let port = prod.admin.port();
    assert!(
        cmd.contains(&format!("/dev/tcp/127.0.0.1/{port}"))
            || cmd.contains(&format!("127.0.0.1:{port}/healthz")),
        "the health check must target the admin port {port}: {cmd}"
    );
    assert!(cmd.contains("GET /healthz "), "{cmd}");
    assert!(cmd.contains(" 200"), "it must require a 200: {cmd}");
}

/// .dockerignore is an allowlist: every file the builder copies must be let in, or the build
/// fails on a missing path.
#[test]
fn dockerignore_lets_in_what_the_build_copies() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        patterns.first().map(String::as_str),
        Some("*"),
        "starts by excluding everything"
    );
    let allowed: Vec<&str> = patterns
        .iter()
        .filter_map(|p| p.strip_prefix('!'))
        .map(|p| p.trim_end_matches('/'))
        .collect();
    let stages = dockerfile();
    let mut copied = Vec::new();
    for stage in &stages {
        for copy in instructions(stage, "COPY") {
            if copy.starts_with("--from") {
                continue;
            }
            let words: Vec<&str> = copy.split_whitespace().collect();
            let (_, sources) = words.split_last().expect("COPY SRC... DEST");
            for source in sources {
                let source = source.trim_start_matches("./").trim_end_matches('/');
                let ok = allowed
                    .iter()
                    .any(|a| source == *a || source.starts_with(&format!("{a}/")));
                assert!(ok, "COPY {source} is excluded by .dockerignore");
                assert!(Path::new(REPO).join(source).exists(), "COPY {source}");
                copied.push(source.to_owned());
            }
        }
    }
    let mut must: Vec<String> = ["Cargo.toml", "Cargo.lock", "src"].map(String::from).into();
    // Cargo loads every workspace member, even with `-p vncgate`: each needs its manifest and
    // sources in the build.
    for member in workspace_members().into_iter().filter(|m| m != ".") {
        must.push(format!("{member}/Cargo.toml"));
        must.push(format!("{member}/src"));
    }
    for must in must {
        assert!(copied.contains(&must), "the build must copy {must}");
    }
}

/// `[workspace] members` of Cargo.toml (a one-line list of strings).
fn workspace_members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let Some(line) = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
    else {
        return vec![".".to_owned()];
    };
    let list = line.split_once('=').map(|(_, v)| v).unwrap_or_default();
    list.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

// ---- Kubernetes ----------------------------------------------------------------------------------

fn deployment() -> Value {
    object("deploy/deployment.yaml", "Deployment", Some("vncgate"))
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

fn container(deployment: &Value) -> &Value {
    let containers = seq(&pod_spec(deployment)["containers"], "containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

fn pod_labels(deployment: &Value) -> BTreeMap<String, String> {
    string_map(
        &deployment["spec"]["template"]["metadata"]["labels"],
        "pod labels",
    )
}

/// A container port by number or by name, as probes and Services refer to it.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).expect("port");
    }
    let name = str_of(port, "port");
    let found = seq(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"));
    u16::try_from(u64_of(&found["containerPort"], "containerPort")).expect("port")
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn deployment_runs_three_replicas_with_matching_selector() {
    let d = deployment();
    assert_eq!(u64_of(&d["spec"]["replicas"], "replicas"), 3);
    let selector = string_map(&d["spec"]["selector"]["matchLabels"], "selector");
    assert!(selects(&selector, &pod_labels(&d)));
    let strategy = &d["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(strategy["maxUnavailable"].as_u64(), Some(0), "{strategy:?}");
}

#[test]
fn deployment_ports_probes_and_scrape_annotations_match_the_config() {
    let prod = production();
    let d = deployment();
    let c = container(&d);
    let ports: BTreeSet<u16> = seq(&c["ports"], "ports")
        .iter()
        .map(|p| resolve_port(c, &p["containerPort"]))
        .collect();
    assert_eq!(ports, prod.ports());

    let admin = prod.admin.port();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(resolve_port(c, &get["port"]), admin, "{probe} port");
        let scheme = get["scheme"].as_str().unwrap_or("HTTP");
        assert_eq!(scheme, "HTTP", "{probe}: the admin listener is plain HTTP");
    }

    let annotations = string_map(
        &d["spec"]["template"]["metadata"]["annotations"],
        "annotations",
    );
    let get = |k: &str| annotations.get(k).map(String::as_str);
    assert_eq!(get("prometheus.io/scrape"), Some("true"));
    assert_eq!(get("prometheus.io/port"), Some(admin.to_string().as_str()));
    assert_eq!(get("prometheus.io/path"), Some("/metrics"));
}

#[test]
fn deployment_env_is_exactly_the_variables_the_config_names_from_the_secret() {
    let prod = production();
    let d = deployment();
    let c = container(&d);
    assert!(c["envFrom"].is_null(), "envFrom would import unlisted keys");
    let secret = object(
        "deploy/secret.example.yaml",
        "Secret",
        Some("vncgate-secrets"),
    );
    let secret_keys: BTreeSet<String> = string_map(&secret["stringData"], "stringData")
        .into_keys()
        .collect();
    let mut names = BTreeSet::new();
    for var in seq(&c["env"], "env") {
        let name = str_of(&var["name"], "env[].name");
        assert!(
            var["value"].is_null(),
            "{name}: a secret never sits in a manifest"
        );
        let reference = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(
            reference["name"].as_str(),
            Some("vncgate-secrets"),
            "{name}"
        );
        let key = str_of(&reference["key"], "secretKeyRef.key");
        assert!(
            secret_keys.contains(key),
            "{name}: key {key} not in the Secret"
        );
        names.insert(name.to_owned());
    }
    assert_eq!(names, prod.env_names);
    assert_eq!(secret_keys, prod.env_names);
}

/// Files the pod sees, `path -> (source kind, source name, key)`, from the container's mounts of
/// configMap, secret and projected volumes.
fn mounted_files(d: &Value) -> BTreeMap<String, (String, String, String)> {
    let volumes = seq(&pod_spec(d)["volumes"], "volumes");
    let mut files = BTreeMap::new();
    for mount in seq(&container(d)["volumeMounts"], "volumeMounts") {
        let name = str_of(&mount["name"], "volumeMounts[].name");
        let dir = str_of(&mount["mountPath"], "mountPath").trim_end_matches('/');
        assert!(
            mount["subPath"].is_null(),
            "{name}: subPath mounts never update"
        );
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        let sources: Vec<&Value> = if volume["projected"].is_null() {
            vec![volume]
        } else {
            seq(&volume["projected"]["sources"], "sources")
                .iter()
                .collect()
        };
        for source in sources {
            for (kind, name_key) in [("configMap", "name"), ("secret", "secretName")] {
                let s = &source[kind];
                if s.is_null() {
                    continue;
                }
                // A projected secret names itself with `name`, a secret volume with `secretName`.
                let source_name = s[name_key]
                    .as_str()
                    .or(s["name"].as_str())
                    .expect("source name");
                for item in seq(&s["items"], "items (list the keys explicitly)") {
                    files.insert(
                        format!("{dir}/{}", str_of(&item["path"], "items[].path")),
                        (
                            kind.to_owned(),
                            source_name.to_owned(),
                            str_of(&item["key"], "items[].key").to_owned(),
                        ),
                    );
                }
            }
        }
    }
    files
}

#[test]
fn deployment_mounts_the_config_where_the_image_reads_it_and_the_tls_secret_where_the_config_says()
{
    let prod = production();
    let d = deployment();
    let c = container(&d);
    // The args, when given, are the image's CMD: one config path for both.
    if !c["args"].is_null() {
        let args: Vec<String> = seq(&c["args"], "args")
            .iter()
            .map(|a| str_of(a, "args").to_owned())
            .collect();
        assert_eq!(args, image_cmd());
    }
    assert!(
        c["command"].is_null(),
        "the image's ENTRYPOINT runs vncgate"
    );

    let files = mounted_files(&d);
    let config = image_config_path();
    let (kind, name, key) = files
        .get(&config)
        .unwrap_or_else(|| panic!("nothing mounted at {config}: {files:?}"));
    assert_eq!(kind, "configMap", "{config}");
    let configmap = object("deploy/configmap.yaml", "ConfigMap", Some(name));
    assert!(
        !configmap["data"][key.as_str()].is_null(),
        "ConfigMap {name} has no key {key}"
    );

    let (_, cert, tls_key) = prod.tls_listener();
    let tls_secret = |path: &str| {
        let (kind, name, key) = files
            .get(path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}: {files:?}"));
        assert_eq!(kind, "secret", "{path}");
        (name.clone(), key.clone())
    };
    let (cert_secret, cert_key) = tls_secret(cert);
    let (key_secret, key_key) = tls_secret(tls_key);
    assert_eq!(
        cert_secret, key_secret,
        "certificate and key from one Secret"
    );
    assert_eq!(
        (cert_key.as_str(), key_key.as_str()),
        ("tls.crt", "tls.key")
    );
    let secret = object("deploy/secret.example.yaml", "Secret", Some(&cert_secret));
    assert_eq!(secret["type"].as_str(), Some("kubernetes.io/tls"));
}

#[test]
fn deployment_is_locked_down_and_can_still_write_what_vncgate_writes() {
    let prod = production();
    let d = deployment();
    let pod = pod_spec(&d);
    let c = container(&d);
    let sc = &c["securityContext"];
    let pod_sc = &pod["securityContext"];
    let either = |key: &str| {
        if sc[key].is_null() {
            pod_sc[key].clone()
        } else {
            sc[key].clone()
        }
    };
    assert_eq!(either("runAsNonRoot").as_bool(), Some(true));
    if let Some(uid) = either("runAsUser").as_u64() {
        assert_eq!(uid, u64::from(image_uid()), "runAsUser is the image's USER");
    }
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let dropped: Vec<&str> = seq(&sc["capabilities"]["drop"], "capabilities.drop")
        .iter()
        .map(|c| str_of(c, "drop"))
        .collect();
    assert_eq!(dropped, ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null(), "no capabilities added");

    // With a read-only root, the pid file and upgrade socket need a writable volume.
    let volumes = seq(&pod["volumes"], "volumes");
    let writable: Vec<String> = seq(&c["volumeMounts"], "volumeMounts")
        .iter()
        .filter(|m| {
            let name = m["name"].as_str();
            volumes
                .iter()
                .any(|v| v["name"].as_str() == name && !v["emptyDir"].is_null())
        })
        .map(|m| {
            str_of(&m["mountPath"], "mountPath")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    for file in [&prod.pid_file, &prod.upgrade_sock] {
        let dir = Path::new(file).parent().expect("a directory");
        assert!(
            writable.iter().any(|w| dir.starts_with(w)),
            "{file} is not on a writable volume ({writable:?})"
        );
    }

    let resources = &c["resources"];
    for section in ["requests", "limits"] {
        for what in ["cpu", "memory"] {
            assert!(
                !resources[section][what].is_null(),
                "resources.{section}.{what}"
            );
        }
    }
}

/// The preStop sleep, whichever form: `exec: [sleep, N]` or the kubelet's own `sleep: {seconds}`.
fn prestop_seconds(container: &Value) -> u64 {
    let pre_stop = &container["lifecycle"]["preStop"];
    if let Some(seconds) = pre_stop["sleep"]["seconds"].as_u64() {
        return seconds;
    }
    let command: Vec<&str> = seq(&pre_stop["exec"]["command"], "preStop.exec.command")
        .iter()
        .map(|a| str_of(a, "command"))
        .collect();
    match command.as_slice() {
        [sleep, seconds] if sleep.ends_with("sleep") => seconds.parse().expect("seconds"),
        other => panic!("preStop should only sleep: {other:?}"),
    }
}

#[test]
fn termination_grace_period_covers_the_prestop_sleep_and_the_drain() {
    let prod = production();
    let d = deployment();
    let grace = u64_of(
        &pod_spec(&d)["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    let pre_stop = prestop_seconds(container(&d));
    assert!(
        pre_stop > 0,
        "preStop must give the endpoints time to update"
    );
    let needed = pre_stop + prod.drain_seconds + 10;
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + \
         server.drain_seconds {} + 10",
        prod.drain_seconds
    );
}

#[test]
fn service_sends_wss_to_the_tls_listener_and_selects_the_pods() {
    let prod = production();
    let d = deployment();
    let c = container(&d);
    let service = object("deploy/service.yaml", "Service", Some("vncgate"));
    let selector = string_map(&service["spec"]["selector"], "selector");
    assert!(selects(&selector, &pod_labels(&d)), "{selector:?}");
    let targets: Vec<u16> = seq(&service["spec"]["ports"], "ports")
        .iter()
        .map(|p| resolve_port(c, &p["targetPort"]))
        .collect();
    let (tls, _, _) = prod.tls_listener();
    assert_eq!(targets, [tls.addr.port()], "only the wss port is public");
    let affinity = service["spec"]["sessionAffinity"]
        .as_str()
        .unwrap_or("None");
    assert_eq!(affinity, "None", "the Redis pin makes affinity unnecessary");
}

#[test]
fn disruption_budget_keeps_replicas_serving() {
    let d = deployment();
    let replicas = u64_of(&d["spec"]["replicas"], "replicas");
    let pdb = object("deploy/pdb.yaml", "PodDisruptionBudget", Some("vncgate"));
    let selector = string_map(&pdb["spec"]["selector"]["matchLabels"], "selector");
    assert!(selects(&selector, &pod_labels(&d)));
    match (
        pdb["spec"]["maxUnavailable"].as_u64(),
        pdb["spec"]["minAvailable"].as_u64(),
    ) {
        (Some(max), None) => assert!(max >= 1 && max < replicas, "maxUnavailable {max}"),
        (None, Some(min)) => assert!(min >= 1 && min < replicas, "minAvailable {min}"),
        other => panic!("set one of maxUnavailable and minAvailable as a number: {other:?}"),
    }
}

#[test]
fn servicemonitor_scrapes_the_admin_metrics_as_job_vncgate() {
    let prod = production();
    let d = deployment();
    let c = container(&d);
    let rel = "deploy/servicemonitor.yaml";
    let monitor = object(rel, "ServiceMonitor", None);
    let service = object(rel, "Service", None);
    let service_labels = string_map(&service["metadata"]["labels"], "Service labels");
    let selector = string_map(&monitor["spec"]["selector"]["matchLabels"], "selector");
    assert!(selects(&selector, &service_labels), "{selector:?}");
    assert!(selects(
        &string_map(&service["spec"]["selector"], "selector"),
        &pod_labels(&d)
    ));
    // alerts/vncgate.rules.yml and docs/RUNBOOK.md expect job="vncgate".
    let job_label = str_of(&monitor["spec"]["jobLabel"], "jobLabel");
    assert_eq!(
        service_labels.get(job_label).map(String::as_str),
        Some("vncgate")
    );
    let endpoints = seq(&monitor["spec"]["endpoints"], "endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["path"].as_str(), Some("/metrics"));
    let port_name = str_of(&endpoints[0]["port"], "endpoints[].port");
    let port = seq(&service["spec"]["ports"], "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(port_name))
        .unwrap_or_else(|| panic!("the Service has no port {port_name}"));
    assert_eq!(resolve_port(c, &port["targetPort"]), prod.admin.port());
}

/// The generated file: deploy/configmap.yaml is exactly this for the current production.yaml.
fn configmap_text(production: &str) -> String {
    let mut out = String::from(
        "# GENERATED from conf/production.yaml: do not edit here. After changing the config, run\n\
         #   VNCGATE_BLESS=1 cargo test --test deploy configmap\n\
         # (tests/deploy.rs checks that data.vncgate.yaml is conf/production.yaml byte for byte).\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  \
           name: vncgate-config\n  \
           labels:\n    \
             app.kubernetes.io/name: vncgate\n\
         data:\n  \
           vncgate.yaml: |\n",
    );
    for line in production.lines() {
        if !line.is_empty() {
            out.push_str("    ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn configmap_embeds_production_yaml_byte_for_byte() {
    let prod = production();
    let rel = "deploy/configmap.yaml";
    if std::env::var_os("VNCGATE_BLESS").is_some() {
        std::fs::write(Path::new(REPO).join(rel), configmap_text(&prod.text)).expect("write");
    }
    // A block scalar keeps the text only if it ends in exactly one newline and no line ends in
    // blanks; production.yaml must stay that way for the embedding to be exact.
    assert!(
        prod.text.ends_with('\n') && !prod.text.ends_with("\n\n"),
        "conf/production.yaml must end with exactly one newline"
    );
    let configmap = object(rel, "ConfigMap", Some("vncgate-config"));
    let embedded = str_of(&configmap["data"]["vncgate.yaml"], "data.vncgate.yaml");
    assert!(
        embedded == prod.text,
        "{rel} is out of date with conf/production.yaml: run \
         `VNCGATE_BLESS=1 cargo test --test deploy configmap`"
    );
}

#[test]
fn secret_example_holds_only_placeholders() {
    for doc in documents("deploy/secret.example.yaml") {
        assert_eq!(doc["kind"].as_str(), Some("Secret"));
        assert!(
            doc["data"].is_null(),
            "use stringData, readable placeholders"
        );
        for (key, value) in string_map(&doc["stringData"], "stringData") {
            assert!(
                value.contains("REPLACE-ME"),
                "{key} looks like a real value"
            );
        }
    }
}

#[test]
fn kustomization_applies_the_manifests_but_not_the_example_secret() {
    let kustomization = yaml("deploy/kustomization.yaml");
    let resources: Vec<&str> = seq(&kustomization["resources"], "resources")
        .iter()
        .map(|r| str_of(r, "resources"))
        .collect();
    for file in &resources {
        assert!(
            PathBuf::from(REPO).join("deploy").join(file).is_file(),
            "{file}"
        );
    }
    for must in [
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
    ] {
        assert!(resources.contains(&must), "{must} missing from resources");
    }
    assert!(!resources.contains(&"secret.example.yaml"));
}

// ---- overlays: the same deployment on another store topology (deploy/overlays/*) ------------

/// Each overlay and the `store.topology` its config must have.
const OVERLAYS: [(&str, &str); 2] = [("sentinel", "sentinel"), ("cluster", "cluster")];

fn overlay_rel(overlay: &str, file: &str) -> String {
    format!("deploy/overlays/{overlay}/{file}")
}

/// conf/production.yaml with its top-level `store:` section (up to the next top-level line that
/// is not blank) replaced by `store`, under a header saying where it comes from.
fn overlay_config_text(overlay: &str, production: &str, store: &str) -> String {
    let mut out = format!(
        "# deploy/overlays/{overlay}: conf/production.yaml with its `store` section replaced by\n\
         # deploy/overlays/{overlay}/store.yaml (generated by tests/deploy.rs).\n"
    );
    let mut lines = production.lines().peekable();
    let mut replaced = false;
    while let Some(line) = lines.next() {
        if line == "store:" {
            assert!(!replaced, "two store sections in conf/production.yaml");
            replaced = true;
            // Skip the section; keep the blank lines that end it.
            let mut blanks = 0;
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() {
                    blanks += 1;
                } else if next.starts_with([' ', '#']) {
                    blanks = 0;
                } else {
                    break;
                }
                lines.next();
            }
            out.push_str(store.trim_end_matches('\n'));
            out.push('\n');
            for _ in 0..blanks {
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(replaced, "conf/production.yaml has no top-level `store:`");
    out
}

/// The generated patch: the base's ConfigMap with the overlay's config.
fn overlay_configmap_text(overlay: &str, config: &str) -> String {
    let base = configmap_text(config);
    let body = base
        .split_once("apiVersion: v1\n")
        .map(|(_, rest)| rest)
        .expect("configmap_text starts with its header");
    format!(
        "# GENERATED from conf/production.yaml and deploy/overlays/{overlay}/store.yaml: do not edit\n\
         # here. After changing either, run\n\
         #   VNCGATE_BLESS=1 cargo test --test deploy overlay\n\
         # A strategic merge patch of deploy/configmap.yaml: data.vncgate.yaml is replaced whole.\n\
         apiVersion: v1\n{body}"
    )
}

/// The overlay's config, as its ConfigMap patch must hold it.
fn overlay_config(overlay: &str) -> String {
    let prod = production();
    overlay_config_text(
        overlay,
        &prod.text,
        &read(&overlay_rel(overlay, "store.yaml")),
    )
}

#[test]
fn overlay_configmaps_are_production_with_the_overlay_store() {
    for (overlay, _) in OVERLAYS {
        let config = overlay_config(overlay);
        let rel = overlay_rel(overlay, "configmap.yaml");
        if std::env::var_os("VNCGATE_BLESS").is_some() {
            std::fs::write(
                Path::new(REPO).join(&rel),
                overlay_configmap_text(overlay, &config),
            )
            .expect("write");
        }
        let patch = object(&rel, "ConfigMap", Some("vncgate-config"));
        let embedded = str_of(&patch["data"]["vncgate.yaml"], "data.vncgate.yaml");
        assert!(
            embedded == config,
            "{rel} is out of date with conf/production.yaml or store.yaml: run \
             `VNCGATE_BLESS=1 cargo test --test deploy overlay`"
        );
    }
}

#[test]
fn overlay_configs_change_only_the_store_topology() {
    let prod: Value = serde_yaml::from_str(&production().text).expect("production");
    for (overlay, topology) in OVERLAYS {
        let doc: Value = serde_yaml::from_str(&overlay_config(overlay)).expect("overlay config");
        let store = &doc["store"];
        assert_eq!(store["kind"].as_str(), Some("redis"), "{overlay}");
        assert_eq!(store["topology"].as_str(), Some(topology), "{overlay}");
        assert!(
            store["redis_url_env"].is_null(),
            "{overlay}: redis_url_env is for topology standalone only"
        );
        assert!(
            !store[topology]["urls_env"].is_null(),
            "{overlay}: store.{topology}.urls_env"
        );
        // Everything else of the store, and every other section, is production's.
        for key in ["key_prefix", "session_idle_ttl_seconds"] {
            assert_eq!(store[key], prod["store"][key], "{overlay}: store.{key}");
        }
        let sections = |v: &Value| -> BTreeMap<String, Value> {
            v.as_mapping()
                .expect("a mapping")
                .iter()
                .filter(|(k, _)| k.as_str() != Some("store"))
                .map(|(k, v)| (str_of(k, "section").to_owned(), v.clone()))
                .collect()
        };
        assert_eq!(sections(&doc), sections(&prod), "{overlay}");
        if topology == "cluster" {
            let prefix = str_of(&store["key_prefix"], "key_prefix");
            assert!(
                !prefix.contains(['{', '}']),
                "{overlay}: key_prefix {prefix}"
            );
        }
    }
}

#[test]
fn overlay_configs_pass_check_config_and_need_exactly_the_variables_they_name() {
    for (overlay, _) in OVERLAYS {
        let (_tls, text) = with_generated_tls(&overlay_config(overlay));
        let doc: Value = serde_yaml::from_str(&text).expect("YAML");
        let keys = env_keys(&doc);
        let env: Vec<(String, String)> = keys
            .iter()
            .map(|(key, name)| (name.clone(), value_for(key).to_owned()))
            .collect();
        let out = check_config(&text, &env);
        assert_eq!(out.status.code(), Some(0), "{overlay}: {}", describe(&out));
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{overlay}: {}",
            describe(&out)
        );

        let out = check_config(&text, &[]);
        assert_eq!(out.status.code(), Some(2), "{overlay}: {}", describe(&out));
        let missing: BTreeSet<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|line| {
                line.split_once(": environment variable ")
                    .and_then(|(_, rest)| rest.strip_suffix(" is not set"))
                    .unwrap_or_else(|| panic!("{overlay}: unexpected problem: {line}"))
                    .to_owned()
            })
            .collect();
        let named: BTreeSet<String> = keys.into_values().collect();
        assert_eq!(missing, named, "{overlay}");
    }
}

/// The container's env after a strategic merge patch: entries merge by `name`, and an entry
/// with `$patch: delete` removes its name.
fn patched_env(base: &[Value], patch: &[Value]) -> BTreeMap<String, Value> {
    let mut env: BTreeMap<String, Value> = base
        .iter()
        .map(|v| (str_of(&v["name"], "env[].name").to_owned(), v.clone()))
        .collect();
    for entry in patch {
        let name = str_of(&entry["name"], "env[].name").to_owned();
        match entry["$patch"].as_str() {
            Some("delete") => {
                assert!(
                    env.remove(&name).is_some(),
                    "deletes {name}, not in the base"
                );
            }
            Some(other) => panic!("{name}: unexpected $patch: {other}"),
            None => {
                env.insert(name, entry.clone());
            }
        }
    }
    env
}

#[test]
fn overlay_kustomizations_patch_the_base_and_the_pod_gets_exactly_the_overlay_variables() {
    let base = deployment();
    for (overlay, _) in OVERLAYS {
        let kustomization = yaml(&overlay_rel(overlay, "kustomization.yaml"));
        assert_eq!(
            kustomization["kind"].as_str(),
            Some("Kustomization"),
            "{overlay}"
        );
        let resources: Vec<&str> = seq(&kustomization["resources"], "resources")
            .iter()
            .map(|r| str_of(r, "resources"))
            .collect();
        // The base's resources, file by file: kustomize refuses `../..` as a base here (the
        // overlay sits inside it), so the overlay lists them and is built with the load
        // restrictor off (deploy/README.md).
        let base_resources: Vec<String> =
            seq(&yaml("deploy/kustomization.yaml")["resources"], "resources")
                .iter()
                .map(|r| format!("../../{}", str_of(r, "resources")))
                .collect();
        assert_eq!(resources, base_resources, "{overlay}: the base's resources");
        let patches: Vec<&str> = seq(&kustomization["patches"], "patches")
            .iter()
            .map(|p| str_of(&p["path"], "patches[].path"))
            .collect();
        assert_eq!(patches, ["configmap.yaml", "deployment.yaml"], "{overlay}");
        // Each patch names an object of the base (a patch of nothing fails `kubectl kustomize`).
        for (file, kind, name) in [
            ("configmap.yaml", "ConfigMap", "vncgate-config"),
            ("deployment.yaml", "Deployment", "vncgate"),
        ] {
            let patch = object(&overlay_rel(overlay, file), kind, Some(name));
            assert_eq!(
                patch["apiVersion"],
                object(&format!("deploy/{file}"), kind, Some(name))["apiVersion"],
                "{overlay}/{file}"
            );
        }

        let patch = object(
            &overlay_rel(overlay, "deployment.yaml"),
            "Deployment",
            Some("vncgate"),
        );
        let containers = seq(
            &patch["spec"]["template"]["spec"]["containers"],
            "containers",
        );
        assert_eq!(containers.len(), 1, "{overlay}: patches the one container");
        assert_eq!(
            containers[0]["name"].as_str(),
            container(&base)["name"].as_str()
        );
        let env = patched_env(
            seq(&container(&base)["env"], "env"),
            seq(&containers[0]["env"], "patch env"),
        );

        let doc: Value = serde_yaml::from_str(&overlay_config(overlay)).expect("overlay config");
        let named: BTreeSet<String> = env_keys(&doc).into_values().collect();
        let secret = object(
            &overlay_rel(overlay, "secret.example.yaml"),
            "Secret",
            Some("vncgate-secrets"),
        );
        let secret_keys: BTreeSet<String> = string_map(&secret["stringData"], "stringData")
            .into_keys()
            .collect();
        for (name, var) in &env {
            assert!(
                var["value"].is_null(),
                "{overlay}: {name} sits in a manifest"
            );
            let reference = &var["valueFrom"]["secretKeyRef"];
            assert_eq!(
                reference["name"].as_str(),
                Some("vncgate-secrets"),
                "{overlay}: {name}"
            );
            assert_eq!(reference["key"].as_str(), Some(name.as_str()), "{overlay}");
        }
        let env_names: BTreeSet<String> = env.into_keys().collect();
        assert_eq!(env_names, named, "{overlay}: the pod's env");
        assert_eq!(secret_keys, named, "{overlay}: secret.example.yaml");
        for (key, value) in string_map(&secret["stringData"], "stringData") {
            assert!(
                value.contains("REPLACE-ME"),
                "{overlay}: {key} looks like a real value"
            );
        }
    }
}
