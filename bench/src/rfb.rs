//! The parts of RFB 3.8 (RFC 6143) the benchmark speaks: the handshake with security type None on
//! both sides, and the shape of a FramebufferUpdate.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const VERSION: &[u8; 12] = b"RFB 003.008\n";
const SECURITY_NONE: u8 = 1;
pub const FB_WIDTH: u16 = 1920;
pub const FB_HEIGHT: u16 = 1080;
const DESKTOP_NAME: &[u8] = b"vncgate-bench";

/// ServerInit: framebuffer size, a 32 bpp true-colour pixel format, the desktop name.
pub fn server_init() -> Vec<u8> {
    let mut m = Vec::with_capacity(24 + DESKTOP_NAME.len());
    m.extend_from_slice(&FB_WIDTH.to_be_bytes());
    m.extend_from_slice(&FB_HEIGHT.to_be_bytes());
    // PIXEL_FORMAT: bpp, depth, big-endian, true-colour, r/g/b max, r/g/b shift, 3 padding.
    m.extend_from_slice(&[32, 24, 0, 1]);
    m.extend_from_slice(&255u16.to_be_bytes());
    m.extend_from_slice(&255u16.to_be_bytes());
    m.extend_from_slice(&255u16.to_be_bytes());
    m.extend_from_slice(&[16, 8, 0, 0, 0, 0]);
    m.extend_from_slice(&(DESKTOP_NAME.len() as u32).to_be_bytes());
    m.extend_from_slice(DESKTOP_NAME);
    m
}

/// A FramebufferUpdate of exactly `total` bytes (at least 16): one raw-encoded rectangle whose
/// pixel data fills the rest. The rectangle is `width` x `height` pixels of 4 bytes with
/// `width` x `height` x 4 = the data length, so the message is valid RFB (a viewer or a
/// gateway that parses it stays in step); `total` is rounded down to 16 + a multiple of 4, and
/// further down when that pixel count has no width x height shape fitting the screen.
pub fn framebuffer_update(total: usize) -> Vec<u8> {
    let (width, height) = rect_shape(total.saturating_sub(16) / 4);
    let data_len = width * height * 4;
    let mut m = Vec::with_capacity(16 + data_len);
    m.extend_from_slice(&[0, 0]); // message type 0, padding
    m.extend_from_slice(&1u16.to_be_bytes()); // one rectangle
    m.extend_from_slice(&0u16.to_be_bytes()); // x
    m.extend_from_slice(&0u16.to_be_bytes()); // y
    m.extend_from_slice(&(width as u16).to_be_bytes());
    m.extend_from_slice(&(height as u16).to_be_bytes());
    m.extend_from_slice(&0i32.to_be_bytes()); // raw encoding
    // A gradient rather than zeros, so nothing along the way can shortcut the copy.
    m.extend((0..data_len).map(|i| (i % 251) as u8));
    m
}

/// width x height = `pixels` exactly, width at most the screen's, height as small as that
/// allows; when no such shape fits the screen, the largest full rows that do.
fn rect_shape(pixels: usize) -> (usize, usize) {
    let max_w = FB_WIDTH as usize;
    let max_h = FB_HEIGHT as usize;
    if pixels == 0 {
        return (0, 0);
    }
    let exact = (pixels.div_ceil(max_w)..=max_h.min(pixels)).find(|h| pixels.is_multiple_of(*h));
    match exact {
        Some(h) => (pixels / h, h),
        None => {
            let w = pixels.min(max_w);
            (w, (pixels / w).min(max_h))
        }
    }
}

/// FramebufferUpdateRequest for the whole screen (what a viewer sends after ServerInit).
pub fn update_request(incremental: bool) -> [u8; 10] {
    let mut m = [0u8; 10];
    m[0] = 3;
    m[1] = incremental as u8;
    m[6..8].copy_from_slice(&FB_WIDTH.to_be_bytes());
    m[8..10].copy_from_slice(&FB_HEIGHT.to_be_bytes());
    m
}

/// Whether the client messages in `buf` (from the first byte after ClientInit) reach a
/// FramebufferUpdateRequest; `Ok(false)` while more bytes are needed to tell.
pub fn first_update_request(buf: &[u8]) -> io::Result<bool> {
    let mut at = 0;
    while let Some(&kind) = buf.get(at) {
        let rest = &buf[at..];
        let len = match kind {
            0 => 20, // SetPixelFormat
            2 => match rest.get(2..4) {
                // SetEncodings: 4 + 4 per encoding
                Some(n) => 4 + 4 * u16::from_be_bytes([n[0], n[1]]) as usize,
                None => return Ok(false),
            },
            3 => return Ok(rest.len() >= 10), // FramebufferUpdateRequest
            4 => 8,                           // KeyEvent
            5 => 6,                           // PointerEvent
            6 => match rest.get(4..8) {
                // ClientCutText: 8 + the text
                Some(n) => 8 + u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize,
                None => return Ok(false),
            },
            other => return Err(bad(&format!("unexpected client message type {other}"))),
        };
        at += len;
    }
    Ok(false)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The server side of the handshake up to and including ServerInit.
pub async fn server_handshake<S>(s: &mut S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(VERSION).await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    if &version[..4] != b"RFB " {
        return Err(bad("client did not send an RFB version"));
    }
    s.write_all(&[1, SECURITY_NONE]).await?;
    let mut chosen = [0u8; 1];
    s.read_exact(&mut chosen).await?;
    if chosen[0] != SECURITY_NONE {
        s.write_all(&1u32.to_be_bytes()).await?;
        return Err(bad("client chose a security type other than None"));
    }
    s.write_all(&0u32.to_be_bytes()).await?; // SecurityResult OK
    let mut client_init = [0u8; 1];
    s.read_exact(&mut client_init).await?;
    s.write_all(&server_init()).await?;
    Ok(())
}

/// What a client must be able to do to run the handshake over any transport.
pub trait ByteStream {
    fn read_exact(&mut self, n: usize) -> impl Future<Output = io::Result<Vec<u8>>>;
    fn write_all(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>>;
}

/// The client side of the handshake: version, security None, ClientInit (shared), ServerInit.
pub async fn client_handshake<S: ByteStream>(s: &mut S) -> io::Result<()> {
    let version = s.read_exact(12).await?;
    if &version[..4] != b"RFB " {
        return Err(bad("server did not send an RFB version"));
    }
    s.write_all(VERSION).await?;
    let count = s.read_exact(1).await?[0] as usize;
    if count == 0 {
        return Err(bad("server offered no security type"));
    }
    let types = s.read_exact(count).await?;
    if !types.contains(&SECURITY_NONE) {
        return Err(bad("server does not offer security type None"));
    }
    s.write_all(&[SECURITY_NONE]).await?;
    let result = s.read_exact(4).await?;
    if result != [0, 0, 0, 0] {
        return Err(bad("security handshake failed"));
    }
    s.write_all(&[1]).await?; // ClientInit: shared
    let init = s.read_exact(24).await?;
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    if name_len > 4096 {
        return Err(bad("desktop name too long"));
    }
    s.read_exact(name_len).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_has_the_requested_size() {
        for total in [16, 20, 1024, 65536, 1 << 20] {
            let m = framebuffer_update(total);
            assert_eq!(m.len(), total);
            assert_eq!(m[0], 0);
            let w = u16::from_be_bytes([m[8], m[9]]) as usize;
            let h = u16::from_be_bytes([m[10], m[11]]) as usize;
            assert_eq!(16 + w * h * 4, total, "{total}: {w}x{h}");
            assert!(w <= FB_WIDTH as usize && h <= FB_HEIGHT as usize);
        }
    }

    #[test]
    fn finds_the_first_update_request() {
        let req = update_request(false);
        assert!(first_update_request(&req).unwrap());
        assert!(!first_update_request(&req[..9]).unwrap());
        assert!(!first_update_request(&[]).unwrap());
        // SetEncodings with two encodings, a KeyEvent, then the request.
        let mut m = vec![2, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1];
        m.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 0x0d]);
        assert!(!first_update_request(&m).unwrap());
        m.extend_from_slice(&req);
        assert!(first_update_request(&m).unwrap());
        assert!(first_update_request(&[99]).is_err());
    }

    #[test]
    fn server_init_is_well_formed() {
        let m = server_init();
        let len = u32::from_be_bytes([m[20], m[21], m[22], m[23]]) as usize;
        assert_eq!(m.len(), 24 + len);
    }
}
