//! Server -> client RFB messages delimited by encoding, to find and drop ServerCutText when the
//! clipboard policy forbids it (used only when [`Policy::delimits_server_stream`]).
//!
//! The stream is walked as a sequence of small fixed-size headers (at most [`MAX_HELD`] bytes,
//! kept for parsing only) and runs of opaque data passed by count: pixels, compressed data and
//! subrectangles are never buffered or looked at. Only ServerCutText is dropped, and its
//! verdict is known from the type byte, so every byte of any other message is forwarded as it
//! arrives, header bytes included: a call that contains no ServerCutText returns [`Kept::All`]
//! and copies nothing, however its reads split the headers.

use bytes::BytesMut;

use super::PixelFormat;
use super::client_msg::{Emitter, Kept, clamp_to};
use super::policy::Policy;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServerError {
    #[error("unknown server message type {0}")]
    UnknownType(u8),
    #[error("encoding {0} cannot be delimited")]
    UnknownEncoding(i32),
    #[error("malformed {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServerReport {
    /// ServerCutText messages (plain or extended) dropped by the clipboard policy.
    pub clipboard_blocked: u32,
}

/// RFB encoding numbers (s32), the ones the gateway names.
pub mod encoding {
    pub const RAW: i32 = 0;
    pub const COPY_RECT: i32 = 1;
    pub const RRE: i32 = 2;
    pub const HEXTILE: i32 = 5;
    pub const ZLIB: i32 = 6;
    pub const ZRLE: i32 = 16;
    pub const QUALITY_LEVEL_0: i32 = -32;
    pub const QUALITY_LEVEL_9: i32 = -23;
    pub const DESKTOP_SIZE: i32 = -223;
    pub const LAST_RECT: i32 = -224;
    pub const CURSOR: i32 = -239;
    pub const COMPRESS_LEVEL_0: i32 = -256;
    pub const COMPRESS_LEVEL_9: i32 = -247;
    pub const QEMU_EXTENDED_KEY_EVENT: i32 = -258;
    pub const QEMU_LED_STATE: i32 = -261;
    pub const DESKTOP_NAME: i32 = -307;
    pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
    pub const XVP: i32 = -309;
    pub const FENCE: i32 = -312;
    pub const CONTINUOUS_UPDATES: i32 = -313;
    pub const EXTENDED_MOUSE_BUTTONS: i32 = -316;
    /// 0xC0A1E5CE as an s32.
    pub const EXTENDED_CLIPBOARD: i32 = 0xC0A1_E5CE_u32 as i32;
}

/// Whether a rectangle of encoding `enc` can be delimited.
pub fn delimits_rect(enc: i32) -> bool {
    RectRule::of(enc).is_some()
}

/// The largest header held between calls: a rectangle header.
pub const MAX_HELD: usize = 12;

/// Server message types.
pub mod message {
    pub const FRAMEBUFFER_UPDATE: u8 = 0;
    pub const SET_COLOUR_MAP_ENTRIES: u8 = 1;
    pub const BELL: u8 = 2;
    pub const SERVER_CUT_TEXT: u8 = 3;
    pub const END_OF_CONTINUOUS_UPDATES: u8 = 150;
    pub const FENCE: u8 = 248;
    pub const XVP: u8 = 250;
}
use message::{
    BELL, END_OF_CONTINUOUS_UPDATES, FENCE, FRAMEBUFFER_UPDATE, SERVER_CUT_TEXT,
    SET_COLOUR_MAP_ENTRIES, XVP,
};

/// Hextile subencoding bits (RFC 6143 §7.7.4).
const HEXTILE_RAW: u8 = 1;
const HEXTILE_BACKGROUND: u8 = 2;
const HEXTILE_FOREGROUND: u8 = 4;
const HEXTILE_ANY_SUBRECTS: u8 = 8;
const HEXTILE_SUBRECTS_COLOURED: u8 = 16;
const HEXTILE_UNKNOWN_BITS: u8 = !0x1f;
const HEXTILE_TILE: u32 = 16;

/// An extended ServerCutText carries at least its 4 flag bytes.
const EXTENDED_CUT_TEXT_MIN: u64 = 4;

/// How a rectangle's data is laid out after its 12-byte header.
#[derive(Debug, Clone, Copy)]
enum RectRule {
    /// `w*h` pixels.
    Raw,
    /// Source x, y.
    CopyRect,
    /// u32 subrect count, background pixel, subrects of pixel + 8 bytes.
    Rre,
    Hextile,
    /// u32 length, then that many bytes (Zlib, ZRLE, DesktopName).
    Length,
    /// Nothing after the header.
    Empty,
    /// Nothing, and the update ends here.
    LastRect,
    /// `w*h` pixels and a bitmask of `ceil(w/8)*h` bytes.
    Cursor,
    /// One byte of LED state.
    Led,
    /// u8 screen count, 3 padding, 16 bytes per screen.
    ExtendedDesktopSize,
}

impl RectRule {
    fn of(enc: i32) -> Option<RectRule> {
        use encoding as e;
        Some(match enc {
            e::RAW => RectRule::Raw,
            e::COPY_RECT => RectRule::CopyRect,
            e::RRE => RectRule::Rre,
            e::HEXTILE => RectRule::Hextile,
            e::ZLIB | e::ZRLE | e::DESKTOP_NAME => RectRule::Length,
            e::DESKTOP_SIZE | e::QEMU_EXTENDED_KEY_EVENT | e::EXTENDED_MOUSE_BUTTONS => {
                RectRule::Empty
            }
            e::LAST_RECT => RectRule::LastRect,
            e::CURSOR => RectRule::Cursor,
            e::QEMU_LED_STATE => RectRule::Led,
            e::EXTENDED_DESKTOP_SIZE => RectRule::ExtendedDesktopSize,
            _ => return None,
        })
    }
}

/// What the next bytes of the stream are.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A message type byte.
    Type,
    /// A fixed-size header, parsed once complete.
    Head(Head),
    /// Opaque bytes passed (or skipped) by count, then `then`.
    Run { left: u64, then: Then },
}

#[derive(Debug, Clone, Copy)]
enum Head {
    /// FramebufferUpdate: padding, u16 rectangle count.
    Update,
    /// x, y, w, h (u16 each), s32 encoding.
    Rect,
    /// RRE: u32 subrect count (the pixels after it are a run).
    RreCount,
    /// u32 length of the data that follows.
    Length,
    /// ExtendedDesktopSize: u8 screens, 3 padding.
    Screens,
    /// A Hextile tile's subencoding byte.
    Tile,
    /// A Hextile tile's u8 subrect count.
    Subrects { coloured: bool },
    /// SetColourMapEntries: padding, u16 first colour, u16 colour count.
    ColourMap,
    /// ServerCutText: 3 padding, s32 length.
    CutText,
    /// Fence: 3 padding, u32 flags, u8 payload length.
    Fence,
}

impl Head {
    fn len(self) -> usize {
        match self {
            Head::Update => 3,
            Head::Rect => 12,
            Head::RreCount | Head::Length | Head::Screens => 4,
            Head::Tile | Head::Subrects { .. } => 1,
            Head::ColourMap => 5,
            Head::CutText => 7,
            Head::Fence => 8,
        }
    }
}

/// What follows a run.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// The current rectangle, tile or message is complete.
    Done,
    /// A Hextile tile's colours went by; its subrect count is next.
    Subrects { coloured: bool },
}

/// The tiles of the Hextile rectangle in progress: 16x16, left to right, top to bottom, the
/// last column and row narrower when the size is not a multiple of 16.
#[derive(Debug, Clone, Copy, Default)]
struct Tiles {
    w: u32,
    h: u32,
    /// Offset of the next tile in the rectangle.
    x: u32,
    y: u32,
}

impl Tiles {
    fn new(w: u16, h: u16) -> Tiles {
        Tiles {
            w: u32::from(w),
            h: u32::from(h),
            x: 0,
            y: 0,
        }
    }

    /// The next tile's width and height, if any tile is left.
    fn next(&self) -> Option<(u64, u64)> {
        if self.x >= self.w || self.y >= self.h {
            return None;
        }
        let tw = (self.w - self.x).min(HEXTILE_TILE);
        let th = (self.h - self.y).min(HEXTILE_TILE);
        Some((u64::from(tw), u64::from(th)))
    }

    fn advance(&mut self) {
        self.x += HEXTILE_TILE;
        if self.x >= self.w {
            self.x = 0;
            self.y += HEXTILE_TILE;
        }
    }
}

pub struct ServerFilter {
    /// Bytes per pixel of Raw, RRE, Hextile and Cursor data.
    bpp: u64,
    /// A pixel format the client set, applied from the next message on.
    pending_bpp: Option<u64>,
    expect: Expect,
    head: [u8; MAX_HELD],
    head_len: usize,
    /// Rectangles still to come in the FramebufferUpdate in progress.
    rects_left: u16,
    tiles: Tiles,
    /// Whether the message in progress is being dropped.
    dropping: bool,
}

impl ServerFilter {
    pub fn new(pixel_format: PixelFormat) -> Self {
        ServerFilter {
            bpp: pixel_format.bytes_per_pixel() as u64,
            pending_bpp: None,
            expect: Expect::Type,
            head: [0; MAX_HELD],
            head_len: 0,
            rects_left: 0,
            tiles: Tiles::default(),
            dropping: false,
        }
    }

    /// The client changed its pixel format (SetPixelFormat passed to the server).
    ///
    /// One update is encoded in one format, so the new one applies from the next message
    /// boundary of this stream. An update the server encoded before it read SetPixelFormat
    /// cannot be told apart; noVNC sets its format once, before its first update request,
    /// when no update can be in flight.
    pub fn set_pixel_format(&mut self, pixel_format: PixelFormat) {
        self.pending_bpp = Some(pixel_format.bytes_per_pixel() as u64);
        if matches!(self.expect, Expect::Type) {
            self.apply_pending_format();
        }
    }

    pub fn filter(
        &mut self,
        input: &[u8],
        policy: &Policy,
        out: &mut BytesMut,
    ) -> Result<(Kept, ServerReport), ServerError> {
        let mut report = ServerReport::default();
        let mut em = Emitter::new(input, out);
        let mut pos = 0;
        while let Some(rest) = input.get(pos..).filter(|rest| !rest.is_empty()) {
            let used = match self.expect {
                Expect::Type => self.message_type(rest, policy, &mut report)?,
                Expect::Head(head) => self.fill_head(head, rest)?,
                Expect::Run { left, then } => self.run(left, then, rest.len()),
            };
            // `dropping` is set by the type byte and lasts until the next one.
            if self.dropping {
                em.withhold(pos, pos + used);
            }
            pos += used;
        }
        Ok((em.finish(), report))
    }

    /// Bytes of an unfinished header held between calls; at most [`MAX_HELD`].
    pub fn held(&self) -> usize {
        self.head_len
    }

    fn apply_pending_format(&mut self) {
        if let Some(bpp) = self.pending_bpp.take() {
            self.bpp = bpp;
        }
    }

    fn message_type(
        &mut self,
        rest: &[u8],
        policy: &Policy,
        report: &mut ServerReport,
    ) -> Result<usize, ServerError> {
        let Some(&kind) = rest.first() else {
            return Ok(0);
        };
        self.apply_pending_format();
        self.dropping = false;
        self.expect = match kind {
            FRAMEBUFFER_UPDATE => Expect::Head(Head::Update),
            SET_COLOUR_MAP_ENTRIES => Expect::Head(Head::ColourMap),
            BELL | END_OF_CONTINUOUS_UPDATES => Expect::Type,
            SERVER_CUT_TEXT => {
                if !policy.clipboard.to_client() {
                    self.dropping = true;
                    report.clipboard_blocked += 1;
                }
                Expect::Head(Head::CutText)
            }
            FENCE => Expect::Head(Head::Fence),
            // Padding, xvp version, message code.
            XVP => Expect::Run {
                left: 3,
                then: Then::Done,
            },
            other => return Err(ServerError::UnknownType(other)),
        };
        Ok(1)
    }

    /// Collect header bytes (they are forwarded all the same); parse once complete.
    fn fill_head(&mut self, head: Head, rest: &[u8]) -> Result<usize, ServerError> {
        let need = head.len();
        let dst = self.head.get_mut(self.head_len..need).unwrap_or_default();
        let take = dst.len().min(rest.len());
        dst[..take].copy_from_slice(&rest[..take]);
        self.head_len += take;
        if self.head_len == need {
            self.head_len = 0;
            let bytes = self.head;
            self.expect = self.on_head(head, bytes.get(..need).unwrap_or_default())?;
        }
        Ok(take)
    }

    fn run(&mut self, left: u64, then: Then, avail: usize) -> usize {
        let n = clamp_to(left, avail);
        let left = left - n as u64;
        self.expect = if left > 0 {
            Expect::Run { left, then }
        } else {
            self.after(then)
        };
        n
    }

    /// A run of `left` bytes, or what follows it at once when it is empty.
    fn then_run(&mut self, left: u64, then: Then) -> Expect {
        if left == 0 {
            self.after(then)
        } else {
            Expect::Run { left, then }
        }
    }

    fn after(&mut self, then: Then) -> Expect {
        match then {
            Then::Done => self.after_item(),
            Then::Subrects { coloured } => Expect::Head(Head::Subrects { coloured }),
        }
    }

    /// The next thing once a tile, rectangle or message is complete.
    fn after_item(&self) -> Expect {
        if self.tiles.next().is_some() {
            Expect::Head(Head::Tile)
        } else if self.rects_left > 0 {
            Expect::Head(Head::Rect)
        } else {
            Expect::Type
        }
    }

    fn on_head(&mut self, head: Head, h: &[u8]) -> Result<Expect, ServerError> {
        let bpp = self.bpp;
        Ok(match head {
            Head::Update => {
                self.rects_left = be_u16(h, 1).ok_or_else(short)?;
                self.after_item()
            }
            Head::Rect => self.on_rect(h)?,
            Head::RreCount => {
                let subrects = u64::from(be_u32(h, 0).ok_or_else(short)?);
                self.then_run(bpp + subrects * (bpp + 8), Then::Done)
            }
            Head::Length => {
                let len = be_u32(h, 0).ok_or_else(short)?;
                self.then_run(u64::from(len), Then::Done)
            }
            Head::Screens => {
                let screens = h.first().copied().ok_or_else(short)?;
                self.then_run(16 * u64::from(screens), Then::Done)
            }
            Head::Tile => self.on_tile(h.first().copied().ok_or_else(short)?)?,
            Head::Subrects { coloured } => {
                let subrects = u64::from(h.first().copied().ok_or_else(short)?);
                let each = if coloured { bpp + 2 } else { 2 };
                self.then_run(subrects * each, Then::Done)
            }
            Head::ColourMap => {
                let colours = u64::from(be_u16(h, 3).ok_or_else(short)?);
                self.then_run(6 * colours, Then::Done)
            }
            Head::CutText => {
                let len = cut_text_len(be_i32(h, 3).ok_or_else(short)?)?;
                self.then_run(len, Then::Done)
            }
            Head::Fence => {
                let payload = h.get(7).copied().ok_or_else(short)?;
                self.then_run(u64::from(payload), Then::Done)
            }
        })
    }

    fn on_rect(&mut self, h: &[u8]) -> Result<Expect, ServerError> {
        let w = be_u16(h, 4).ok_or_else(short)?;
        let ht = be_u16(h, 6).ok_or_else(short)?;
        let enc = be_i32(h, 8).ok_or_else(short)?;
        let rule = RectRule::of(enc).ok_or(ServerError::UnknownEncoding(enc))?;
        self.rects_left = self.rects_left.saturating_sub(1);
        // u16 * u16 * (at most 32 bytes per pixel) stays far below u64::MAX.
        let (w64, h64) = (u64::from(w), u64::from(ht));
        let pixels = w64 * h64 * self.bpp;
        Ok(match rule {
            RectRule::Raw => self.then_run(pixels, Then::Done),
            RectRule::CopyRect => self.then_run(4, Then::Done),
            RectRule::Rre => Expect::Head(Head::RreCount),
            RectRule::Hextile => {
                self.tiles = Tiles::new(w, ht);
                self.after_item()
            }
            RectRule::Length => Expect::Head(Head::Length),
            RectRule::Empty => self.after_item(),
            RectRule::LastRect => {
                self.rects_left = 0;
                self.after_item()
            }
            RectRule::Cursor => self.then_run(pixels + w64.div_ceil(8) * h64, Then::Done),
            RectRule::Led => self.then_run(1, Then::Done),
            RectRule::ExtendedDesktopSize => Expect::Head(Head::Screens),
        })
    }

    fn on_tile(&mut self, subencoding: u8) -> Result<Expect, ServerError> {
        let (tw, th) = self
            .tiles
            .next()
            .ok_or(ServerError::Malformed("Hextile tile count"))?;
        self.tiles.advance();
        let bpp = self.bpp;
        // With the Raw bit set the other bits carry no meaning (RFC 6143 §7.7.4).
        if subencoding & HEXTILE_RAW != 0 {
            return Ok(self.then_run(tw * th * bpp, Then::Done));
        }
        if subencoding & HEXTILE_UNKNOWN_BITS != 0 {
            return Err(ServerError::Malformed("Hextile subencoding"));
        }
        let flag = |bit: u8| subencoding & bit != 0;
        let colours = [HEXTILE_BACKGROUND, HEXTILE_FOREGROUND]
            .into_iter()
            .filter(|&bit| flag(bit))
            .count() as u64
            * bpp;
        let then = if flag(HEXTILE_ANY_SUBRECTS) {
            Then::Subrects {
                coloured: flag(HEXTILE_SUBRECTS_COLOURED),
            }
        } else {
            Then::Done
        };
        Ok(self.then_run(colours, then))
    }
}

/// Unreachable: headers are parsed only once complete.
fn short() -> ServerError {
    ServerError::Malformed("short header")
}

/// The body length of a ServerCutText; a negative length is the extended clipboard.
fn cut_text_len(length: i32) -> Result<u64, ServerError> {
    let len = u64::from(length.unsigned_abs());
    if length < 0 && len < EXTENDED_CUT_TEXT_MIN {
        return Err(ServerError::Malformed("extended ServerCutText"));
    }
    Ok(len)
}

fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn be_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
#[path = "server_msg_tests.rs"]
mod tests;
