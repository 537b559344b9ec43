//! The YAML file as operators write it (contract §2). Optional keys stay `Option` here: defaults
//! and every semantic check live in `validate`, where all problems are collected at once.
//!
//! Unknown keys are errors, but not through `deny_unknown_fields`: that stops at the first one,
//! so an operator would fix one typo per run. The structs accept unknown keys, `serde_ignored`
//! reports each one it skips, and [`parse`] turns every one into a `ConfigError` that
//! `Config::from_yaml` always returns, so a typo is never silently ignored by `run`, a reload
//! or `check-config`.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::validate::{ConfigError, ConfigErrors};

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawConfig {
    pub server: Option<RawServer>,
    pub listeners: Option<Vec<RawListener>>,
    pub paths: Option<Vec<String>>,
    pub web_root: Option<String>,
    pub events_path: Option<String>,
    pub admin: Option<RawAdmin>,
    pub auth: Option<RawAuth>,
    pub store: Option<RawStore>,
    pub pools: Option<OrderedMap<RawPool>>,
    pub limits: Option<RawLimits>,
    pub logging: Option<RawLogging>,
    pub recording: Option<RawRecording>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawServer {
    pub threads: Option<u64>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub drain_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawListener {
    pub addr: String,
    pub tls: Option<RawTls>,
    pub proxy_protocol: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawAdmin {
    pub addr: String,
    pub token_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
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
#[serde(expecting = "a mapping")]
pub(super) struct RawStore {
    pub kind: Option<String>,
    pub topology: Option<String>,
    pub redis_url_env: Option<String>,
    pub sentinel: Option<RawSentinel>,
    pub cluster: Option<RawCluster>,
    pub key_prefix: Option<String>,
    pub session_idle_ttl_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawSentinel {
    pub master_name: Option<String>,
    pub urls_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawCluster {
    pub urls_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawDiscovery {
    pub kind: Option<String>,
    pub addr_template: Option<String>,
    pub name_pattern: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawPool {
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    pub discovery: Option<RawDiscovery>,
    pub failover: Option<bool>,
    pub health_check_interval_seconds: Option<u64>,
    pub health_check: Option<String>,
    pub rfb: Option<RawRfb>,
    pub clipboard: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawRfb {
    pub mode: Option<String>,
    pub password_env: Option<String>,
    pub username_env: Option<String>,
    pub tls: Option<RawRfbTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawRfbTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawBackend {
    pub name: String,
    pub addr: String,
    pub protocol: Option<String>,
    pub path: Option<String>,
    pub password_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawLimits {
    pub max_sessions: Option<u64>,
    pub max_sessions_per_user: Option<u64>,
    pub auth_failures_per_minute: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub message_buffer_budget_bytes: Option<u64>,
    pub ping_interval_seconds: Option<u64>,
    pub pong_timeout_seconds: Option<u64>,
    pub head_timeout_seconds: Option<u64>,
    pub tls_handshake_timeout_seconds: Option<u64>,
    pub max_head_bytes: Option<u64>,
    pub max_pre_auth_connections: Option<u64>,
    pub max_pre_auth_connections_per_address: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawLogging {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// `recording:` (contract §12).
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a mapping")]
pub(super) struct RawRecording {
    pub dir: Option<String>,
    pub when: Option<String>,
    pub input: Option<String>,
    pub max_bytes_per_session: Option<u64>,
    pub retention_days: Option<u64>,
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

/// The file's settings, and its unknown keys, each already an error (in file order).
pub(super) struct Parsed {
    pub raw: RawConfig,
    pub unknown_keys: Vec<ConfigError>,
}

/// Parse the YAML text. An empty document (or one with only comments) is an empty config, so
/// `validate` can report every missing section rather than a bare "EOF" error.
///
/// A value of the wrong type (or a YAML syntax error) stops the parse: there is no raw config to
/// validate then. The error comes after the unknown keys seen before it, which are reported too.
pub(super) fn parse(text: &str) -> Result<Parsed, ConfigErrors> {
    let mut unknown_keys = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| unknown_keys.push(unknown_key(&path));
    let deserializer =
        serde_ignored::Deserializer::new(serde_yaml::Deserializer::from_str(text), &mut on_ignored);
    let result: Result<RawConfig, _> = serde_path_to_error::deserialize(deserializer);
    match result {
        Ok(raw) => Ok(Parsed { raw, unknown_keys }),
        Err(err) => {
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
            unknown_keys.push(ConfigError { key, message });
            Err(ConfigErrors(unknown_keys))
        }
    }
}

/// One segment of a key path: a mapping key or a list index.
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_ignored::Path<'_>, out: &mut Vec<Segment>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            segments(parent, out);
            out.push(Segment::Index(*index));
        }
        Path::Map { parent, key } => {
            segments(parent, out);
            out.push(Segment::Key(key.clone()));
        }
        // `Option` and newtype wrappers are invisible in the file.
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent, out),
    }
}

/// `parent.key`, in serde_path_to_error's notation so every error names keys the same way.
fn child_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn child_index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The error for a key that `serde_ignored` saw skipped, worded as serde words it
/// (``unknown field `x`, expected one of ...``) so the message reads as it did under
/// `deny_unknown_fields`.
fn unknown_key(path: &serde_ignored::Path<'_>) -> ConfigError {
    let mut parts = Vec::new();
    segments(path, &mut parts);
    let mut key = String::new();
    // The parent's place in the schema: list indices and pool names (the operator's own) do not
    // change which keys are allowed, so they are left out.
    let mut shape = String::new();
    let mut field = String::new();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match part {
            Segment::Key(name) => {
                key = child_key(&key, name);
                if last {
                    field.clone_from(name);
                } else if shape == "pools" {
                    shape.push_str(".*");
                } else {
                    shape = child_key(&shape, name);
                }
            }
            Segment::Index(index) => {
                key = child_index(&key, *index);
                if last {
                    field = index.to_string();
                } else {
                    shape.push_str("[]");
                }
            }
        }
    }
    let message = match expected_fields(&shape) {
        Some(fields) => {
            <serde::de::value::Error as serde::de::Error>::unknown_field(&field, fields).to_string()
        }
        None => format!("unknown field `{field}`"),
    };
    ConfigError { key, message }
}

/// The keys allowed in the mapping at `shape` (see [`unknown_key`]), for the "expected one of"
/// hint. A shape missing here only loses the hint: the key is still reported.
fn expected_fields(shape: &str) -> Option<&'static [&'static str]> {
    Some(match shape {
        "" => fields_of::<RawConfig>(),
        "server" => fields_of::<RawServer>(),
        "listeners[]" => fields_of::<RawListener>(),
        "listeners[].tls" => fields_of::<RawTls>(),
        "admin" => fields_of::<RawAdmin>(),
        "auth" => fields_of::<RawAuth>(),
        "store" => fields_of::<RawStore>(),
        "store.sentinel" => fields_of::<RawSentinel>(),
        "store.cluster" => fields_of::<RawCluster>(),
        "pools.*.discovery" => fields_of::<RawDiscovery>(),
        "pools.*" => fields_of::<RawPool>(),
        "pools.*.rfb" => fields_of::<RawRfb>(),
        "pools.*.rfb.tls" => fields_of::<RawRfbTls>(),
        "pools.*.backends[]" => fields_of::<RawBackend>(),
        "limits" => fields_of::<RawLimits>(),
        "logging" => fields_of::<RawLogging>(),
        "recording" => fields_of::<RawRecording>(),
        _ => return None,
    })
}

/// The field names serde's derive passes to `deserialize_struct`, read by a deserializer that
/// only records them: the structs above stay the one list of keys.
fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // Always an error: the recorder never produces a value, it only sees the field list.
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// Errors in file order: the unknown keys (found in file order while parsing) merged into the
/// semantic problems (in the order `validate` checks, which follows the documented layout). An
/// unknown key goes before the first problem that comes after it in the file, and at the latest
/// when the problems move on from its top-level section. The problems keep their own order.
pub(super) fn in_file_order(
    text: &str,
    unknown_keys: Vec<ConfigError>,
    problems: Vec<ConfigError>,
) -> Vec<ConfigError> {
    let order = KeyOrder::of(text);
    let mut out = Vec::with_capacity(unknown_keys.len() + problems.len());
    let mut unknown = unknown_keys
        .into_iter()
        .map(|e| (order.rank(&e.key), e))
        .peekable();
    let mut section: Option<String> = None;
    for problem in problems {
        let top = section_of(&problem.key);
        // Leaving a section (for a problem elsewhere, or one of a section the file leaves out):
        // the unknown keys written inside it come first.
        let left = section
            .as_deref()
            .filter(|s| top != Some(*s))
            .and_then(|s| order.end(s));
        let bound = [left, order.rank(&problem.key)].into_iter().flatten().max();
        if let Some(bound) = bound {
            while let Some((_, e)) = unknown.next_if(|(r, _)| r.is_some_and(|r| r < bound)) {
                out.push(e);
            }
        }
        section = top.map(str::to_owned);
        out.push(problem);
    }
    out.extend(unknown.map(|(_, e)| e));
    out
}

/// Where each key path of the document starts and ends: `(first, end)` in a pre-order count of
/// the document's nodes, `end` exclusive. A path written twice (a duplicate pool name) keeps its
/// first place.
struct KeyOrder(HashMap<String, (usize, usize)>);

impl KeyOrder {
    /// Best effort: a document that does not parse yields the places recorded before the error.
    fn of(text: &str) -> KeyOrder {
        let mut recorder = Recorder::default();
        let walk = Walk {
            path: String::new(),
            rec: &mut recorder,
        };
        let _ = walk.deserialize(serde_yaml::Deserializer::from_str(text));
        KeyOrder(recorder.spans)
    }

    /// A key in the file ranks where it is written. A key that is absent (a default that turned
    /// out invalid, a required key not given) ranks at the end of the deepest section around it
    /// that is written, where a reader would notice it missing; one whose whole section is absent
    /// has no place in the file, and neither has a problem of the whole file (empty key).
    /// Where the subtree at `key` ends, if the file has it.
    fn end(&self, key: &str) -> Option<usize> {
        self.0.get(key).map(|(_, end)| *end)
    }

    fn rank(&self, key: &str) -> Option<usize> {
        if key.is_empty() {
            return None;
        }
        if let Some((start, _)) = self.0.get(key) {
            return Some(*start);
        }
        prefixes(key)
            .into_iter()
            .skip(1)
            .find_map(|ancestor| self.0.get(ancestor).map(|(_, end)| *end))
    }
}

#[derive(Default)]
struct Recorder {
    spans: HashMap<String, (usize, usize)>,
    next: usize,
}

/// Visits every node of the document, recording its path. Not the typed parse: that one skips
/// what it does not know, and keys it knows are not reported to us.
struct Walk<'r> {
    path: String,
    rec: &'r mut Recorder,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let Walk { path, rec } = self;
        let start = rec.next;
        rec.next += 1;
        deserializer.deserialize_any(Node {
            path: &path,
            rec: &mut *rec,
        })?;
        let end = rec.next;
        rec.spans.entry(path).or_insert((start, end));
        Ok(())
    }
}

struct Node<'p, 'r> {
    path: &'p str,
    rec: &'r mut Recorder,
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<KeyText>()? {
            match key.0 {
                Some(key) => map.next_value_seed(Walk {
                    path: child_key(self.path, &key),
                    rec: &mut *self.rec,
                })?,
                // A mapping used as a key names nothing the schema has.
                None => map.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while seq
            .next_element_seed(Walk {
                path: child_index(self.path, index),
                rec: &mut *self.rec,
            })?
            .is_some()
        {
            index += 1;
        }
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag x`): the schema has none, and nothing inside is a key path.
        IgnoredAny.visit_enum(data).map(drop)
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A mapping key as the typed parse names it in a path: scalars as written, anything else `None`.
struct KeyText(Option<String>);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<KeyText, A::Error> {
                IgnoredAny.visit_map(map).map(|_| KeyText(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<KeyText, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| KeyText(None))
            }
            fn visit_enum<A: serde::de::EnumAccess<'de>>(
                self,
                data: A,
            ) -> Result<KeyText, A::Error> {
                IgnoredAny.visit_enum(data).map(|_| KeyText(None))
            }
        }

        deserializer.deserialize_any(KeyVisitor)
    }
}

/// The top-level key of `key` (its section); `None` for a problem of the whole file.
fn section_of(key: &str) -> Option<&str> {
    prefixes(key).last().copied().filter(|s| !s.is_empty())
}

/// `key` and its ancestors, deepest first: `a.b[0]`, `a.b`, `a`.
fn prefixes(key: &str) -> Vec<&str> {
    let mut out = vec![key];
    let cuts = key
        .char_indices()
        .filter(|&(_, c)| c == '.' || c == '[')
        .map(|(i, _)| i);
    let mut cuts: Vec<usize> = cuts.filter(|&i| i > 0).collect();
    cuts.reverse();
    out.extend(cuts.into_iter().map(|end| &key[..end]));
    out
}

/// serde_yaml prefixes its messages with its own idea of the path, which is `key` or one of its
/// ancestors (for an unknown field it names the enclosing mapping). The key is printed already,
/// so repeating it would read `server.foo: server: unknown field ...`.
fn strip_path_prefix<'a>(message: &'a str, key: &str) -> &'a str {
    for ancestor in prefixes(key) {
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
        let parsed = parse("# nothing here\n").expect("empty document parses");
        assert!(parsed.raw.listeners.is_none() && parsed.raw.pools.is_none());
        assert!(parsed.unknown_keys.is_empty());
    }

    #[test]
    fn duplicate_pool_names_are_kept_for_validation() {
        let parsed = parse("pools:\n  a: {backends: []}\n  a: {backends: []}\n").expect("parses");
        let names: Vec<_> = parsed
            .raw
            .pools
            .expect("pools")
            .0
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(names, ["a", "a"]);
    }

    fn unknown(yaml: &str) -> Vec<(String, String)> {
        let parsed = parse(yaml).expect("parses");
        parsed
            .unknown_keys
            .into_iter()
            .map(|e| (e.key, e.message))
            .collect()
    }

    /// Every mapping of the schema, so a struct added without its entry in `expected_fields`
    /// shows up here as a missing "expected" hint.
    #[test]
    fn unknown_keys_everywhere_name_their_path_and_the_allowed_keys() {
        let yaml = r#"
x0: 1
server: { x1: 1 }
listeners:
  - { addr: a, x2: 1, tls: { cert: c, key: k, x3: 1 } }
admin: { addr: a, x4: 1 }
auth: { x5: 1 }
store: { x6: 1 }
pools:
  p.q:
    x7: 1
    rfb: { x8: 1, tls: { x9: 1 } }
    backends:
      - { name: n, addr: a }
      - { name: n, addr: a, x10: 1 }
limits: { x11: 1 }
logging: { x12: 1 }
"#;
        let got = unknown(yaml);
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "x0",
                "server.x1",
                "listeners[0].x2",
                "listeners[0].tls.x3",
                "admin.x4",
                "auth.x5",
                "store.x6",
                "pools.p.q.x7",
                "pools.p.q.rfb.x8",
                "pools.p.q.rfb.tls.x9",
                "pools.p.q.backends[1].x10",
                "limits.x11",
                "logging.x12",
            ]
        );
        for (key, message) in &got {
            let field = key.rsplit('.').next().unwrap_or(key);
            assert!(
                message.starts_with(&format!("unknown field `{field}`, expected")),
                "{key}: {message}"
            );
        }
        assert_eq!(
            got[1].1,
            "unknown field `x1`, expected one of `threads`, `pid_file`, `upgrade_sock`, `drain_seconds`"
        );
        assert_eq!(got[3].1, "unknown field `x3`, expected `cert` or `key`");
    }

    #[test]
    fn a_type_error_comes_after_the_unknown_keys_before_it() {
        let errors =
            parse("server: { thread: 1 }\nlimits: { max_session: 1, max_sessions: lots }\n")
                .err()
                .expect("type error");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.thread", "limits.max_session", "limits.max_sessions"]
        );
        assert!(errors.0[2].message.starts_with("invalid type"), "{errors}");
    }

    #[test]
    fn unknown_keys_are_merged_into_the_problems_in_file_order() {
        let text = "a: 1\nb:\n  x: 1\n  y: [1, {z: 2}]\nc: 3\n";
        let e = |key: &str| ConfigError::new(key, "m");
        let merged = in_file_order(
            text,
            vec![e("a"), e("b.y[1].z"), e("c")],
            vec![e("b.x"), e("b.w"), e(""), e("c"), e("d")],
        );
        let keys: Vec<&str> = merged.iter().map(|e| e.key.as_str()).collect();
        // `b.w` is absent: it ranks at the end of `b`, so after `b.y[1].z`. The whole-file problem
        // has no place; `c` (the problem) goes before the unknown `c` at the same place, which
        // still comes before `d`, a problem after section `c`.
        assert_eq!(keys, ["a", "b.x", "b.y[1].z", "b.w", "", "c", "c", "d"]);

        // `d` is a section the file leaves out: the unknown key of `b` before it still comes
        // first, because the problems have left `b`.
        let merged = in_file_order(text, vec![e("b.y[1].z")], vec![e("b.x"), e("d"), e("c")]);
        let keys: Vec<&str> = merged.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["b.x", "b.y[1].z", "d", "c"]);
    }

    #[test]
    fn key_order_survives_duplicates_and_odd_keys() {
        let order = KeyOrder::of("p:\n  a: 1\n  a: 2\n  1: x\n  ? [k]\n  : v\nq: 2\n");
        assert_eq!(order.rank("p"), Some(1));
        assert_eq!(order.rank("p.a"), Some(2));
        assert_eq!(order.rank("p.1"), Some(4));
        assert_eq!(order.rank("q"), Some(5));
        // The end of `p`: after its last node (the complex key's value is skipped, uncounted).
        assert_eq!(order.rank("p.missing"), Some(5));
        assert_eq!(order.rank("r"), None);
        assert_eq!(order.rank(""), None);
    }

    #[test]
    fn prefixes_run_deepest_first() {
        assert_eq!(prefixes("a.b[0].c"), ["a.b[0].c", "a.b[0]", "a.b", "a"]);
        assert_eq!(prefixes("a"), ["a"]);
    }
}
