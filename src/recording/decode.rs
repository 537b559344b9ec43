//! The server side of an RFB stream decoded into pixels, for `vncgate recording export`.
//!
//! A recorded session asks its server only for the encodings decoded here (Raw, CopyRect, RRE,
//! Hextile, Zlib, ZRLE and the pseudo-encodings the gateway delimits: see
//! [`ClientFilter::for_recording`](crate::rfb::client_msg::ClientFilter::for_recording)), so
//! every recording it writes can be exported. Hand-written: the RFB crates on crates.io are
//! clients bound to their own socket and event loop, none decodes a byte stream handed to it.
//!
//! Data is fed in any split (FBS blocks are relay reads). A rectangle is decoded once all its
//! bytes are at hand; the bytes after it wait in [`Decoder`]'s buffer, so memory is bounded by
//! the largest rectangle, itself bounded by the framebuffer's size.

use flate2::{Decompress, FlushDecompress};

use crate::rfb::PixelFormat;
use crate::rfb::server_msg::{encoding, message};

/// The largest framebuffer decoded (a 1 GiB RGBA buffer), against a file that claims more.
pub const MAX_PIXELS: usize = 16384 * 16384;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("server message type {0} is not part of a recording")]
    UnknownMessage(u8),
    #[error(
        "rectangle encoding {0} cannot be decoded (recordings use Raw, CopyRect, RRE, Hextile, Zlib, ZRLE)"
    )]
    UnknownEncoding(i32),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("pixel format with {0} bits per pixel")]
    PixelFormat(u8),
    #[error("framebuffer of {0}x{1} is larger than the exporter decodes")]
    TooLarge(u16, u16),
    #[error("compressed data: {0}")]
    Inflate(String),
}

/// An RGBA framebuffer (alpha always 255), row after row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framebuffer {
    pub width: u16,
    pub height: u16,
    pub rgba: Vec<u8>,
}

impl Framebuffer {
    fn new(width: u16, height: u16) -> Result<Framebuffer, DecodeError> {
        let pixels = usize::from(width) * usize::from(height);
        if pixels > MAX_PIXELS {
            return Err(DecodeError::TooLarge(width, height));
        }
        let mut rgba = vec![0u8; pixels * 4];
        rgba.chunks_exact_mut(4).for_each(|p| p[3] = 255);
        Ok(Framebuffer {
            width,
            height,
            rgba,
        })
    }

    /// Set one pixel; outside the framebuffer, nothing (a server's rectangle is trusted no
    /// further than its bounds).
    fn put(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < usize::from(self.width) && y < usize::from(self.height) {
            let at = (y * usize::from(self.width) + x) * 4;
            self.rgba[at..at + 3].copy_from_slice(&rgb);
        }
    }

    fn fill(&mut self, r: Rect, rgb: [u8; 3]) {
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                self.put(x, y, rgb);
            }
        }
    }

    fn get(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        (x < usize::from(self.width) && y < usize::from(self.height)).then(|| {
            let at = (y * usize::from(self.width) + x) * 4;
            [self.rgba[at], self.rgba[at + 1], self.rgba[at + 2]]
        })
    }

    /// A new size, the overlapping part kept (noVNC keeps it too, until the server repaints).
    fn resize(&mut self, width: u16, height: u16) -> Result<(), DecodeError> {
        let mut next = Framebuffer::new(width, height)?;
        for y in 0..usize::from(height.min(self.height)) {
            for x in 0..usize::from(width.min(self.width)) {
                if let Some(rgb) = self.get(x, y) {
                    next.put(x, y, rgb);
                }
            }
        }
        *self = next;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Rect {
    x: usize,
    y: usize,
    w: usize,
    h: usize,
}

/// How the stream's pixel values become colours.
#[derive(Debug, Clone)]
struct Pixels {
    format: PixelFormat,
    /// SetColourMapEntries, for a format that is not true-colour.
    colour_map: Vec<[u8; 3]>,
}

impl Pixels {
    fn new(format: PixelFormat) -> Result<Pixels, DecodeError> {
        match format.bits_per_pixel() {
            8 | 16 | 32 => Ok(Pixels {
                format,
                colour_map: vec![[0; 3]; 256],
            }),
            bits => Err(DecodeError::PixelFormat(bits)),
        }
    }

    fn bytes(&self) -> usize {
        self.format.bytes_per_pixel()
    }

    fn big_endian(&self) -> bool {
        self.format.0[2] != 0
    }

    fn value(&self, b: &[u8]) -> u32 {
        match (b.len(), self.big_endian()) {
            (1, _) => u32::from(b[0]),
            (2, true) => u32::from(u16::from_be_bytes([b[0], b[1]])),
            (2, false) => u32::from(u16::from_le_bytes([b[0], b[1]])),
            (4, true) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            (4, false) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            _ => 0,
        }
    }

    /// The colour of one pixel of `bytes()` bytes.
    fn rgb(&self, b: &[u8]) -> [u8; 3] {
        let v = self.value(b);
        let f = &self.format.0;
        if f[3] == 0 {
            let i = usize::try_from(v).unwrap_or(usize::MAX);
            return self.colour_map.get(i).copied().unwrap_or([0; 3]);
        }
        let channel = |max_at: usize, shift: u8| {
            let max = u32::from(u16::from_be_bytes([f[max_at], f[max_at + 1]]));
            let c = v.checked_shr(u32::from(shift)).unwrap_or(0) & max;
            // Scaled to 0..=255 the way noVNC's canvas shows it.
            u8::try_from((c * 255).checked_div(max).unwrap_or(0)).unwrap_or(255)
        };
        [channel(4, f[10]), channel(6, f[11]), channel(8, f[12])]
    }

    /// ZRLE's compressed pixel (RFC 6143 §7.7.6): 3 bytes when a 32-bit true-colour pixel's
    /// colour bits all fit in its low or its high three bytes; then the byte the CPIXEL leaves
    /// out, and where it goes.
    fn cpixel(&self) -> (usize, Option<bool>) {
        let f = &self.format.0;
        if f[0] != 32 || f[1] > 24 || f[3] == 0 {
            return (self.bytes(), None);
        }
        let mask = |max_at: usize, shift: u8| {
            u32::from(u16::from_be_bytes([f[max_at], f[max_at + 1]]))
                .checked_shl(u32::from(shift))
                .unwrap_or(u32::MAX)
        };
        let bits = mask(4, f[10]) | mask(6, f[11]) | mask(8, f[12]);
        // `Some(true)`: the missing byte goes first in memory.
        let low = bits & 0xff00_0000 == 0;
        let high = bits & 0x0000_00ff == 0;
        match (low, high) {
            (true, _) => (3, Some(self.big_endian())),
            (false, true) => (3, Some(!self.big_endian())),
            _ => (self.bytes(), None),
        }
    }
}

/// Where the stream is between calls.
#[derive(Debug, Clone, Copy)]
enum State {
    /// A message type byte comes next.
    Message,
    /// Inside a FramebufferUpdate: this many rectangles still to come.
    Rects(u16),
}

pub struct Decoder {
    fb: Framebuffer,
    pixels: Pixels,
    state: State,
    /// Bytes not yet decoded: at most one message header or rectangle.
    pending: Vec<u8>,
    /// Stream offset (server bytes after the handshake) of `pending[0]`.
    offset: u64,
    /// Pixel format changes to come, by the stream offset from which they apply.
    formats: Vec<(u64, PixelFormat)>,
    zlib: Decompress,
    zrle: Decompress,
}

impl Decoder {
    /// A decoder for a stream whose ServerInit gave this size and (as written by the
    /// recorder) the client's pixel format.
    pub fn new(width: u16, height: u16, format: PixelFormat) -> Result<Decoder, DecodeError> {
        Ok(Decoder {
            fb: Framebuffer::new(width, height)?,
            pixels: Pixels::new(format)?,
            state: State::Message,
            pending: Vec::new(),
            offset: 0,
            formats: Vec::new(),
            zlib: Decompress::new(true),
            zrle: Decompress::new(true),
        })
    }

    /// The client switched to `format` at stream `offset` (the audit's `pixel_format` line):
    /// it applies from the first message that starts there or later.
    pub fn pixel_format_at(&mut self, offset: u64, format: PixelFormat) {
        self.formats.push((offset, format));
        self.formats.sort_by_key(|(at, _)| *at);
    }

    pub fn framebuffer(&self) -> &Framebuffer {
        &self.fb
    }

    /// Decode what `data` completes; the rest waits for the next call.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        self.pending.extend_from_slice(data);
        let pending = std::mem::take(&mut self.pending);
        let mut at = 0;
        let result = loop {
            match self.step(&pending[at..]) {
                Ok(Some(used)) => {
                    at += used;
                    self.offset += used as u64;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.pending = pending;
        self.pending.drain(..at);
        result
    }

    /// Decode one message header or rectangle at the start of `buf`: the bytes it took, or
    /// `None` when `buf` does not hold all of it yet.
    fn step(&mut self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        match self.state {
            State::Message => {
                if buf.is_empty() {
                    return Ok(None);
                }
                self.apply_formats();
                self.message(buf)
            }
            State::Rects(0) => {
                self.state = State::Message;
                Ok(Some(0))
            }
            State::Rects(left) => {
                let Some(head) = buf.get(..12) else {
                    return Ok(None);
                };
                let mut r = Reader::new(head);
                let rect = Rect {
                    x: usize::from(r.u16()),
                    y: usize::from(r.u16()),
                    w: usize::from(r.u16()),
                    h: usize::from(r.u16()),
                };
                let enc = r.i32();
                let Some(used) = self.rect(rect, enc, &buf[12..])? else {
                    return Ok(None);
                };
                self.state = if enc == encoding::LAST_RECT {
                    State::Message
                } else {
                    State::Rects(left - 1)
                };
                Ok(Some(12 + used))
            }
        }
    }

    fn apply_formats(&mut self) {
        while let Some(&(at, format)) = self.formats.first()
            && at <= self.offset
        {
            self.formats.remove(0);
            if let Ok(pixels) = Pixels::new(format) {
                let colour_map = std::mem::take(&mut self.pixels.colour_map);
                self.pixels = Pixels {
                    colour_map,
                    ..pixels
                };
            }
        }
    }

    /// A message from its type byte: the bytes it took (for a FramebufferUpdate, its header).
    fn message(&mut self, buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        let mut r = Reader::new(buf);
        let len = match r.u8() {
            message::FRAMEBUFFER_UPDATE => {
                let Some(h) = buf.get(..4) else {
                    return Ok(None);
                };
                self.state = State::Rects(u16::from_be_bytes([h[2], h[3]]));
                4
            }
            message::SET_COLOUR_MAP_ENTRIES => {
                let Some(h) = buf.get(..6) else {
                    return Ok(None);
                };
                let first = usize::from(u16::from_be_bytes([h[2], h[3]]));
                let count = usize::from(u16::from_be_bytes([h[4], h[5]]));
                let Some(entries) = buf.get(6..6 + count * 6) else {
                    return Ok(None);
                };
                for (i, e) in entries.chunks_exact(6).enumerate() {
                    // 16-bit intensities: the high byte is the 8-bit colour.
                    let rgb = [e[0], e[2], e[4]];
                    if let Some(slot) = self.pixels.colour_map.get_mut(first + i) {
                        *slot = rgb;
                    }
                }
                6 + count * 6
            }
            message::BELL | message::END_OF_CONTINUOUS_UPDATES => 1,
            message::SERVER_CUT_TEXT => {
                let Some(h) = buf.get(..8) else {
                    return Ok(None);
                };
                // Negative: an extended clipboard message of that many bytes.
                let n = i32::from_be_bytes([h[4], h[5], h[6], h[7]]).unsigned_abs() as usize;
                8 + n
            }
            message::FENCE => {
                let Some(h) = buf.get(..9) else {
                    return Ok(None);
                };
                9 + usize::from(h[8])
            }
            message::XVP => 4,
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        Ok((buf.len() >= len).then_some(len))
    }

    /// One rectangle's body: the bytes it took, or `None` until they are all there.
    fn rect(&mut self, r: Rect, enc: i32, body: &[u8]) -> Result<Option<usize>, DecodeError> {
        let bpp = self.pixels.bytes();
        let area = r.w * r.h;
        let used = match enc {
            encoding::RAW => {
                let Some(px) = body.get(..area * bpp) else {
                    return Ok(None);
                };
                self.put_pixels(r, px);
                area * bpp
            }
            encoding::COPY_RECT => {
                let Some(h) = body.get(..4) else {
                    return Ok(None);
                };
                let src = (
                    usize::from(u16::from_be_bytes([h[0], h[1]])),
                    usize::from(u16::from_be_bytes([h[2], h[3]])),
                );
                self.copy_rect(r, src);
                4
            }
            encoding::RRE => return self.rre(r, body),
            encoding::HEXTILE => return self.hextile(r, body),
            encoding::ZLIB => {
                let Some(data) = length_prefixed(body) else {
                    return Ok(None);
                };
                let raw = inflate(&mut self.zlib, data, area * bpp)?;
                let px = raw
                    .get(..area * bpp)
                    .ok_or(DecodeError::Malformed("Zlib"))?;
                self.put_pixels(r, px);
                4 + data.len()
            }
            encoding::ZRLE => {
                let Some(data) = length_prefixed(body) else {
                    return Ok(None);
                };
                // Tiles carry a byte or a palette on top of their pixels: twice the raw size
                // bounds any real tile stream, and a decompression bomb.
                let raw = inflate(&mut self.zrle, data, area * bpp * 2 + 4096)?;
                self.zrle_tiles(r, &raw)?;
                4 + data.len()
            }
            encoding::DESKTOP_SIZE => {
                self.resize(r)?;
                0
            }
            encoding::EXTENDED_DESKTOP_SIZE => {
                let Some(&screens) = body.first() else {
                    return Ok(None);
                };
                let len = 4 + 16 * usize::from(screens);
                if body.len() < len {
                    return Ok(None);
                }
                // y is the status: non-zero answers a refused SetDesktopSize, nothing changes.
                if r.y == 0 {
                    self.resize(r)?;
                }
                len
            }
            encoding::CURSOR => area * bpp + r.w.div_ceil(8) * r.h,
            encoding::DESKTOP_NAME => match length_prefixed(body) {
                Some(name) => 4 + name.len(),
                None => return Ok(None),
            },
            encoding::QEMU_LED_STATE => 1,
            encoding::LAST_RECT
            | encoding::QEMU_EXTENDED_KEY_EVENT
            | encoding::EXTENDED_MOUSE_BUTTONS => 0,
            other => return Err(DecodeError::UnknownEncoding(other)),
        };
        Ok((body.len() >= used).then_some(used))
    }

    fn resize(&mut self, r: Rect) -> Result<(), DecodeError> {
        let (w, h) = (u16::try_from(r.w), u16::try_from(r.h));
        match (w, h) {
            (Ok(w), Ok(h)) => self.fb.resize(w, h),
            _ => Err(DecodeError::Malformed("desktop size")),
        }
    }

    fn put_pixels(&mut self, r: Rect, px: &[u8]) {
        let bpp = self.pixels.bytes();
        for (i, p) in px.chunks_exact(bpp).enumerate() {
            self.fb.put(
                r.x + i % r.w.max(1),
                r.y + i / r.w.max(1),
                self.pixels.rgb(p),
            );
        }
    }

    fn copy_rect(&mut self, r: Rect, (sx, sy): (usize, usize)) {
        let mut block = Vec::with_capacity(r.w * r.h);
        for y in 0..r.h {
            for x in 0..r.w {
                block.push(self.fb.get(sx + x, sy + y).unwrap_or([0; 3]));
            }
        }
        for (i, rgb) in block.into_iter().enumerate() {
            self.fb.put(r.x + i % r.w, r.y + i / r.w, rgb);
        }
    }

    fn rre(&mut self, r: Rect, body: &[u8]) -> Result<Option<usize>, DecodeError> {
        let bpp = self.pixels.bytes();
        let Some(h) = body.get(..4 + bpp) else {
            return Ok(None);
        };
        let count = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let len = 4 + bpp + count * (bpp + 8);
        let Some(body) = body.get(..len) else {
            return Ok(None);
        };
        self.fb.fill(r, self.pixels.rgb(&h[4..]));
        for sub in body[4 + bpp..].chunks_exact(bpp + 8) {
            let mut s = Reader::new(&sub[bpp..]);
            let sub_rect = Rect {
                x: r.x + usize::from(s.u16()),
                y: r.y + usize::from(s.u16()),
                w: usize::from(s.u16()),
                h: usize::from(s.u16()),
            };
            self.fb
                .fill(clip(sub_rect, r), self.pixels.rgb(&sub[..bpp]));
        }
        Ok(Some(len))
    }

    /// Hextile (RFC 6143 §7.7.4): 16x16 tiles, left to right, top to bottom; background and
    /// foreground carry over from tile to tile.
    fn hextile(&mut self, r: Rect, body: &[u8]) -> Result<Option<usize>, DecodeError> {
        const RAW: u8 = 1;
        const BACKGROUND: u8 = 2;
        const FOREGROUND: u8 = 4;
        const ANY_SUBRECTS: u8 = 8;
        const COLOURED: u8 = 16;
        let bpp = self.pixels.bytes();
        let (mut bg, mut fg) = ([0u8; 3], [0u8; 3]);
        let mut at = 0;
        for tile in tiles(r, 16) {
            let Some(&sub) = body.get(at) else {
                return Ok(None);
            };
            at += 1;
            if sub & RAW != 0 {
                let Some(px) = body.get(at..at + tile.w * tile.h * bpp) else {
                    return Ok(None);
                };
                self.put_pixels(tile, px);
                at += px.len();
                continue;
            }
            let mut take = |n: usize| {
                let got = body.get(at..at + n);
                at += n;
                got
            };
            if sub & BACKGROUND != 0 {
                let Some(px) = take(bpp) else {
                    return Ok(None);
                };
                bg = self.pixels.rgb(px);
            }
            if sub & FOREGROUND != 0 {
                let Some(px) = take(bpp) else {
                    return Ok(None);
                };
                fg = self.pixels.rgb(px);
            }
            self.fb.fill(tile, bg);
            if sub & ANY_SUBRECTS == 0 {
                continue;
            }
            let Some(&[count]) = take(1) else {
                return Ok(None);
            };
            let each = if sub & COLOURED != 0 { bpp + 2 } else { 2 };
            let Some(subs) = take(usize::from(count) * each) else {
                return Ok(None);
            };
            for s in subs.chunks_exact(each) {
                let (colour, xy, wh) = match sub & COLOURED {
                    0 => (fg, s[0], s[1]),
                    _ => (self.pixels.rgb(&s[..bpp]), s[bpp], s[bpp + 1]),
                };
                let sub_rect = Rect {
                    x: tile.x + usize::from(xy >> 4),
                    y: tile.y + usize::from(xy & 15),
                    w: usize::from(wh >> 4) + 1,
                    h: usize::from(wh & 15) + 1,
                };
                self.fb.fill(clip(sub_rect, tile), colour);
            }
        }
        Ok(Some(at))
    }

    /// ZRLE's tiles (RFC 6143 §7.7.6): 64x64, each raw, solid, packed-palette, plain RLE or
    /// palette RLE, in CPIXELs.
    fn zrle_tiles(&mut self, r: Rect, data: &[u8]) -> Result<(), DecodeError> {
        let bad = || DecodeError::Malformed("ZRLE");
        let (cbytes, pad_first) = self.pixels.cpixel();
        let pixels = self.pixels.clone();
        let colour = |c: &[u8]| match pad_first {
            Some(first) => {
                let mut p = [0u8; 4];
                let at = usize::from(first);
                p[at..at + 3].copy_from_slice(c);
                pixels.rgb(&p)
            }
            None => pixels.rgb(c),
        };
        let mut s = Reader::new(data);
        for tile in tiles(r, 64) {
            let area = tile.w * tile.h;
            let sub = s.take(1).ok_or_else(bad)?[0];
            let at = |i: usize| (tile.x + i % tile.w, tile.y + i / tile.w);
            match sub {
                0 => {
                    let px = s.take(area * cbytes).ok_or_else(bad)?;
                    for (i, c) in px.chunks_exact(cbytes).enumerate() {
                        let (x, y) = at(i);
                        self.fb.put(x, y, colour(c));
                    }
                }
                1 => {
                    let c = s.take(cbytes).ok_or_else(bad)?;
                    self.fb.fill(tile, colour(c));
                }
                2..=16 => {
                    let palette: Vec<[u8; 3]> = s
                        .take(usize::from(sub) * cbytes)
                        .ok_or_else(bad)?
                        .chunks_exact(cbytes)
                        .map(&colour)
                        .collect();
                    let bits = match sub {
                        2 => 1,
                        3 | 4 => 2,
                        _ => 4,
                    };
                    let row_bytes = (tile.w * bits).div_ceil(8);
                    let packed = s.take(row_bytes * tile.h).ok_or_else(bad)?;
                    for y in 0..tile.h {
                        let row = &packed[y * row_bytes..(y + 1) * row_bytes];
                        for x in 0..tile.w {
                            let bit = x * bits;
                            let byte = row[bit / 8];
                            let index = (byte >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                            let rgb = palette.get(usize::from(index)).ok_or_else(bad)?;
                            self.fb.put(tile.x + x, tile.y + y, *rgb);
                        }
                    }
                }
                128 | 130..=255 => {
                    let palette: Vec<[u8; 3]> = match sub {
                        128 => Vec::new(),
                        _ => s
                            .take(usize::from(sub - 128) * cbytes)
                            .ok_or_else(bad)?
                            .chunks_exact(cbytes)
                            .map(&colour)
                            .collect(),
                    };
                    let mut i = 0;
                    while i < area {
                        let (rgb, run) = if sub == 128 {
                            let c = colour(s.take(cbytes).ok_or_else(bad)?);
                            (c, run_length(&mut s).ok_or_else(bad)?)
                        } else {
                            let index = s.take(1).ok_or_else(bad)?[0];
                            let rgb = *palette.get(usize::from(index & 127)).ok_or_else(bad)?;
                            match index & 128 {
                                0 => (rgb, 1),
                                _ => (rgb, run_length(&mut s).ok_or_else(bad)?),
                            }
                        };
                        for _ in 0..run.min(area - i) {
                            let (x, y) = at(i);
                            self.fb.put(x, y, rgb);
                            i += 1;
                        }
                    }
                }
                _ => return Err(bad()),
            }
        }
        Ok(())
    }
}

/// A rectangle's tiles of `size` x `size` (smaller at its right and bottom edges), left to
/// right, top to bottom: Hextile's 16 and ZRLE's 64.
fn tiles(r: Rect, size: usize) -> impl Iterator<Item = Rect> {
    (0..r.h).step_by(size).flat_map(move |ty| {
        (0..r.w).step_by(size).map(move |tx| Rect {
            x: r.x + tx,
            y: r.y + ty,
            w: (r.w - tx).min(size),
            h: (r.h - ty).min(size),
        })
    })
}

/// ZRLE's run length: bytes of 255 summed, then one below 255, plus one.
fn run_length(s: &mut Reader) -> Option<usize> {
    let mut run = 1;
    loop {
        let b = s.take(1)?[0];
        run += usize::from(b);
        if b != 255 {
            return Some(run);
        }
    }
}

fn clip(r: Rect, within: Rect) -> Rect {
    let x = r.x.min(within.x + within.w);
    let y = r.y.min(within.y + within.h);
    Rect {
        x,
        y,
        w: r.w.min(within.x + within.w - x),
        h: r.h.min(within.y + within.h - y),
    }
}

/// A u32 length and that many bytes, or `None` until they are all there.
fn length_prefixed(body: &[u8]) -> Option<&[u8]> {
    let h = body.get(..4)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    body.get(4..4 + len)
}

/// Inflate one rectangle's share of a session-long zlib stream (`Sync`-flushed by the server,
/// so it decodes without the bytes that follow), up to `cap` bytes out.
fn inflate(z: &mut Decompress, input: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(cap.min(input.len().saturating_mul(4)).max(1024));
    let mut pos = 0;
    loop {
        if out.len() == out.capacity() {
            if out.len() >= cap {
                return Err(DecodeError::Inflate(
                    "more data than the rectangle holds".into(),
                ));
            }
            out.reserve((cap - out.len()).min(out.len().max(1024)));
        }
        let (before_in, before_out) = (z.total_in(), z.total_out());
        z.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            .map_err(|e| DecodeError::Inflate(e.to_string()))?;
        let consumed = usize::try_from(z.total_in() - before_in).unwrap_or(usize::MAX);
        pos = pos.saturating_add(consumed).min(input.len());
        let progressed = consumed > 0 || z.total_out() > before_out;
        if (pos == input.len() && out.len() < out.capacity()) || !progressed {
            return Ok(out);
        }
    }
}

/// Big-endian fields of a slice whose length was checked by the caller.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let got = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(got)
    }

    fn u8(&mut self) -> u8 {
        self.take(1).map_or(0, |b| b[0])
    }

    fn u16(&mut self) -> u16 {
        self.take(2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> i32 {
        self.take(4)
            .map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
