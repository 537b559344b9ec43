//! Client -> server RFB messages: a streaming framer and filter.
//!
//! Input arrives split anywhere (WebSocket frames, TCP reads). Only what a verdict needs is
//! held between calls: a message's header, or a whole SetEncodings (it may be rewritten). The
//! verdict is taken once the header is complete and then sticks, even if the policy changes
//! before the body has gone by; a body (cut text) streams through or is skipped by count,
//! never buffered, so memory stays bounded by [`MAX_HELD`] whatever length a client claims.
//!
//! The common call passes everything unchanged: it returns [`Kept::All`] without copying, and
//! the caller forwards its own input buffer. Only a call that drops, rewrites, holds or
//! releases held bytes builds its output in `out`.

use bytes::BytesMut;

use super::PixelFormat;
use super::policy::{Clipboard, InputKind, Policy, is_delimitable_encoding};
use super::server_msg::encoding::EXTENDED_CLIPBOARD;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("unknown client message type {0}")]
    UnknownType(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("client cut text of {0} bytes is above the limit")]
    TooBig(usize),
}

/// What one `filter` call passed on.
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    /// Every input byte passes unchanged; `out` was not touched (the caller forwards the input).
    All,
    /// Some bytes were dropped or rewritten; the bytes to forward were appended to `out`.
    Some,
}

/// What one `filter` call saw, for metrics and for the server-side filter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientReport {
    /// Messages dropped by the view-only policy, indexed like `InputKind::ALL`.
    pub dropped: [u32; 5],
    /// ClientCutText messages (plain or extended) dropped by the clipboard policy.
    pub clipboard_blocked: u32,
    /// The last SetPixelFormat passed on in this call.
    pub pixel_format: Option<PixelFormat>,
    /// Input passed on in this call that a recording's audit keeps (see [`AuditInput`]);
    /// empty unless the filter was built with an audit level.
    pub seen: Vec<InputSeen>,
}

/// What a recording's audit keeps of the client's input (`recording.input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditInput {
    #[default]
    None,
    /// Pointer button changes with their coordinates.
    Pointer,
    /// Pointer button changes and key presses.
    Keys,
}

/// One piece of input that reached the backend, as the audit records it. Clipboard contents
/// are never kept: only their size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSeen {
    /// The button mask changed (a press or a release) at `x`, `y`.
    Buttons {
        mask: u8,
        x: u16,
        y: u16,
    },
    Key {
        down: bool,
        keysym: u32,
    },
    Clipboard {
        bytes: u32,
    },
}

/// The audit's state across messages: pointer motion is not kept, only button changes, so
/// the last mask is remembered.
#[derive(Debug, Default)]
struct Audit {
    level: AuditInput,
    buttons: u8,
}

impl Audit {
    fn observe(&mut self, kind: &Kind, header: &[u8], report: &mut ClientReport) {
        if self.level == AuditInput::None {
            return;
        }
        let u16_at = |i: usize| {
            header
                .get(i..i + 2)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_be_bytes)
        };
        let u32_at = |i: usize| {
            header
                .get(i..i + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
        };
        match (kind, header.first()) {
            (Kind::Input(InputKind::Pointer), Some(&POINTER_EVENT)) => {
                let mask = header.get(1).copied().unwrap_or(0) & !EXTENDED_BUTTONS_BIT;
                if mask != self.buttons
                    && let (Some(x), Some(y)) = (u16_at(2), u16_at(4))
                {
                    self.buttons = mask;
                    report.seen.push(InputSeen::Buttons { mask, x, y });
                }
            }
            (Kind::Input(InputKind::Key), Some(&KEY_EVENT)) if self.level == AuditInput::Keys => {
                if let Some(keysym) = u32_at(4) {
                    let down = header.get(1).is_some_and(|d| *d != 0);
                    report.seen.push(InputSeen::Key { down, keysym });
                }
            }
            // QEMU extended key event (what noVNC sends when the server offers it, as TigerVNC
            // does): type, subtype 0, a u16 down flag, the keysym, the keycode.
            (Kind::Input(InputKind::Key), Some(&QEMU)) if self.level == AuditInput::Keys => {
                if let (Some(down), Some(keysym)) = (u16_at(2), u32_at(4)) {
                    report.seen.push(InputSeen::Key {
                        down: down != 0,
                        keysym,
                    });
                }
            }
            (Kind::CutText, _) => {
                // Plain: the length; extended (negative): its absolute value, flags included.
                if let Some(len) = u32_at(4) {
                    let bytes = (len as i32).unsigned_abs();
                    report.seen.push(InputSeen::Clipboard { bytes });
                }
            }
            _ => {}
        }
    }
}

impl ClientReport {
    pub fn dropped(&self, kind: InputKind) -> u32 {
        self.dropped[kind as usize]
    }

    fn count_dropped(&mut self, kind: InputKind) {
        if let Some(n) = self.dropped.get_mut(kind as usize) {
            *n += 1;
        }
    }
}

/// A SetEncodings is held whole so it can be rewritten; a client asking for more encodings
/// than this is not a real client (noVNC asks for about thirty).
pub const MAX_ENCODINGS: usize = 1024;

/// The most bytes a [`ClientFilter`] holds between calls: a whole SetEncodings, the largest
/// thing it ever holds (SetDesktopSize with 255 screens is 4088, a Fence 73).
pub const MAX_HELD: usize = 4 + 4 * MAX_ENCODINGS;

const SET_PIXEL_FORMAT: u8 = 0;
const SET_ENCODINGS: u8 = 2;
const FRAMEBUFFER_UPDATE_REQUEST: u8 = 3;
const KEY_EVENT: u8 = 4;
const POINTER_EVENT: u8 = 5;
const CLIENT_CUT_TEXT: u8 = 6;
const ENABLE_CONTINUOUS_UPDATES: u8 = 150;
const FENCE: u8 = 248;
const XVP: u8 = 250;
const SET_DESKTOP_SIZE: u8 = 251;
const QEMU: u8 = 255;

/// ExtendedMouseButtons: a PointerEvent with this bit in its mask carries one more mask byte.
const EXTENDED_BUTTONS_BIT: u8 = 0x80;
/// The Fence extension caps its payload at 64 bytes.
const MAX_FENCE_PAYLOAD: usize = 64;
/// An extended ClientCutText carries at least its 4 flag bytes.
const EXTENDED_CUT_TEXT_MIN: u64 = 4;

pub struct ClientFilter {
    max_cut_text: usize,
    /// The bytes so far of a header that did not fit in one call (empty between messages).
    head: Vec<u8>,
    audit: Audit,
    /// The session is recorded: its SetEncodings keeps only the encodings the recording's
    /// exporter decodes (see [`ClientFilter::for_recording`]).
    recorded: bool,
    /// The body still to go by of the current message, once its header was judged.
    body: Option<Body>,
}

#[derive(Debug, Clone, Copy)]
struct Body {
    left: u64,
    pass: bool,
}

impl ClientFilter {
    /// `max_cut_text`: the largest ClientCutText payload accepted (plain or extended).
    pub fn new(max_cut_text: usize) -> Self {
        ClientFilter {
            max_cut_text,
            head: Vec::new(),
            body: None,
            audit: Audit::default(),
            recorded: false,
        }
    }

    /// The session is recorded: its SetEncodings keeps only the encodings
    /// `vncgate recording export` decodes, the ones the server filter delimits (Raw, CopyRect,
    /// RRE, Hextile, Zlib, ZRLE and the pseudo-encodings). Tight's JPEG and H.264 are left out:
    /// decoding them would take a JPEG and an H.264 decoder for a still image, and the server
    /// picks ZRLE instead, lossless and as compact for desktop content.
    pub fn for_recording(mut self) -> Self {
        self.recorded = true;
        self
    }

    /// Report the input a recording's audit keeps (in [`ClientReport::seen`]).
    pub fn with_audit(mut self, level: AuditInput) -> Self {
        self.audit.level = level;
        self
    }

    /// Parse `input` (split anywhere) and pass on what `policy` allows.
    ///
    /// On an error the session must end: `out` may hold part of this call's output and the
    /// filter's state is not meant to be resumed.
    pub fn filter(
        &mut self,
        input: &[u8],
        policy: &Policy,
        out: &mut BytesMut,
    ) -> Result<(Kept, ClientReport), ClientError> {
        let mut report = ClientReport::default();
        let mut em = Emitter::new(input, out);
        let mut pos = 0;
        while let Some(rest) = input.get(pos..).filter(|rest| !rest.is_empty()) {
            let used = if let Some(body) = self.body {
                self.stream_body(body, rest.len(), pos, &mut em)
            } else if self.head.is_empty() {
                self.frame_in_place(rest, pos, policy, &mut em, &mut report)?
            } else {
                self.frame_held(rest, pos, policy, &mut em, &mut report)?
            };
            pos += used;
        }
        Ok((em.finish(), report))
    }

    /// Bytes held between calls (an unfinished message header); bounded by [`MAX_HELD`].
    pub fn held(&self) -> usize {
        self.head.len()
    }

    fn stream_body(&mut self, body: Body, avail: usize, pos: usize, em: &mut Emitter) -> usize {
        let n = clamp_to(body.left, avail);
        if !body.pass {
            em.withhold(pos, pos + n);
        }
        let left = body.left - n as u64;
        self.body = (left > 0).then_some(Body { left, ..body });
        n
    }

    /// The usual case: a message starts in this call's input and is judged there, no copy.
    fn frame_in_place(
        &mut self,
        rest: &[u8],
        pos: usize,
        policy: &Policy,
        em: &mut Emitter,
        report: &mut ClientReport,
    ) -> Result<usize, ClientError> {
        match parse_header(rest, self.max_cut_text)? {
            Parse::Need(_) => {
                // Shorter than the header it needs, hence shorter than MAX_HELD.
                self.head.extend_from_slice(rest);
                em.withhold(pos, pos + rest.len());
                Ok(rest.len())
            }
            Parse::Frame(frame) => {
                let end = pos + frame.head_len;
                let header = rest.get(..frame.head_len).unwrap_or_default();
                let verdict = judge(&frame.kind, header, policy, self.recorded, report);
                if matches!(verdict, Verdict::Pass) {
                    self.audit.observe(&frame.kind, header, report);
                }
                self.start_body(&frame, &verdict);
                match verdict {
                    Verdict::Pass => {}
                    Verdict::Drop => em.withhold(pos, end),
                    Verdict::Rewrite(bytes) => {
                        em.withhold(pos, end);
                        em.insert(end, &bytes);
                    }
                }
                Ok(frame.head_len)
            }
        }
    }

    /// A header started in an earlier call: take just the bytes it still needs.
    fn frame_held(
        &mut self,
        rest: &[u8],
        pos: usize,
        policy: &Policy,
        em: &mut Emitter,
        report: &mut ClientReport,
    ) -> Result<usize, ClientError> {
        let need = match parse_header(&self.head, self.max_cut_text)? {
            Parse::Need(need) => need,
            // Unreachable: a complete header is judged as soon as it is complete.
            Parse::Frame(_) => return Err(ClientError::Malformed("held header")),
        };
        let take = need.saturating_sub(self.head.len()).min(rest.len());
        self.head
            .extend_from_slice(rest.get(..take).unwrap_or_default());
        em.withhold(pos, pos + take);
        if let Parse::Frame(frame) = parse_header(&self.head, self.max_cut_text)? {
            let at = pos + take;
            let verdict = judge(&frame.kind, &self.head, policy, self.recorded, report);
            if matches!(verdict, Verdict::Pass) {
                self.audit.observe(&frame.kind, &self.head, report);
            }
            self.start_body(&frame, &verdict);
            match verdict {
                Verdict::Pass => em.insert(at, &self.head),
                Verdict::Drop => {}
                Verdict::Rewrite(bytes) => em.insert(at, &bytes),
            }
            self.head.clear();
        }
        Ok(take)
    }

    fn start_body(&mut self, frame: &Frame, verdict: &Verdict) {
        self.body = (frame.body > 0).then_some(Body {
            left: frame.body,
            pass: !matches!(verdict, Verdict::Drop),
        });
    }
}

/// A message whose header is complete.
#[derive(Debug)]
struct Frame {
    kind: Kind,
    /// Length of the header, type byte included: the whole message unless `body` > 0.
    head_len: usize,
    /// Bytes after the header (cut text), streamed by count.
    body: u64,
}

/// What the policy looks at.
#[derive(Debug)]
enum Kind {
    PixelFormat(PixelFormat),
    Encodings,
    /// Input that view-only drops.
    Input(InputKind),
    CutText,
    /// Always passes (FramebufferUpdateRequest, EnableContinuousUpdates, Fence).
    Plain,
}

#[derive(Debug)]
enum Parse {
    /// The header needs at least this many bytes in all.
    Need(usize),
    Frame(Frame),
}

/// Frame the message at the start of `buf` (which may hold more after it).
fn parse_header(buf: &[u8], max_cut_text: usize) -> Result<Parse, ClientError> {
    let Some(&kind) = buf.first() else {
        return Ok(Parse::Need(1));
    };
    match kind {
        SET_PIXEL_FORMAT => Ok(set_pixel_format(buf)),
        SET_ENCODINGS => set_encodings(buf),
        FRAMEBUFFER_UPDATE_REQUEST | ENABLE_CONTINUOUS_UPDATES => Ok(fixed(buf, 10, Kind::Plain)),
        KEY_EVENT => Ok(fixed(buf, 8, Kind::Input(InputKind::Key))),
        POINTER_EVENT => Ok(pointer_event(buf)),
        CLIENT_CUT_TEXT => cut_text(buf, max_cut_text),
        FENCE => fence(buf),
        XVP => Ok(fixed(buf, 4, Kind::Input(InputKind::Other))),
        SET_DESKTOP_SIZE => Ok(set_desktop_size(buf)),
        QEMU => qemu(buf),
        other => Err(ClientError::UnknownType(other)),
    }
}

/// A message of `len` bytes with nothing streamed after it.
fn fixed(buf: &[u8], len: usize, kind: Kind) -> Parse {
    if buf.len() < len {
        Parse::Need(len)
    } else {
        Parse::Frame(Frame {
            kind,
            head_len: len,
            body: 0,
        })
    }
}

fn set_pixel_format(buf: &[u8]) -> Parse {
    match buf.get(4..20).and_then(|pf| <[u8; 16]>::try_from(pf).ok()) {
        Some(pf) => fixed(buf, 20, Kind::PixelFormat(PixelFormat(pf))),
        None => Parse::Need(20),
    }
}

fn set_encodings(buf: &[u8]) -> Result<Parse, ClientError> {
    let Some(count) = be_u16(buf, 2) else {
        return Ok(Parse::Need(4));
    };
    let count = usize::from(count);
    if count > MAX_ENCODINGS {
        return Err(ClientError::Malformed("SetEncodings"));
    }
    Ok(fixed(buf, 4 + 4 * count, Kind::Encodings))
}

fn pointer_event(buf: &[u8]) -> Parse {
    match buf.get(1) {
        Some(mask) if mask & EXTENDED_BUTTONS_BIT != 0 => {
            fixed(buf, 7, Kind::Input(InputKind::Pointer))
        }
        Some(_) => fixed(buf, 6, Kind::Input(InputKind::Pointer)),
        None => Parse::Need(2),
    }
}

fn cut_text(buf: &[u8], max_cut_text: usize) -> Result<Parse, ClientError> {
    let Some(length) = be_i32(buf, 4) else {
        return Ok(Parse::Need(8));
    };
    // A negative length is the extended clipboard: |length| bytes of flags and zlib data.
    let body = u64::from(length.unsigned_abs());
    if length < 0 && body < EXTENDED_CUT_TEXT_MIN {
        return Err(ClientError::Malformed("extended ClientCutText"));
    }
    if body > max_cut_text as u64 {
        return Err(ClientError::TooBig(
            usize::try_from(body).unwrap_or(usize::MAX),
        ));
    }
    Ok(Parse::Frame(Frame {
        kind: Kind::CutText,
        head_len: 8,
        body,
    }))
}

fn fence(buf: &[u8]) -> Result<Parse, ClientError> {
    let Some(&payload) = buf.get(8) else {
        return Ok(Parse::Need(9));
    };
    let payload = usize::from(payload);
    if payload > MAX_FENCE_PAYLOAD {
        return Err(ClientError::Malformed("Fence"));
    }
    Ok(fixed(buf, 9 + payload, Kind::Plain))
}

fn set_desktop_size(buf: &[u8]) -> Parse {
    match buf.get(6) {
        Some(&screens) => fixed(
            buf,
            8 + 16 * usize::from(screens),
            Kind::Input(InputKind::DesktopSize),
        ),
        None => Parse::Need(8),
    }
}

/// Of the QEMU client messages only the extended key event (subtype 0) is framed: noVNC sends
/// no other, and the others' lengths (audio) are not worth trusting blindly.
fn qemu(buf: &[u8]) -> Result<Parse, ClientError> {
    match buf.get(1) {
        Some(0) => Ok(fixed(buf, 12, Kind::Input(InputKind::Key))),
        Some(_) => Err(ClientError::Malformed("QEMU")),
        None => Ok(Parse::Need(2)),
    }
}

fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    let bytes = buf.get(at..at + 4)?;
    Some(i32::from_be_bytes(bytes.try_into().ok()?))
}

#[derive(Debug)]
enum Verdict {
    Pass,
    Drop,
    /// Forward these bytes instead of the header.
    Rewrite(Vec<u8>),
}

/// The policy's decision for a message whose header is complete, counted in `report`.
fn judge(
    kind: &Kind,
    header: &[u8],
    policy: &Policy,
    recorded: bool,
    report: &mut ClientReport,
) -> Verdict {
    match kind {
        Kind::Plain => Verdict::Pass,
        Kind::PixelFormat(pf) => {
            report.pixel_format = Some(*pf);
            Verdict::Pass
        }
        Kind::Input(input) if policy.view_only => {
            report.count_dropped(*input);
            Verdict::Drop
        }
        Kind::Input(_) => Verdict::Pass,
        // View-only wins over the clipboard rule so that one message is counted once, under
        // the reason an operator can change live (the admin's view-only switch).
        Kind::CutText if policy.view_only => {
            report.count_dropped(InputKind::Clipboard);
            Verdict::Drop
        }
        Kind::CutText if !policy.clipboard.to_server() => {
            report.clipboard_blocked += 1;
            Verdict::Drop
        }
        Kind::CutText => Verdict::Pass,
        Kind::Encodings => match rewrite_encodings(header, policy, recorded) {
            Some(bytes) => Verdict::Rewrite(bytes),
            None => Verdict::Pass,
        },
    }
}

/// The SetEncodings to send instead of `msg`, or `None` when `msg` passes unchanged.
///
/// Without ExtendedClipboard the server falls back to plain cut text, which the filters see
/// and judge in both directions; the server stream, when delimited or recorded, must only use
/// encodings the server filter can delimit (and the recording's exporter decode).
fn rewrite_encodings(msg: &[u8], policy: &Policy, recorded: bool) -> Option<Vec<u8>> {
    let strip_clipboard = policy.clipboard != Clipboard::Both;
    let only_delimitable = policy.delimits_server_stream() || recorded;
    if !strip_clipboard && !only_delimitable {
        return None;
    }
    let keep = |enc: i32| {
        !(strip_clipboard && enc == EXTENDED_CLIPBOARD)
            && (!only_delimitable || is_delimitable_encoding(enc))
    };
    let (header, list) = (msg.get(..2)?, msg.get(4..)?);
    let encodings = || {
        list.chunks_exact(4)
            .filter_map(|e| e.try_into().ok().map(i32::from_be_bytes))
    };
    if encodings().all(keep) {
        return None;
    }
    let kept: Vec<i32> = encodings().filter(|&enc| keep(enc)).collect();
    // At most MAX_ENCODINGS, so the count fits.
    let count = u16::try_from(kept.len()).ok()?;
    let mut out = Vec::with_capacity(4 + 4 * kept.len());
    out.extend_from_slice(header);
    out.extend_from_slice(&count.to_be_bytes());
    for enc in kept {
        out.extend_from_slice(&enc.to_be_bytes());
    }
    Some(out)
}

/// `left` bytes still to go, capped at the `avail` bytes at hand.
pub(super) fn clamp_to(left: u64, avail: usize) -> usize {
    usize::try_from(left).map_or(avail, |left| left.min(avail))
}

/// Builds one call's output lazily. While every byte passes nothing is copied and the caller
/// forwards its input; the first change copies the unchanged bytes before it, once, and from
/// then on the output is built in `out`. Shared with the server filter.
pub(super) struct Emitter<'a> {
    input: &'a [u8],
    out: &'a mut BytesMut,
    changed: bool,
    /// Start of the input bytes that pass unchanged and are not yet in `out`.
    pending: usize,
}

impl<'a> Emitter<'a> {
    pub(super) fn new(input: &'a [u8], out: &'a mut BytesMut) -> Self {
        Emitter {
            input,
            out,
            changed: false,
            pending: 0,
        }
    }

    /// Input bytes `from..to` are not forwarded now (dropped, or held for a later call).
    pub(super) fn withhold(&mut self, from: usize, to: usize) {
        if from < to {
            self.copy_pending(from);
            self.pending = to;
        }
    }

    /// `bytes` are forwarded where input position `at` is (a rewrite, or bytes held earlier).
    pub(super) fn insert(&mut self, at: usize, bytes: &[u8]) {
        self.copy_pending(at);
        self.out.extend_from_slice(bytes);
        self.pending = at;
    }

    pub(super) fn finish(mut self) -> Kept {
        if self.changed {
            self.copy_pending(self.input.len());
            Kept::Some
        } else {
            Kept::All
        }
    }

    fn copy_pending(&mut self, to: usize) {
        if !self.changed {
            self.changed = true;
            self.out.reserve(self.input.len());
        }
        if let Some(bytes) = self.input.get(self.pending..to) {
            self.out.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
#[path = "client_msg_tests.rs"]
mod tests;
