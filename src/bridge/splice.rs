//! Zero-copy backend -> client data frames for plain-TCP clients and TCP backends.
//!
//! Server -> client WebSocket frames are not masked, so a data frame is a 2–10 byte header
//! followed by the backend's bytes unchanged. For bulk traffic (framebuffer updates) the bytes
//! are moved with splice(2): backend socket -> pipe -> client socket. The kernel passes page
//! references instead of copying: no `recv` copy into user space, no `send` copy out of it, and
//! none of tungstenite's own copy into its frame buffer. Profiles of the copying relay put
//! about a third of the gateway's CPU in those copies (see BENCHMARKS.md).
//!
//! Written by hand because no maintained crate splices into a framed protocol; `nix` provides
//! the system calls. The pipe holds at most one chunk, so memory and backpressure behave as in
//! the copying path: the next backend read happens only after the client took the whole frame.
//! Small reads (interactive traffic) keep the copying path: one `recv` and one `send` are
//! fewer system calls than two splices and a header write. A pipe costs two descriptors, so a
//! session holds one only while it streams in bulk.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{MsgFlags, send};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::client::ClientSocket;
use super::fairness;

/// The client socket's zero-copy writer; lives as long as the session.
pub struct Splicer {
    client: Arc<ClientSocket>,
    pipe: Option<Pipe>,
    /// Set for good when the kernel refuses splice on these sockets (then the session copies).
    unsupported: bool,
    header: [u8; 10],
    header_len: usize,
    header_sent: usize,
    /// Bytes of the open frame still in the pipe.
    payload_left: usize,
}

/// What one [`Splicer::fill`] did.
pub enum Fill {
    /// This many bytes wait in the pipe.
    Moved(usize),
    /// The backend closed its side.
    Closed,
    /// No splicing for this session (no pipe to be had, or the kernel refuses): copy instead.
    Unsupported,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes it holds when full (what the kernel granted).
    capacity: usize,
}

impl Splicer {
    pub fn client(&self) -> &Arc<ClientSocket> {
        &self.client
    }

    pub fn new(client: Arc<ClientSocket>) -> Self {
        Splicer {
            client,
            pipe: None,
            unsupported: false,
            header: [0; 10],
            header_len: 0,
            header_sent: 0,
            payload_left: 0,
        }
    }

    /// Whether a frame was started and not finished (the pump was cancelled mid-frame).
    pub fn frame_open(&self) -> bool {
        self.client.is_frame_open()
    }

    /// Give the pipe back when the stream turned interactive; the descriptors matter with
    /// thousands of mostly idle sessions.
    pub fn release_pipe(&mut self) {
        if self.payload_left == 0 && !self.frame_open() {
            self.pipe = None;
        }
    }

    /// Move one chunk (at most [`fairness::chunk_cap`]) from the backend socket into the pipe.
    pub async fn fill(&mut self, backend: &TcpStream) -> io::Result<Fill> {
        if self.unsupported {
            return Ok(Fill::Unsupported);
        }
        let cap = fairness::chunk_cap();
        if self.pipe.is_none() {
            match Pipe::new(cap) {
                Ok(pipe) => self.pipe = Some(pipe),
                // Out of descriptors, most likely: copying still works.
                Err(_) => return Ok(Fill::Unsupported),
            }
        }
        let Some(pipe) = &self.pipe else {
            return Ok(Fill::Unsupported);
        };
        let max = cap.min(pipe.capacity);
        loop {
            backend.readable().await?;
            let moved = backend.try_io(Interest::READABLE, || {
                splice(
                    backend.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    max,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match moved {
                Ok(0) => return Ok(Fill::Closed),
                Ok(n) => return Ok(Fill::Moved(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if is_unsupported(&e) => {
                    self.unsupported = true;
                    self.pipe = None;
                    return Ok(Fill::Unsupported);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Start the data frame for the `n` bytes [`Self::fill`] put in the pipe, and send it.
    /// tungstenite must have nothing buffered (the caller flushed it): its writes wait from
    /// here until the frame is complete.
    pub async fn send_frame(&mut self, n: usize) -> io::Result<()> {
        self.header_len = encode_header(&mut self.header, n);
        self.header_sent = 0;
        self.payload_left = n;
        self.client.open_frame();
        self.finish_frame().await
    }

    /// Continue the open frame until the client's socket has taken all of it. Cancel-safe: the
    /// progress is kept here, so a later call resumes where this one stopped.
    pub async fn finish_frame(&mut self) -> io::Result<()> {
        let tcp = self.client.tcp();
        while self.header_sent < self.header_len {
            tcp.writable().await?;
            let rest = &self.header[self.header_sent..self.header_len];
            // MSG_MORE: the header waits for its payload instead of leaving as its own packet.
            let sent = tcp.try_io(Interest::WRITABLE, || {
                send(
                    tcp.as_raw_fd(),
                    rest,
                    // nix has no name for MSG_MORE.
                    MsgFlags::from_bits_retain(libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(k) => {
                    self.header_sent += k;
                    self.client.add_progress(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        while self.payload_left > 0 {
            let Some(pipe) = &self.pipe else {
                return Err(io::Error::other("pipe gone with a frame open"));
            };
            tcp.writable().await?;
            // A client gone away makes this EPIPE and raises SIGPIPE (splice into a socket
            // takes no MSG_NOSIGNAL); Rust's runtime ignores SIGPIPE, so only the error remains.
            let moved = tcp.try_io(Interest::WRITABLE, || {
                splice(
                    pipe.read.as_fd(),
                    None,
                    self.client.fd(),
                    None,
                    self.payload_left,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match moved {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.payload_left -= k;
                    self.client.add_progress(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        self.client.close_frame();
        Ok(())
    }
}

impl Pipe {
    /// A pipe that can hold `want` bytes if the kernel allows it. A pipe's slots are page
    /// references, and one splice from a socket uses a slot per fragment, so the default 16
    /// slots often cut a chunk short. Beyond `fs.pipe-max-size` or a user's
    /// `fs.pipe-user-pages-soft` the kernel refuses the size and the default stays.
    fn new(want: usize) -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        if want > DEFAULT_PIPE_BYTES {
            let want = i32::try_from(want.next_power_of_two()).unwrap_or(i32::MAX);
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(want));
        }
        // What the kernel granted: over a user's soft limit even a new pipe gets fewer slots.
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(PAGE_BYTES);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Linux's default pipe size (16 pages).
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;
/// The least a pipe holds.
const PAGE_BYTES: usize = 4 * 1024;

/// A binary frame header, FIN set, unmasked (server to client), for `len` payload bytes.
pub(super) fn encode_header(out: &mut [u8; 10], len: usize) -> usize {
    out[0] = 0x82;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// What the kernel answers when these descriptors cannot be spliced (an old kernel, a sandbox
/// such as gVisor, a socket type without splice support).
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::encode_header;

    #[test]
    fn headers_use_the_shortest_length_form() {
        let mut h = [0u8; 10];
        assert_eq!(encode_header(&mut h, 125), 2);
        assert_eq!(&h[..2], &[0x82, 125]);
        assert_eq!(encode_header(&mut h, 126), 4);
        assert_eq!(&h[..4], &[0x82, 126, 0, 126]);
        assert_eq!(encode_header(&mut h, 65535), 4);
        assert_eq!(&h[..4], &[0x82, 126, 0xff, 0xff]);
        assert_eq!(encode_header(&mut h, 65536), 10);
        assert_eq!(&h[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }
}
