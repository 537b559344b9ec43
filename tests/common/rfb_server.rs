//! In-process stand-ins for VNC backends: a minimal RFB 3.8 server, a flood source/sink, an echo
//! server. Every fixture listens on 127.0.0.1:0 and counts what crosses the socket so tests can
//! assert on the backend side of the gateway, not only on what the WebSocket client saw.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Both directions of a flood use this seed, so either end can regenerate what the other sent.
pub const FLOOD_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

const FLOOD_CHUNK: usize = 64 * 1024;

pub enum Mode {
    /// RFB 3.8 server side: version, security type None (1), SecurityResult OK, ClientInit,
    /// ServerInit with a 32bpp true-colour pixel format and `name`. Non-incremental
    /// FramebufferUpdateRequests get one Raw rectangle of the whole framebuffer filled with
    /// `rgb`, encoded in whatever pixel format the client last set. Incremental requests are
    /// held, as a real server holds them until something changes, and nothing ever changes
    /// here: answering them would make noVNC spin on full frames.
    Rfb {
        name: String,
        width: u16,
        height: u16,
        rgb: [u8; 3],
    },
    /// Sends `total` bytes of the `FloodGen` stream in 64 KiB chunks while reading, hashing and
    /// discarding everything the peer sends until EOF. The write side stays open after the
    /// flood ends: a half-close would let a bridge tear the session down before the peer's
    /// own data has arrived.
    Flood { total: u64 },
    /// Echoes every byte back; half-closes after the peer's EOF.
    Echo,
    /// Completes the RFB handshake (a 64x48 desktop) and then closes the connection with a
    /// FIN, draining the peer until its EOF so the close never turns into a reset.
    CloseAfterHandshake { name: String },
}

/// Counters shared by all connections of one fixture.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// Connections whose handler has finished (peer EOF, error, or fixture-side close).
    pub closed: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Times a `try_write` found the socket buffer full.
    pub write_blocked: AtomicU64,
    /// `notify_one` on every full-buffer hit, so a waiter arriving after the first hit still
    /// wakes (one stored permit); use `wait_write_blocked` to wait for a count.
    pub blocked: Notify,
    /// RFB client-to-server messages seen by `Mode::Rfb` after the handshake.
    pub messages: MessageCounts,
    /// Woken on every change a `wait_*` method may be waiting for.
    changed: Notify,
    digests: Mutex<HashMap<u64, [u8; 32]>>,
}

#[derive(Default)]
pub struct MessageCounts {
    pub set_pixel_format: AtomicU64,
    pub set_encodings: AtomicU64,
    pub update_requests: AtomicU64,
    pub key_events: AtomicU64,
    pub pointer_events: AtomicU64,
    pub cut_text: AtomicU64,
    pub other: AtomicU64,
}

impl Stats {
    /// SHA-256 of everything the first accepted connection read, once that connection ended.
    pub async fn wait_read_digest(&self) -> [u8; 32] {
        self.wait_read_digest_of(0).await
    }

    /// Like `wait_read_digest` for the `index`-th accepted connection (0-based).
    pub async fn wait_read_digest_of(&self, index: u64) -> [u8; 32] {
        self.wait_for(|s| s.digest_of(index)).await
    }

    /// The digest of connection `index` if it has ended.
    pub fn digest_of(&self, index: u64) -> Option<[u8; 32]> {
        lock(&self.digests).get(&index).copied()
    }

    pub async fn wait_connections(&self, at_least: u64) {
        self.wait_for(|s| (s.connections.load(Ordering::SeqCst) >= at_least).then_some(()))
            .await
    }

    pub async fn wait_closed(&self, at_least: u64) {
        self.wait_for(|s| (s.closed.load(Ordering::SeqCst) >= at_least).then_some(()))
            .await
    }

    pub async fn wait_write_blocked(&self, at_least: u64) {
        self.wait_for(|s| (s.write_blocked.load(Ordering::SeqCst) >= at_least).then_some(()))
            .await
    }

    pub async fn wait_bytes_read(&self, at_least: u64) {
        self.wait_for(|s| (s.bytes_read.load(Ordering::SeqCst) >= at_least).then_some(()))
            .await
    }

    async fn wait_for<T>(&self, check: impl Fn(&Self) -> Option<T>) -> T {
        loop {
            // Registered before checking, so a change between the check and the await is not lost.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = check(self) {
                return v;
            }
            notified.await;
        }
    }

    fn bump(&self, counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not turn every later assertion into a poison panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct RfbServer {
    pub addr: SocketAddr,
    /// Whether it speaks RFB (a gateway may terminate it) or is a byte fixture.
    pub speaks_rfb: bool,
    stats: Arc<Stats>,
    accept_loop: JoinHandle<()>,
}

impl RfbServer {
    /// Binds 127.0.0.1:0 and starts accepting; the listener is bound when this returns, so the
    /// address is connectable immediately.
    pub async fn start(mode: Mode) -> io::Result<RfbServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let speaks_rfb = matches!(mode, Mode::Rfb { .. } | Mode::CloseAfterHandshake { .. });
        let mode = Arc::new(mode);
        let accept_loop = tokio::spawn(accept_loop(listener, mode, stats.clone()));
        Ok(RfbServer {
            addr,
            speaks_rfb,
            stats,
            accept_loop,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// For tasks that outlive a borrow of the server.
    pub fn stats_arc(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

impl Drop for RfbServer {
    fn drop(&mut self) {
        // The accept loop owns the JoinSet of connections; dropping it aborts them all.
        self.accept_loop.abort();
    }
}

async fn accept_loop(listener: TcpListener, mode: Arc<Mode>, stats: Arc<Stats>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let index = stats.connections.load(Ordering::SeqCst);
                stats.bump(&stats.connections, 1);
                conns.spawn(serve(stream, index, mode.clone(), stats.clone()));
            }
            // Reap finished connections so a long test does not accumulate handles.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve(stream: TcpStream, index: u64, mode: Arc<Mode>, stats: Arc<Stats>) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut conn = Conn {
        rd,
        wr,
        hasher: Sha256::new(),
        stats: stats.clone(),
    };
    // Errors end the connection; the counters and digest are what tests look at.
    let _ = match &*mode {
        Mode::Rfb {
            name,
            width,
            height,
            rgb,
        } => serve_rfb(&mut conn, name, *width, *height, *rgb).await,
        Mode::Flood { total } => serve_flood(&mut conn, *total).await,
        Mode::Echo => serve_echo(&mut conn).await,
        Mode::CloseAfterHandshake { name } => serve_close_after_handshake(&mut conn, name).await,
    };
    let digest: [u8; 32] = conn.hasher.finalize().into();
    lock(&stats.digests).insert(index, digest);
    stats.bump(&stats.closed, 1);
}

struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    hasher: Sha256,
    stats: Arc<Stats>,
}

impl Conn {
    /// Returns 0 at EOF.
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.rd.read(buf).await?;
        self.hasher.update(&buf[..n]);
        self.stats.bump(&self.stats.bytes_read, n as u64);
        Ok(n)
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = self.read_some(&mut buf[filled..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            filled += n;
        }
        Ok(())
    }

    async fn read_u8(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b).await?;
        Ok(b[0])
    }

    async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        while n > 0 {
            let take = n.min(buf.len());
            self.read_exact(&mut buf[..take]).await?;
            n -= take;
        }
        Ok(())
    }

    async fn drain_to_eof(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; FLOOD_CHUNK];
        while self.read_some(&mut buf).await? > 0 {}
        Ok(())
    }

    async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        write_counted(&self.wr, buf, &self.stats).await
    }
}

/// try_write first and wait for writability only after a miss, so every full-buffer episode is
/// observed and counted.
async fn write_counted(wr: &OwnedWriteHalf, mut buf: &[u8], stats: &Stats) -> io::Result<()> {
    while !buf.is_empty() {
        match wr.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                stats.bump(&stats.bytes_written, n as u64);
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stats.bump(&stats.write_blocked, 1);
                stats.blocked.notify_one();
                wr.writable().await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn serve_flood(conn: &mut Conn, total: u64) -> io::Result<()> {
    let Conn {
        rd,
        wr,
        hasher,
        stats,
    } = conn;
    let send = async {
        let mut source = FloodGen::new(FLOOD_SEED);
        let mut chunk = vec![0u8; FLOOD_CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(FLOOD_CHUNK as u64) as usize;
            source.fill(&mut chunk[..n]);
            write_counted(wr, &chunk[..n], stats).await?;
            left -= n as u64;
        }
        io::Result::Ok(())
    };
    let sink = async {
        let mut buf = vec![0u8; FLOOD_CHUNK];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return io::Result::Ok(());
            }
            hasher.update(&buf[..n]);
            stats.bump(&stats.bytes_read, n as u64);
        }
    };
    // The reader decides when the connection is over; a writer error (peer gone) must not cut
    // the read digest short, and a peer that never reads must not stop the reader.
    let (sent, read) = tokio::join!(send, sink);
    read.and(sent)
}

async fn serve_echo(conn: &mut Conn) -> io::Result<()> {
    let mut buf = vec![0u8; FLOOD_CHUNK];
    loop {
        let n = conn.read_some(&mut buf).await?;
        if n == 0 {
            return conn.wr.shutdown().await;
        }
        conn.write_all(&buf[..n]).await?;
    }
}

async fn serve_close_after_handshake(conn: &mut Conn, name: &str) -> io::Result<()> {
    rfb_handshake(conn, 64, 48, name).await?;
    conn.wr.shutdown().await?;
    conn.drain_to_eof().await
}

/// The 16-byte RFB PIXEL_FORMAT, as far as this fixture can encode it (true colour only).
#[derive(Clone, Copy)]
struct PixelFormat {
    bits_per_pixel: u8,
    big_endian: bool,
    true_colour: bool,
    max: [u16; 3],
    shift: [u8; 3],
}

impl PixelFormat {
    const SERVER_DEFAULT: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        big_endian: false,
        true_colour: true,
        max: [255, 255, 255],
        shift: [16, 8, 0],
    };

    fn to_wire(self) -> [u8; 16] {
        let mut w = [0u8; 16];
        w[0] = self.bits_per_pixel;
        w[1] = 24; // depth
        w[2] = self.big_endian as u8;
        w[3] = self.true_colour as u8;
        for i in 0..3 {
            w[4 + 2 * i..6 + 2 * i].copy_from_slice(&self.max[i].to_be_bytes());
            w[10 + i] = self.shift[i];
        }
        w
    }

    fn from_wire(w: &[u8; 16]) -> PixelFormat {
        let max = |i: usize| u16::from_be_bytes([w[4 + 2 * i], w[5 + 2 * i]]);
        PixelFormat {
            bits_per_pixel: w[0],
            big_endian: w[2] != 0,
            true_colour: w[3] != 0,
            max: [max(0), max(1), max(2)],
            shift: [w[10], w[11], w[12]],
        }
    }

    fn encode(self, rgb: [u8; 3]) -> io::Result<Vec<u8>> {
        if !self.true_colour {
            return Err(io::Error::other(
                "fixture only serves true-colour pixel formats",
            ));
        }
        let mut value: u32 = 0;
        for ((c, max), shift) in rgb.into_iter().zip(self.max).zip(self.shift) {
            let scaled = (c as u32 * max as u32 + 127) / 255;
            value |= scaled.checked_shl(shift as u32).unwrap_or(0);
        }
        let bytes = match self.bits_per_pixel {
            8 => vec![value as u8],
            16 if self.big_endian => (value as u16).to_be_bytes().to_vec(),
            16 => (value as u16).to_le_bytes().to_vec(),
            32 if self.big_endian => value.to_be_bytes().to_vec(),
            32 => value.to_le_bytes().to_vec(),
            other => {
                return Err(io::Error::other(format!(
                    "unsupported bits-per-pixel {other}"
                )));
            }
        };
        Ok(bytes)
    }
}

/// Server side of the RFB handshake up to and including ServerInit. Answers a 3.3 or 3.7 client
/// in its own version (RFC 6143 §7.1.1: unknown versions are treated as 3.3).
async fn rfb_handshake(conn: &mut Conn, width: u16, height: u16, name: &str) -> io::Result<()> {
    conn.write_all(b"RFB 003.008\n").await?;
    let mut version = [0u8; 12];
    conn.read_exact(&mut version).await?;
    let minor = match &version {
        b"RFB 003.008\n" => 8,
        b"RFB 003.007\n" => 7,
        v if v.starts_with(b"RFB ") => 3,
        _ => {
            return Err(io::Error::other(
                "client did not send an RFB ProtocolVersion",
            ));
        }
    };
    if minor == 3 {
        conn.write_all(&1u32.to_be_bytes()).await?;
    } else {
        conn.write_all(&[1, 1]).await?;
        let chosen = conn.read_u8().await?;
        if chosen != 1 {
            if minor == 8 {
                let reason = b"only security type None is offered";
                let mut msg = 1u32.to_be_bytes().to_vec();
                msg.extend_from_slice(&(reason.len() as u32).to_be_bytes());
                msg.extend_from_slice(reason);
                conn.write_all(&msg).await?;
            }
            return Err(io::Error::other(format!(
                "client chose security type {chosen}"
            )));
        }
        if minor == 8 {
            conn.write_all(&0u32.to_be_bytes()).await?;
        }
    }
    let _shared = conn.read_u8().await?;

    let mut init = Vec::with_capacity(24 + name.len());
    init.extend_from_slice(&width.to_be_bytes());
    init.extend_from_slice(&height.to_be_bytes());
    init.extend_from_slice(&PixelFormat::SERVER_DEFAULT.to_wire());
    init.extend_from_slice(&(name.len() as u32).to_be_bytes());
    init.extend_from_slice(name.as_bytes());
    conn.write_all(&init).await
}

async fn serve_rfb(
    conn: &mut Conn,
    name: &str,
    width: u16,
    height: u16,
    rgb: [u8; 3],
) -> io::Result<()> {
    rfb_handshake(conn, width, height, name).await?;
    let mut format = PixelFormat::SERVER_DEFAULT;
    let counts = conn.stats.clone();
    let m = &counts.messages;
    loop {
        let mut kind = [0u8; 1];
        if conn.read_some(&mut kind).await? == 0 {
            return Ok(());
        }
        match kind[0] {
            0 => {
                let mut body = [0u8; 19];
                conn.read_exact(&mut body).await?;
                let mut wire = [0u8; 16];
                wire.copy_from_slice(&body[3..]);
                format = PixelFormat::from_wire(&wire);
                counts.bump(&m.set_pixel_format, 1);
            }
            2 => {
                let mut head = [0u8; 3];
                conn.read_exact(&mut head).await?;
                let n = u16::from_be_bytes([head[1], head[2]]) as usize;
                conn.skip(4 * n).await?;
                counts.bump(&m.set_encodings, 1);
            }
            3 => {
                let mut body = [0u8; 9];
                conn.read_exact(&mut body).await?;
                counts.bump(&m.update_requests, 1);
                if body[0] == 0 {
                    send_full_frame(conn, format, width, height, rgb).await?;
                }
            }
            4 => {
                conn.skip(7).await?;
                counts.bump(&m.key_events, 1);
            }
            5 => {
                conn.skip(5).await?;
                counts.bump(&m.pointer_events, 1);
            }
            6 => {
                let mut head = [0u8; 7];
                conn.read_exact(&mut head).await?;
                // Extended clipboard sends a negative length; its payload is |length| bytes.
                let len = i32::from_be_bytes([head[3], head[4], head[5], head[6]]);
                conn.skip(len.unsigned_abs() as usize).await?;
                counts.bump(&m.cut_text, 1);
            }
            150 => {
                // EnableContinuousUpdates: enable flag + x, y, w, h.
                conn.skip(9).await?;
                counts.bump(&m.other, 1);
            }
            248 => {
                // ClientFence: 3 padding, u32 flags, u8 length, payload.
                let mut head = [0u8; 8];
                conn.read_exact(&mut head).await?;
                conn.skip(head[7] as usize).await?;
                counts.bump(&m.other, 1);
            }
            251 => {
                // SetDesktopSize: padding, w, h, screen count, padding, 16 bytes per screen.
                let mut head = [0u8; 7];
                conn.read_exact(&mut head).await?;
                conn.skip(16 * head[5] as usize).await?;
                counts.bump(&m.other, 1);
            }
            other => {
                return Err(io::Error::other(format!(
                    "unknown RFB client message type {other}"
                )));
            }
        }
    }
}

async fn send_full_frame(
    conn: &Conn,
    format: PixelFormat,
    width: u16,
    height: u16,
    rgb: [u8; 3],
) -> io::Result<()> {
    let pixel = format.encode(rgb)?;
    let pixels = width as usize * height as usize;
    let mut msg = Vec::with_capacity(16 + pixels * pixel.len());
    msg.extend_from_slice(&[0, 0]);
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(&[0, 0, 0, 0]);
    msg.extend_from_slice(&width.to_be_bytes());
    msg.extend_from_slice(&height.to_be_bytes());
    msg.extend_from_slice(&0i32.to_be_bytes());
    for _ in 0..pixels {
        msg.extend_from_slice(&pixel);
    }
    conn.write_all(&msg).await
}

/// Deterministic byte stream (xorshift64*). The output depends only on the seed and the byte
/// offset, never on how callers slice their buffers.
#[derive(Clone)]
pub struct FloodGen {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl FloodGen {
    pub fn new(seed: u64) -> FloodGen {
        // xorshift has a fixed point at zero.
        let state = if seed == 0 { FLOOD_SEED } else { seed };
        FloodGen {
            state,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut out = buf;
        // Finish the partly consumed word first so the stream is independent of buffer sizes.
        let carry = (8 - self.used).min(out.len());
        out[..carry].copy_from_slice(&self.word[self.used..self.used + carry]);
        self.used += carry;
        out = &mut out[carry..];
        let mut words = out.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    pub fn next_chunk(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// SHA-256 of the first `total` bytes of the flood stream.
pub fn flood_stream_sha256(total: u64) -> [u8; 32] {
    let mut source = FloodGen::new(FLOOD_SEED);
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; FLOOD_CHUNK];
    let mut left = total;
    while left > 0 {
        let n = left.min(FLOOD_CHUNK as u64) as usize;
        source.fill(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        left -= n as u64;
    }
    hasher.finalize().into()
}
