//! A plain-TCP client socket shared by tungstenite and the zero-copy writer of [`super::splice`].
//!
//! tungstenite reads the client's frames and writes control frames (pings, the close, and the
//! pongs it sends by itself while reading); the splice writer puts backend bytes on the same
//! socket as data frames without them ever entering user space. Two writers on one byte stream
//! need a rule: while the splice writer has a frame open (header sent, payload not all moved),
//! tungstenite's writes wait at a gate, so nothing lands inside a frame. tungstenite buffers a
//! refused write and retries it, and the gate wakes it when the frame is complete.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client's TCP socket and the gate between its two writers.
#[derive(Debug)]
pub struct ClientSocket {
    tcp: TcpStream,
    frame_open: AtomicBool,
    /// The tungstenite write that found the gate closed.
    waiting: AtomicWaker,
    /// Bytes the splice writer has put on the socket: progress, for the stall deadline.
    spliced: AtomicU64,
}

impl ClientSocket {
    /// Take the socket of an accepted plain-TCP connection out of Pingora's stream. Pingora's
    /// `l4::Stream` does not give its tokio socket away, so the descriptor is duplicated and the
    /// original closed with the stream: the connection itself is untouched.
    pub fn take(stream: pingora_core::protocols::Stream) -> Result<Arc<Self>, TakeError> {
        use pingora_core::protocols::l4::stream::Stream as L4Stream;
        if !stream.as_any().is::<L4Stream>() {
            return Err(TakeError::NotPlainTcp(stream));
        }
        let l4 = stream
            .into_any()
            .downcast::<L4Stream>()
            .map_err(|_| TakeError::Io(io::Error::other("stream type changed")))?;
        // SAFETY: the descriptor belongs to `l4`, which is alive until the end of this function.
        let fd = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) };
        let owned: OwnedFd = fd.try_clone_to_owned().map_err(TakeError::Io)?;
        let std = std::net::TcpStream::from(owned);
        std.set_nonblocking(true).map_err(TakeError::Io)?;
        let tcp = TcpStream::from_std(std).map_err(TakeError::Io)?;
        drop(l4);
        Ok(Arc::new(ClientSocket {
            tcp,
            frame_open: AtomicBool::new(false),
            waiting: AtomicWaker::new(),
            spliced: AtomicU64::new(0),
        }))
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }

    /// Close the gate: from now on tungstenite's writes wait.
    pub(super) fn open_frame(&self) {
        self.frame_open.store(true, Ordering::Release);
    }

    /// Open the gate and wake a write that waited at it.
    pub(super) fn close_frame(&self) {
        self.frame_open.store(false, Ordering::Release);
        self.waiting.wake();
    }

    pub(super) fn add_progress(&self, n: usize) {
        self.spliced.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Grows whenever the client's socket accepts spliced bytes.
    pub fn progress(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    pub(super) fn is_frame_open(&self) -> bool {
        self.frame_open.load(Ordering::Acquire)
    }

    fn poll_gate(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_frame_open() {
            return Poll::Ready(());
        }
        self.waiting.register(cx.waker());
        // Checked again after registering, so a frame closed in between is not missed.
        if self.is_frame_open() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

#[derive(Debug)]
pub enum TakeError {
    /// TLS, or anything that is not Pingora's plain TCP stream: handed back untouched.
    NotPlainTcp(pingora_core::protocols::Stream),
    Io(io::Error),
}

/// The side of a [`ClientSocket`] that tungstenite owns.
#[derive(Debug)]
pub struct Gated(pub Arc<ClientSocket>);

impl AsyncRead for Gated {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other.map(|_| ())),
            }
        }
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.0.poll_gate(cx));
        let tcp = &self.0.tcp;
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            match tcp.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.0.poll_gate(cx));
        let tcp = &self.0.tcp;
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            match tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: every accepted write is already in the kernel.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.0.poll_gate(cx));
        let done =
            nix::sys::socket::shutdown(self.0.tcp.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Poll::Ready(match done {
            // Already reset by the peer: there is nothing left to shut.
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        })
    }
}
