//! Terminate mode's place in the pumps: client input through [`ClientFilter`] (view-only and
//! the clipboard toward the backend), and, only where the clipboard policy stops ServerCutText,
//! the server stream through [`ServerFilter`]. Each side reuses one output buffer, so a
//! filtered message costs no allocation once the session runs.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::sync::watch;

use super::{CloseCode, EndReason};
use crate::config::RecordInput;
use crate::metrics::Metrics;
use crate::recording::recorder::RecordingHandle;
use crate::rfb::PixelFormat;
use crate::rfb::client_msg::{
    AuditInput, ClientError, ClientFilter, ClientReport, InputSeen, Kept,
};
use crate::rfb::policy::{Clipboard, InputKind, Policy};
use crate::rfb::server_msg::ServerFilter;

/// The pixel format the client asked for, handed from the input side to the server-stream side
/// (two futures of one task: never contended).
type PixelFormatSlot = Arc<Mutex<Option<PixelFormat>>>;

/// Both filters of one terminate-mode session, before the pumps take their halves.
pub struct RfbFilters {
    pub(super) inbound: Inbound,
    pub(super) outbound: Option<Outbound>,
    /// Gets every server byte the client is sent, after the filter (see [`crate::recording`]).
    pub(super) recording: Option<RecordingHandle>,
}

impl RfbFilters {
    pub fn new(
        clipboard: Clipboard,
        view_only: watch::Receiver<bool>,
        pixel_format: PixelFormat,
        max_message_bytes: usize,
        leftover: Bytes,
        metrics: &Metrics,
        recording: Option<RecordingHandle>,
    ) -> RfbFilters {
        let slot: PixelFormatSlot = Arc::new(Mutex::new(None));
        let policy = Policy {
            view_only: false,
            clipboard,
        };
        let outbound = policy.delimits_server_stream().then(|| Outbound {
            filter: ServerFilter::new(pixel_format),
            clipboard,
            slot: Arc::clone(&slot),
            out: BytesMut::new(),
            blocked: metrics
                .clipboard_blocked_total
                .with_label_values(&["backend_to_client"]),
        });
        let dropped =
            InputKind::ALL.map(|k| metrics.input_dropped_total.with_label_values(&[k.as_str()]));
        let audit = match recording.as_ref().map(|r| r.input()) {
            Some(RecordInput::Pointer) => AuditInput::Pointer,
            Some(RecordInput::Keys) => AuditInput::Keys,
            Some(RecordInput::None) | None => AuditInput::None,
        };
        let view_only_now = *view_only.borrow();
        RfbFilters {
            inbound: Inbound {
                filter: match recording {
                    Some(_) => ClientFilter::new(max_message_bytes)
                        .with_audit(audit)
                        .for_recording(),
                    None => ClientFilter::new(max_message_bytes),
                },
                recording: recording.clone(),
                audited_view_only: view_only_now,
                clipboard,
                view_only,
                slot: outbound.is_some().then_some(slot),
                leftover: Some(leftover).filter(|b| !b.is_empty()),
                out: BytesMut::new(),
                dropped,
                blocked: metrics
                    .clipboard_blocked_total
                    .with_label_values(&["client_to_backend"]),
            },
            outbound,
            recording,
        }
    }
}

pub(super) struct Inbound {
    filter: ClientFilter,
    clipboard: Clipboard,
    view_only: watch::Receiver<bool>,
    /// Set only when the server stream is delimited (it needs the pixel format).
    slot: Option<PixelFormatSlot>,
    /// What the browser sent right after its ClientInit: input before the first message.
    leftover: Option<Bytes>,
    /// The session's recording: its audit gets the input the filter reports, and input-mode
    /// switches (noticed here, where every client message passes).
    recording: Option<RecordingHandle>,
    audited_view_only: bool,
    out: BytesMut,
    dropped: [IntCounter; 5],
    blocked: IntCounter,
}

impl Inbound {
    pub(super) fn take_leftover(&mut self) -> Option<Bytes> {
        self.leftover.take()
    }

    /// The bytes of `data` the backend may see (possibly none).
    pub(super) fn apply(&mut self, data: Bytes) -> Result<Bytes, EndReason> {
        let policy = Policy {
            view_only: *self.view_only.borrow(),
            clipboard: self.clipboard,
        };
        if let Some(rec) = &self.recording
            && policy.view_only != self.audited_view_only
        {
            self.audited_view_only = policy.view_only;
            rec.event(serde_json::json!({
                "event": "input_mode_changed",
                "input_mode": if policy.view_only { "view_only" } else { "interactive" },
            }));
        }
        let (kept, report) = self
            .filter
            .filter(&data, &policy, &mut self.out)
            .map_err(|e| {
                tracing::info!(event = "rfb_message_refused", error = %e, "client RFB message refused");
                EndReason::Gateway(match e {
                    ClientError::TooBig(_) => CloseCode::TooBig,
                    _ => CloseCode::PolicyViolation,
                })
            })?;
        self.account(&report);
        if let Some(rec) = &self.recording {
            for seen in &report.seen {
                rec.event(audit_line(seen));
            }
        }
        Ok(match kept {
            Kept::All => data,
            Kept::Some => self.out.split().freeze(),
        })
    }

    fn account(&self, report: &ClientReport) {
        for kind in InputKind::ALL {
            let n = report.dropped(kind);
            if n > 0 {
                self.dropped[kind as usize].inc_by(u64::from(n));
            }
        }
        if report.clipboard_blocked > 0 {
            self.blocked.inc_by(u64::from(report.clipboard_blocked));
        }
        if let (Some(pf), Some(slot)) = (report.pixel_format, &self.slot) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(pf);
        }
        // Queued before the message reaches the backend, so before any update in that format.
        if let (Some(pf), Some(rec)) = (report.pixel_format, &self.recording) {
            rec.client_pixel_format(pf);
        }
    }
}

/// One input of the audit file (`recording.input`): never clipboard text, only its size.
fn audit_line(seen: &InputSeen) -> serde_json::Value {
    match seen {
        InputSeen::Buttons { mask, x, y } => {
            serde_json::json!({ "event": "pointer", "buttons": mask, "x": x, "y": y })
        }
        InputSeen::Key { down, keysym } => {
            serde_json::json!({ "event": "key", "down": down, "keysym": keysym })
        }
        InputSeen::Clipboard { bytes } => {
            serde_json::json!({ "event": "clipboard_to_server", "bytes": bytes })
        }
    }
}

pub(super) struct Outbound {
    filter: ServerFilter,
    clipboard: Clipboard,
    slot: PixelFormatSlot,
    out: BytesMut,
    blocked: IntCounter,
}

impl Outbound {
    /// The bytes of a backend chunk the client may see (possibly none).
    pub(super) fn apply(&mut self, data: Bytes) -> Result<Bytes, EndReason> {
        // A SetPixelFormat already passed to the server applies to the updates it sends from
        // then on; noVNC sends it before its first update request, so no update is in flight.
        if let Some(pf) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.filter.set_pixel_format(pf);
        }
        let policy = Policy {
            view_only: false,
            clipboard: self.clipboard,
        };
        let (kept, report) = self
            .filter
            .filter(&data, &policy, &mut self.out)
            .map_err(|e| {
                tracing::warn!(event = "rfb_server_stream_error", error = %e, "backend RFB stream could not be delimited");
                EndReason::Gateway(CloseCode::Internal)
            })?;
        if report.clipboard_blocked > 0 {
            self.blocked.inc_by(u64::from(report.clipboard_blocked));
        }
        Ok(match kept {
            Kept::All => data,
            Kept::Some => self.out.split().freeze(),
        })
    }
}
