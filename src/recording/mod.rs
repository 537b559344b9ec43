//! Session recording (contract §12): what a connection's browser saw, replayable, plus an audit
//! of what happened in it.
//!
//! - [`fbs`]: the FBS 001.000 file format: writer helpers and the validating reader behind
//!   `vncgate recording verify`.
//! - [`recorder`]: one recording per connection. The relay hands it bytes and events through a
//!   [`recorder::RecordingHandle`] whose calls never wait on the disk; a task per recording
//!   writes `{dir}/{YYYY-MM-DD}/{sid}/{unix-ms}-{conn_id}.fbs` and the `.jsonl` audit beside it,
//!   dropping (and counting) what the disk cannot take in time.
//! - [`retention`]: the sweep that removes day directories older than `retention_days`.
//! - [`verify`]: the report of `vncgate recording verify FILE`.
//! - [`decode`]: the server stream decoded into pixels, and [`export`]: the framebuffer at a
//!   moment as a PNG (`vncgate recording export`); [`audit_format`]: the pixel format lines
//!   they share with the recorder.

pub mod audit_format;
pub mod decode;
pub mod export;
pub mod fbs;
pub mod recorder;
pub mod retention;
pub mod verify;

pub use recorder::{FileSink, Recorder, RecordingHandle, Sink, SinkFile};

use prometheus::{IntCounter, IntGauge, Registry};

/// The contract's three recording series (§8), registered with the process's registry.
#[derive(Clone)]
pub struct RecordingMetrics {
    /// Recordings open (their files being written).
    pub active: IntGauge,
    /// Bytes written to `.fbs` files (framing included).
    pub bytes_total: IntCounter,
    /// Server->client bytes not written to a recording because its writer could not keep up.
    pub dropped_total: IntCounter,
}

impl RecordingMetrics {
    /// Unregistered series, for tests and tools that have no registry.
    pub fn new() -> Result<RecordingMetrics, prometheus::Error> {
        Ok(RecordingMetrics {
            active: IntGauge::new(
                "vncgate_recordings_active",
                "Session recordings open (being written).",
            )?,
            bytes_total: IntCounter::new(
                "vncgate_recording_bytes_total",
                "Bytes written to session recording (.fbs) files.",
            )?,
            dropped_total: IntCounter::new(
                "vncgate_recording_dropped_total",
                "Server-to-client bytes left out of recordings because the writer could not keep \
                 up: the bytes that overflowed the queue and the rest of that recording's stream \
                 after them (an FBS stream cannot skip data and stay decodable).",
            )?,
        })
    }

    pub fn register(registry: &Registry) -> Result<RecordingMetrics, prometheus::Error> {
        let m = RecordingMetrics::new()?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.bytes_total.clone()))?;
        registry.register(Box::new(m.dropped_total.clone()))?;
        Ok(m)
    }
}
