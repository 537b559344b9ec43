//! Logs (contract §9): one JSON object per line on stderr, with `timestamp` (RFC 3339, UTC),
//! `level`, `event`, `message`, and the ids of the connection's span (`conn_id`, `session_id`,
//! `user_id`, ...) flattened into every line, so one `jq 'select(.session_id=="x")'` traces a
//! session. Pingora's own `log` output is bridged into the same stream.
//!
//! Why a small layer of our own: tracing-subscriber's JSON formatter nests span fields under
//! `span`/`spans`; the contract (and every log pipeline query) wants them at the top level.

use std::io::Write;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Whatever the configured level: tungstenite at debug/trace dumps frame payloads (keystrokes,
/// VNC passwords) and Pingora at trace dumps request headers (tokens). Those never reach a log.
fn never_secret(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    if target.starts_with("tungstenite") || target.starts_with("tokio_tungstenite") {
        return *meta.level() <= tracing::Level::INFO;
    }
    if target.starts_with("pingora") {
        return *meta.level() <= tracing::Level::DEBUG;
    }
    true
}

/// The environment variable that overrides `logging.level` (tracing filter syntax).
pub const LOG_ENV: &str = "VNCGATE_LOG";

/// Install the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat, level: &str) {
    let filter = std::env::var(LOG_ENV)
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(filter_fn(never_secret));
    // `try_init` also installs the `log` -> `tracing` bridge for Pingora's log lines; it fails
    // only when a subscriber is already set (tests that init twice), which is harmless.
    let _ = match format {
        LogFormat::Json => registry.with(JsonLines).try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours only for a terminal; a file or a pipe gets plain text.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
    };
}

/// Span fields, stored in the span's extensions when it is created.
struct SpanFields(Map<String, Value>);

struct JsonLines;

struct Collect<'a>(&'a mut Map<String, Value>);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

impl Collect<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        // Events bridged from the `log` crate carry `log.target` etc.; keep only the target.
        match name {
            "log.target" => {
                self.0.insert("target".into(), value);
            }
            n if n.starts_with("log.") => {}
            n => {
                self.0.insert(n.to_owned(), value);
            }
        }
    }
}

impl<S> Layer<S> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Map::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut Collect(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        let now = time::OffsetDateTime::now_utc();
        let ts = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), Value::from(ts));
        line.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str().to_ascii_lowercase()),
        );
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &fields.0 {
                        line.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        event.record(&mut Collect(&mut line));
        if !line.contains_key("event") {
            // Lines from Pingora and libraries: name them by origin so they can be filtered.
            let target = line
                .get("target")
                .and_then(Value::as_str)
                .unwrap_or(event.metadata().target())
                .to_owned();
            let origin = if target.starts_with("pingora") {
                "pingora"
            } else {
                "library"
            };
            line.insert("event".into(), Value::from(origin));
            line.entry("target").or_insert(Value::from(target));
        }
        line.entry("message").or_insert(Value::from(""));
        let mut bytes = Value::Object(line).to_string().into_bytes();
        bytes.push(b'\n');
        // One write per line, under the stderr lock, so lines from threads never interleave.
        let _ = std::io::stderr().lock().write_all(&bytes);
    }
}
