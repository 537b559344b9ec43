//! The scale-out keys of the config (contract §13): `store.topology` with its sentinel and
//! cluster settings, and `pools.*.discovery`. Every misplaced or malformed key is an error that
//! names it; a URL list is never echoed (it may carry a password).

use std::collections::HashMap;

use rstest::rstest;
use vncgate::config::{Config, ConfigErrors, Discovery, RedisTopology, StoreKind};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
const LISTENER: &str = "listeners:\n  - addr: \"127.0.0.1:6080\"\n";
const STATIC_POOL: &str = "pools:\n  default:\n    backends: [{ name: d, addr: \"h:1\" }]\n";

fn load(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let mut env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("VNCGATE_JWT_SECRET".into(), SECRET.into());
    Config::from_yaml(yaml, &|name| env.get(name).cloned())
}

fn with_store(store: &str) -> String {
    format!("{LISTENER}{STATIC_POOL}store:\n{store}")
}

fn with_pool(pool: &str) -> String {
    format!("{LISTENER}pools:\n  default:\n{pool}")
}

/// `(key, message)` of every problem.
fn problems(yaml: &str, vars: &[(&str, &str)]) -> Vec<(String, String)> {
    match load(yaml, vars) {
        Ok(config) => panic!("expected errors, got {config:?}"),
        Err(errors) => errors.0.into_iter().map(|e| (e.key, e.message)).collect(),
    }
}

#[test]
fn sentinel_topology_reads_the_sentinel_urls_and_defaults_the_master_name() {
    let yaml = with_store("  kind: redis\n  topology: sentinel\n");
    let urls = "redis://127.0.0.1:26379, redis://:pw@127.0.0.1:26380";
    let config = load(&yaml, &[("VNCGATE_SENTINEL_URLS", urls)]).expect("valid");
    let StoreKind::Redis {
        topology: RedisTopology::Sentinel { master_name, urls },
    } = config.store.kind
    else {
        panic!("expected sentinel");
    };
    assert_eq!(master_name, "vncgate");
    let urls: Vec<&str> = urls.iter().map(|u| u.expose()).collect();
    assert_eq!(
        urls,
        ["redis://127.0.0.1:26379", "redis://:pw@127.0.0.1:26380"]
    );
}

#[test]
fn cluster_topology_reads_its_seed_nodes_from_the_named_variable() {
    let yaml = with_store("  kind: redis\n  topology: cluster\n  cluster: { urls_env: SEEDS }\n");
    let config = load(&yaml, &[("SEEDS", "redis://a:7000,redis://b:7001")]).expect("valid");
    let StoreKind::Redis {
        topology: RedisTopology::Cluster { urls },
    } = config.store.kind
    else {
        panic!("expected cluster");
    };
    assert_eq!(urls.len(), 2);
}

#[rstest]
#[case::topology_without_redis("  topology: cluster\n", "store.topology")]
#[case::unknown_topology("  kind: redis\n  topology: ring\n", "store.topology")]
#[case::sentinel_settings_on_cluster(
    "  kind: redis\n  topology: cluster\n  sentinel: { master_name: m }\n",
    "store.sentinel"
)]
#[case::cluster_settings_on_standalone(
    "  kind: redis\n  cluster: { urls_env: X }\n",
    "store.cluster"
)]
#[case::url_env_on_cluster(
    "  kind: redis\n  topology: cluster\n  redis_url_env: X\n",
    "store.redis_url_env"
)]
#[case::braces_in_a_cluster_prefix(
    "  kind: redis\n  topology: cluster\n  key_prefix: \"{vg}:\"\n",
    "store.key_prefix"
)]
#[case::unknown_sentinel_key(
    "  kind: redis\n  topology: sentinel\n  sentinel: { master: m }\n",
    "store.sentinel.master"
)]
fn misplaced_store_keys_name_the_key(#[case] store: &str, #[case] key: &str) {
    let vars = [
        ("VNCGATE_REDIS_CLUSTER_URLS", "redis://a:7000"),
        ("VNCGATE_SENTINEL_URLS", "redis://a:26379"),
        ("VNCGATE_REDIS_URL", "redis://a:6379"),
        ("X", "redis://a:1"),
    ];
    let found = problems(&with_store(store), &vars);
    assert!(found.iter().any(|(k, _)| k == key), "{found:?}");
}

#[test]
fn a_bad_url_list_names_the_variable_not_its_value() {
    let yaml = with_store("  kind: redis\n  topology: cluster\n");
    let found = problems(
        &yaml,
        &[(
            "VNCGATE_REDIS_CLUSTER_URLS",
            "redis://a:1,http://secret@b:2",
        )],
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "store.cluster.urls_env");
    assert!(found[0].1.contains("VNCGATE_REDIS_CLUSTER_URLS"));
    assert!(!found[0].1.contains("secret"), "{found:?}");
}

#[test]
fn dns_discovery_needs_a_template_with_one_backend_placeholder() {
    let ok = with_pool(
        "    discovery: { kind: dns, addr_template: \"{backend}.sandboxes.svc:5900\" }\n",
    );
    let config = load(&ok, &[]).expect("valid");
    let pool = config.pool("default").expect("pool");
    let Discovery::Dns {
        addr_template,
        name_pattern,
    } = &pool.discovery
    else {
        panic!("expected dns");
    };
    assert_eq!(addr_template, "{backend}.sandboxes.svc:5900");
    // The default pattern is a DNS label, matched whole.
    assert!(name_pattern.matches("agent-7"));
    assert!(!name_pattern.matches("agent-7.evil.example"));
    assert!(!name_pattern.matches("Agent"));
    assert_eq!(
        pool.health_check_interval, None,
        "dynamic backends are not checked"
    );

    for (template, key) in [
        ("", "pools.default.discovery.addr_template"),
        ("sandbox:5900", "pools.default.discovery.addr_template"),
        (
            "{backend}.x:{backend}",
            "pools.default.discovery.addr_template",
        ),
        ("{backend}.x", "pools.default.discovery.addr_template"),
    ] {
        let yaml = with_pool(&format!(
            "    discovery: {{ kind: dns, addr_template: \"{template}\" }}\n"
        ));
        let found = problems(&yaml, &[]);
        assert!(found.iter().any(|(k, _)| k == key), "{template}: {found:?}");
    }
}

#[test]
fn a_name_pattern_is_anchored() {
    let yaml = with_pool("    discovery: { kind: registry, name_pattern: \"[a-z]+\" }\n");
    let config = load(&yaml, &[]).expect("valid");
    let pattern = config
        .pool("default")
        .and_then(|p| p.discovery.name_pattern().cloned())
        .expect("pattern");
    assert!(pattern.matches("abc"));
    assert!(!pattern.matches("abc/../x"));
    assert!(!pattern.matches("x:1"));
}

#[rstest]
#[case::backends_on_a_dns_pool(
    "    discovery: { kind: dns, addr_template: \"{backend}:1\" }\n    backends: [{ name: d, addr: \"h:1\" }]\n",
    "pools.default.backends"
)]
#[case::checks_on_a_registry_pool(
    "    discovery: { kind: registry }\n    health_check_interval_seconds: 5\n",
    "pools.default.health_check_interval_seconds"
)]
#[case::template_on_a_registry_pool(
    "    discovery: { kind: registry, addr_template: \"{backend}:1\" }\n",
    "pools.default.discovery.addr_template"
)]
#[case::pattern_on_a_static_pool(
    "    discovery: { name_pattern: x }\n    backends: [{ name: d, addr: \"h:1\" }]\n",
    "pools.default.discovery.name_pattern"
)]
#[case::bad_regex(
    "    discovery: { kind: registry, name_pattern: \"(\" }\n",
    "pools.default.discovery.name_pattern"
)]
#[case::unknown_kind("    discovery: { kind: consul }\n", "pools.default.discovery.kind")]
#[case::static_without_backends("    failover: true\n", "pools.default.backends")]
fn misplaced_discovery_keys_name_the_key(#[case] pool: &str, #[case] key: &str) {
    let found = problems(&with_pool(pool), &[]);
    assert!(found.iter().any(|(k, _)| k == key), "{found:?}");
}
