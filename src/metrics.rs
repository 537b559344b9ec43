//! The contract's Prometheus metrics (§8), in one place.
//!
//! Every series a dashboard or alert uses exists from the first scrape, at zero: label values
//! are known up front (error codes, close codes, pools, backends) and touched at start, so a
//! `rate()` over a code that has never happened yet is 0 rather than "no data".
//! Never a user, session or token as a label: cardinality stays bounded by the config.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::bridge::CloseCode;
use crate::config::Config;
use crate::gateway::refusal::ErrorCode;

/// Holds a gauge up by one for as long as it lives, however the holder ends (panics included).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn inc(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub const DIRECTIONS: [&str; 2] = ["client_to_backend", "backend_to_client"];
/// `vncgate_input_dropped_total{kind}` (contract §8).
pub const INPUT_KINDS: [&str; 5] = ["key", "pointer", "clipboard", "desktop_size", "other"];
pub const STORE_OPS: [&str; 13] = [
    "get",
    "claim",
    "replace",
    "refresh",
    "release",
    "revoke",
    "check_revoked",
    "kick",
    "check_kicked",
    "publish",
    "connect",
    "ping",
    "subscribe",
];

pub struct Metrics {
    registry: Registry,
    pub build_info: GaugeVec,
    pub upgrades_total: IntCounterVec,
    pub upgrade_duration: Histogram,
    pub sessions_active: IntGaugeVec,
    pub session_duration: HistogramVec,
    pub disconnects_total: IntCounterVec,
    pub relay_bytes_total: IntCounterVec,
    pub backpressure_wait_seconds_total: prometheus::CounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_sessions: IntGaugeVec,
    pub backend_connect_duration: HistogramVec,
    pub store_up: IntGauge,
    /// Not in the contract's table (an addition): 1 while the `{prefix}events` subscription is
    /// live and answers its pings, i.e. kicks and revocations from other replicas arrive.
    pub store_subscriber_up: IntGauge,
    pub store_errors_total: IntCounterVec,
    pub store_op_duration: HistogramVec,
    pub auth_failures_total: IntCounterVec,
    /// Not in the contract's table (allowed: additions only). Bytes read from one side and not
    /// yet written to the other, summed over sessions: the proof that buffers stay bounded.
    pub relay_buffered_bytes: IntGauge,
    /// Backend -> client bytes moved by splice(2), never copied into user space: shows whether
    /// the zero-copy path is in use (it is not on TLS listeners, nor where the kernel refuses).
    pub relay_spliced_bytes_total: IntCounter,
    /// Not in the contract's table (an addition): bytes of client messages still arriving that
    /// sessions hold beyond one read chunk each, summed (src/bridge/budget.rs).
    pub message_buffer_bytes: IntGauge,
    /// Configured `limits.message_buffer_budget_bytes`: the ceiling of `message_buffer_bytes`.
    pub message_buffer_budget_bytes: IntGauge,
    /// Sessions closed with 1009 because that budget was exhausted.
    pub message_budget_exhausted_total: IntCounter,
    /// The budget itself, shared by every session; it keeps the three series above.
    pub message_budget: std::sync::Arc<crate::bridge::budget::MessageBudget>,
    /// Configured capacity, so alerts can compare `sessions_active` with it.
    pub max_sessions: Gauge,
    /// 1 for the hash of the config file in use (the series of older hashes are removed).
    pub config_info: GaugeVec,
    pub config_reloads_total: IntCounterVec,
    pub config_last_reload_timestamp: Gauge,
    /// Terminate mode: TCP connected -> the backend's ServerInit read (contract §8).
    pub backend_handshake_duration: HistogramVec,
    /// Client input the gateway did not pass to the backend (view-only), by kind.
    pub input_dropped_total: IntCounterVec,
    /// Cut-text messages stopped by the clipboard policy, by direction.
    pub clipboard_blocked_total: IntCounterVec,
    /// Not in the contract's table (an addition): handshakes in which a backend refused the
    /// gateway's configured credentials, per backend, for the alert and its runbook.
    pub backend_auth_failures_total: IntCounterVec,
    /// The accept path's own series (pre-auth connections, refused connections).
    pub edge: crate::gateway::pre_auth::EdgeMetrics,
    /// `vncgate_event_streams` (registered by `gateway::events`).
    pub events: crate::gateway::events::EventMetrics,
    /// Dynamic backends and the cluster-wide view (registry size, cluster session counts).
    pub directory: crate::routing::directory::DirectoryMetrics,
    /// Not in the contract's table (additions): `vncgate_store_topology`,
    /// `vncgate_store_master_up`, `vncgate_store_nodes_reachable` (store.topology, §13).
    pub store_topology: crate::routing::redis::topology::TopologyMetrics,
    /// `vncgate_recordings_active`, `vncgate_recording_bytes_total`,
    /// `vncgate_recording_dropped_total` (contract §8, §12).
    pub recording: crate::recording::RecordingMetrics,
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

// Upgrades and connects are sub-millisecond on a LAN and seconds when a backend is slow.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
// VNC sessions last from seconds (a failed login) to days (a pinned desktop left open).
const SESSION_BUCKETS: &[f64] = &[
    1.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
    259200.0,
];
// A store round trip on a LAN is ~0.1-1 ms; timeouts sit at 0.5 s.
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl Metrics {
    /// Build the metric set and pre-create every series the config implies.
    pub fn new(config: &Config) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let edge = crate::gateway::pre_auth::EdgeMetrics::register(&registry)?;
        let events = crate::gateway::events::EventMetrics::register(&registry)?;
        let directory = crate::routing::directory::DirectoryMetrics::register(&registry)?;
        directory.init(config);
        let message_buffer_bytes = IntGauge::new(
            "vncgate_message_buffer_bytes",
            "Bytes of unfinished client messages held beyond one read chunk per session.",
        )?;
        let message_buffer_budget_bytes = IntGauge::new(
            "vncgate_message_buffer_budget_bytes",
            "Configured limits.message_buffer_budget_bytes.",
        )?;
        let message_budget_exhausted_total = IntCounter::new(
            "vncgate_message_budget_exhausted_total",
            "Sessions closed with 1009 because the message buffer budget was exhausted.",
        )?;
        let message_budget = std::sync::Arc::new(crate::bridge::budget::MessageBudget::new(
            config.limits.message_buffer_budget_bytes,
            message_buffer_bytes.clone(),
            message_buffer_budget_bytes.clone(),
            message_budget_exhausted_total.clone(),
        ));
        let m = Metrics {
            recording: crate::recording::RecordingMetrics::register(&registry)?,
            store_topology: crate::routing::redis::topology::TopologyMetrics::register(
                &registry, config,
            )?,
            edge,
            events,
            directory,
            message_buffer_bytes,
            message_buffer_budget_bytes,
            message_budget_exhausted_total,
            message_budget,
            build_info: GaugeVec::new(
                Opts::new("vncgate_build_info", "Build information; always 1."),
                &["version"],
            )?,
            upgrades_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_upgrades_total",
                    "WebSocket upgrade attempts by result.",
                ),
                &["result"],
            )?,
            upgrade_duration: Histogram::with_opts(hist(
                "vncgate_upgrade_duration_seconds",
                "Time from request read to backend connected, for successful upgrades.",
                LATENCY_BUCKETS,
            ))?,
            sessions_active: IntGaugeVec::new(
                Opts::new("vncgate_sessions_active", "Live bridged sessions."),
                &["pool"],
            )?,
            session_duration: HistogramVec::new(
                hist(
                    "vncgate_session_duration_seconds",
                    "Duration of ended sessions.",
                    SESSION_BUCKETS,
                ),
                &["pool"],
            )?,
            disconnects_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_disconnects_total",
                    "Ended sessions by WebSocket close code.",
                ),
                &["code"],
            )?,
            relay_bytes_total: IntCounterVec::new(
                Opts::new("vncgate_relay_bytes_total", "Payload bytes relayed."),
                &["direction"],
            )?,
            backpressure_wait_seconds_total: prometheus::CounterVec::new(
                Opts::new(
                    "vncgate_backpressure_wait_seconds_total",
                    "Time spent waiting for the receiving side to accept more bytes.",
                ),
                &["direction"],
            )?,
            backend_up: IntGaugeVec::new(
                Opts::new(
                    "vncgate_backend_up",
                    "1 when the backend passes its health check.",
                ),
                &["pool", "backend"],
            )?,
            backend_sessions: IntGaugeVec::new(
                Opts::new("vncgate_backend_sessions", "Live sessions per backend."),
                &["pool", "backend"],
            )?,
            backend_connect_duration: HistogramVec::new(
                hist(
                    "vncgate_backend_connect_duration_seconds",
                    "Time to connect to a backend.",
                    LATENCY_BUCKETS,
                ),
                &["pool"],
            )?,
            store_up: IntGauge::new("vncgate_store_up", "1 when the session store is reachable.")?,
            store_subscriber_up: IntGauge::new(
                "vncgate_store_subscriber_up",
                "1 when the session store's event subscription (kicks, revocations from other replicas) is live.",
            )?,
            store_errors_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_store_errors_total",
                    "Failed session store operations.",
                ),
                &["op"],
            )?,
            store_op_duration: HistogramVec::new(
                hist(
                    "vncgate_store_op_duration_seconds",
                    "Session store operation latency.",
                    STORE_BUCKETS,
                ),
                &["op"],
            )?,
            auth_failures_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_auth_failures_total",
                    "Refused upgrades by auth reason.",
                ),
                &["reason"],
            )?,
            relay_buffered_bytes: IntGauge::new(
                "vncgate_relay_buffered_bytes",
                "Bytes read from one side of a session and not yet written to the other.",
            )?,
            relay_spliced_bytes_total: IntCounter::new(
                "vncgate_relay_spliced_bytes_total",
                "Backend-to-client payload bytes moved by splice(2) without a copy into the gateway.",
            )?,
            max_sessions: Gauge::new("vncgate_max_sessions", "Configured limits.max_sessions.")?,
            config_info: GaugeVec::new(
                Opts::new(
                    "vncgate_config_info",
                    "The config in use, by hash of its file; always 1.",
                ),
                &["hash"],
            )?,
            config_reloads_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_config_reloads_total",
                    "Config reloads (SIGHUP) by result.",
                ),
                &["result"],
            )?,
            config_last_reload_timestamp: Gauge::new(
                "vncgate_config_last_reload_timestamp_seconds",
                "When the config in use was loaded (unix seconds).",
            )?,
            backend_handshake_duration: HistogramVec::new(
                hist(
                    "vncgate_backend_handshake_duration_seconds",
                    "Terminate mode: time from the backend TCP connect to its ServerInit.",
                    LATENCY_BUCKETS,
                ),
                &["pool"],
            )?,
            input_dropped_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_input_dropped_total",
                    "Client input messages not passed to the backend (view-only), by kind.",
                ),
                &["kind"],
            )?,
            clipboard_blocked_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_clipboard_blocked_total",
                    "Clipboard messages stopped by the clipboard policy, by direction.",
                ),
                &["direction"],
            )?,
            backend_auth_failures_total: IntCounterVec::new(
                Opts::new(
                    "vncgate_backend_auth_failures_total",
                    "Backend RFB handshakes that refused the gateway's credentials.",
                ),
                &["pool", "backend"],
            )?,
            registry,
        };
        m.register_all()?;
        m.touch_series(config);
        Ok(m)
    }

    fn register_all(&self) -> Result<(), prometheus::Error> {
        let r = &self.registry;
        r.register(Box::new(self.build_info.clone()))?;
        r.register(Box::new(self.upgrades_total.clone()))?;
        r.register(Box::new(self.upgrade_duration.clone()))?;
        r.register(Box::new(self.sessions_active.clone()))?;
        r.register(Box::new(self.session_duration.clone()))?;
        r.register(Box::new(self.disconnects_total.clone()))?;
        r.register(Box::new(self.relay_bytes_total.clone()))?;
        r.register(Box::new(self.backpressure_wait_seconds_total.clone()))?;
        r.register(Box::new(self.backend_up.clone()))?;
        r.register(Box::new(self.backend_sessions.clone()))?;
        r.register(Box::new(self.backend_connect_duration.clone()))?;
        r.register(Box::new(self.store_up.clone()))?;
        r.register(Box::new(self.store_subscriber_up.clone()))?;
        r.register(Box::new(self.store_errors_total.clone()))?;
        r.register(Box::new(self.store_op_duration.clone()))?;
        r.register(Box::new(self.auth_failures_total.clone()))?;
        r.register(Box::new(self.relay_buffered_bytes.clone()))?;
        r.register(Box::new(self.relay_spliced_bytes_total.clone()))?;
        r.register(Box::new(self.message_buffer_bytes.clone()))?;
        r.register(Box::new(self.message_buffer_budget_bytes.clone()))?;
        r.register(Box::new(self.message_budget_exhausted_total.clone()))?;
        r.register(Box::new(self.max_sessions.clone()))?;
        r.register(Box::new(self.config_info.clone()))?;
        r.register(Box::new(self.config_reloads_total.clone()))?;
        r.register(Box::new(self.config_last_reload_timestamp.clone()))?;
        r.register(Box::new(self.backend_handshake_duration.clone()))?;
        r.register(Box::new(self.input_dropped_total.clone()))?;
        r.register(Box::new(self.clipboard_blocked_total.clone()))?;
        r.register(Box::new(self.backend_auth_failures_total.clone()))?;
        Ok(())
    }

    /// Create the series a (new) config implies and record it as the config in use.
    pub fn config_loaded(&self, config: &Config, previous_hash: Option<&str>) {
        if let Some(old) = previous_hash.filter(|h| *h != config.hash) {
            let _ = self.config_info.remove_label_values(&[old]);
        }
        self.config_info
            .with_label_values(&[config.hash.as_str()])
            .set(1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.config_last_reload_timestamp.set(now);
        self.max_sessions.set(config.limits.max_sessions as f64);
        self.message_budget
            .set_limit(config.limits.message_buffer_budget_bytes);
        for (pool_name, pool) in &config.pools {
            self.sessions_active.with_label_values(&[pool_name]);
            self.session_duration.with_label_values(&[pool_name]);
            self.backend_connect_duration
                .with_label_values(&[pool_name]);
            self.backend_handshake_duration
                .with_label_values(&[pool_name]);
            for backend in &pool.backends {
                self.backend_auth_failures_total
                    .with_label_values(&[pool_name, &backend.name]);
                self.backend_up
                    .with_label_values(&[pool_name, &backend.name]);
                self.backend_sessions
                    .with_label_values(&[pool_name, &backend.name]);
            }
        }
    }

    fn touch_series(&self, config: &Config) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        self.upgrades_total.with_label_values(&["ok"]);
        for code in ErrorCode::ALL {
            self.upgrades_total.with_label_values(&[code.as_str()]);
            if code.is_auth_failure() {
                self.auth_failures_total.with_label_values(&[code.as_str()]);
            }
        }
        for code in CloseCode::ALL {
            self.disconnects_total
                .with_label_values(&[&code.as_u16().to_string()]);
        }
        for dir in DIRECTIONS {
            self.relay_bytes_total.with_label_values(&[dir]);
            self.backpressure_wait_seconds_total
                .with_label_values(&[dir]);
        }
        for kind in INPUT_KINDS {
            self.input_dropped_total.with_label_values(&[kind]);
        }
        for dir in DIRECTIONS {
            self.clipboard_blocked_total.with_label_values(&[dir]);
        }
        for op in STORE_OPS {
            self.store_errors_total.with_label_values(&[op]);
            self.store_op_duration.with_label_values(&[op]);
        }
        // The embedded store is always reachable; a remote store reports its own state.
        self.store_up.set(1);
        self.store_subscriber_up.set(1);
        for result in ["ok", "error"] {
            self.config_reloads_total.with_label_values(&[result]);
        }
        self.config_loaded(config, None);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for I/O; a failure would be a malformed metric family,
        // which the registry already rejects at registration.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(event = "metrics_error", error = %e, "encoding metrics failed");
        }
        out
    }
}
