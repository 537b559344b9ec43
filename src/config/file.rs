//! The YAML file as operators write it (contract §2). Every struct denies unknown keys, so a typo
//! is an error instead of a silently ignored setting. Optional keys stay `Option` here: defaults
//! and every semantic check live in `validate`, where all problems are collected at once.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use super::validate::{ConfigError, ConfigErrors};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawConfig {
    pub server: Option<RawServer>,
    pub listeners: Option<Vec<RawListener>>,
    pub paths: Option<Vec<String>>,
    pub web_root: Option<String>,
    pub admin: Option<RawAdmin>,
    pub auth: Option<RawAuth>,
    pub store: Option<RawStore>,
    pub pools: Option<OrderedMap<RawPool>>,
    pub limits: Option<RawLimits>,
    pub logging: Option<RawLogging>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawServer {
    pub threads: Option<u64>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub drain_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawListener {
    pub addr: String,
    pub tls: Option<RawTls>,
    pub proxy_protocol: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawAdmin {
    pub addr: String,
    pub token_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawAuth {
    pub algorithms: Option<Vec<String>>,
    pub secret_env: Option<String>,
    pub public_key_files: Option<Vec<String>>,
    pub jwks_url: Option<String>,
    pub jwks_cache_seconds: Option<u64>,
    pub jwks_min_refresh_seconds: Option<u64>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: Option<u64>,
    pub allowed_origins: Option<Vec<String>>,
    pub on_expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawStore {
    pub kind: Option<String>,
    pub redis_url_env: Option<String>,
    pub key_prefix: Option<String>,
    pub session_idle_ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawPool {
    pub backends: Vec<RawBackend>,
    pub failover: Option<bool>,
    pub health_check_interval_seconds: Option<u64>,
    pub health_check: Option<String>,
    pub rfb: Option<RawRfb>,
    pub clipboard: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawRfb {
    pub mode: Option<String>,
    pub password_env: Option<String>,
    pub username_env: Option<String>,
    pub tls: Option<RawRfbTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawRfbTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawBackend {
    pub name: String,
    pub addr: String,
    pub protocol: Option<String>,
    pub path: Option<String>,
    pub password_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawLimits {
    pub max_sessions: Option<u64>,
    pub max_sessions_per_user: Option<u64>,
    pub auth_failures_per_minute: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub ping_interval_seconds: Option<u64>,
    pub pong_timeout_seconds: Option<u64>,
    pub head_timeout_seconds: Option<u64>,
    pub tls_handshake_timeout_seconds: Option<u64>,
    pub max_head_bytes: Option<u64>,
    pub max_pre_auth_connections: Option<u64>,
    pub max_pre_auth_connections_per_address: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping")]
pub(super) struct RawLogging {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// A YAML mapping kept as written: in file order (so errors follow the file) and with duplicate
/// keys preserved, because a map type would silently keep only the last `default:` pool and
/// `validate` reports duplicates with their key path instead.
#[derive(Debug)]
pub(super) struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// Parse the YAML text. An empty document (or one with only comments) is an empty config, so
/// `validate` can report every missing section rather than a bare "EOF" error.
pub(super) fn parse(text: &str) -> Result<RawConfig, ConfigErrors> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        // serde_path_to_error says "." for the document root and "?" when the parser failed
        // before reaching any key (a syntax error): neither names a key.
        let key = if path == "." || path == "?" {
            String::new()
        } else {
            path
        };
        let message = strip_path_prefix(&message, &key).to_string();
        ConfigErrors(vec![ConfigError { key, message }])
    })
}

/// serde_yaml prefixes its messages with its own idea of the path, which is `key` or one of its
/// ancestors (for an unknown field it names the enclosing mapping). The key is printed already,
/// so repeating it would read `server.foo: server: unknown field ...`.
fn strip_path_prefix<'a>(message: &'a str, key: &str) -> &'a str {
    let cut_points = key
        .char_indices()
        .filter(|&(_, c)| c == '.' || c == '[')
        .map(|(i, _)| i)
        .chain(std::iter::once(key.len()));
    for end in cut_points.collect::<Vec<_>>().into_iter().rev() {
        let ancestor = &key[..end];
        if ancestor.is_empty() {
            continue;
        }
        if let Some(rest) = message
            .strip_prefix(ancestor)
            .and_then(|m| m.strip_prefix(": "))
        {
            return rest;
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_deepest_matching_ancestor() {
        assert_eq!(
            strip_path_prefix("server: unknown field `x`", "server.x"),
            "unknown field `x`"
        );
        assert_eq!(strip_path_prefix("a.b[0]: bad", "a.b[0]"), "bad");
        assert_eq!(strip_path_prefix("a.b: bad", "a.b[0].c"), "bad");
        assert_eq!(strip_path_prefix("unrelated: bad", "a.b"), "unrelated: bad");
        assert_eq!(strip_path_prefix("syntax error", ""), "syntax error");
    }

    #[test]
    fn empty_document_is_an_empty_config() {
        let raw = parse("# nothing here\n").expect("empty document parses");
        assert!(raw.listeners.is_none() && raw.pools.is_none());
    }

    #[test]
    fn duplicate_pool_names_are_kept_for_validation() {
        let raw = parse("pools:\n  a: {backends: []}\n  a: {backends: []}\n").expect("parses");
        let names: Vec<_> = raw
            .pools
            .expect("pools")
            .0
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(names, ["a", "a"]);
    }
}
