//! Data frames on the copying path (TLS clients, recorded or filtered sessions), written
//! without tungstenite's copy.
//!
//! tungstenite copies every message into its frame buffer before writing it, and rustls then
//! copies the plaintext again into the record it encrypts: a profile of 8 `wss://` bulk
//! streams put 4.9 % of the gateway's CPU in tungstenite's copy and 3.3 % in rustls'. The
//! writer here hands the frame header and the backend chunk to the stream as two slices of one
//! vectored write, so rustls' copy is the only one (rustls, tokio-rustls and Pingora's TLS
//! stream all take vectored writes).
//!
//! tungstenite keeps the stream for reading and for its control frames (pings, the pongs it
//! answers while reading, the close). Two writers on one byte stream need the rule of
//! [`super::client`]: while a data frame is open (header accepted, payload not all), the
//! writes of tungstenite's side wait at a gate, so nothing lands inside a frame. Unlike a
//! plain TCP socket, a TLS stream needs `&mut` for every call, so the two sides share it behind
//! a mutex; both are polled by the one task of the session, so the lock is never contended.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use pingora_core::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::splice::encode_header;

/// Split a client stream into tungstenite's side and the data frame writer.
pub fn share(stream: Stream) -> (ControlSide, FrameWriter) {
    let shared = Arc::new(Mutex::new(Shared {
        stream,
        frame_open: false,
        waiting: None,
    }));
    (
        ControlSide(Arc::clone(&shared)),
        FrameWriter {
            shared,
            header: [0; 10],
            header_len: 0,
            header_sent: 0,
            payload: Bytes::new(),
        },
    )
}

struct Shared {
    stream: Stream,
    /// A data frame was started and not finished: tungstenite's writes wait.
    frame_open: bool,
    /// The tungstenite write that found the gate closed.
    waiting: Option<Waker>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while the lock was held ended the session's task; nothing else can see the state.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The side of the client stream that tungstenite owns.
pub struct ControlSide(Arc<Mutex<Shared>>);

impl ControlSide {
    /// Wait while a data frame is open.
    fn poll_gate(shared: &mut Shared, cx: &mut Context<'_>) -> Poll<()> {
        if shared.frame_open {
            shared.waiting = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl AsyncRead for ControlSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.0);
        ready!(Self::poll_gate(&mut shared, cx));
        Pin::new(&mut shared.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Not gated: a flush only pushes out what was already written, whole frames or the
        // accepted part of an open one.
        Pin::new(&mut lock(&self.0).stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        ready!(Self::poll_gate(&mut shared, cx));
        Pin::new(&mut shared.stream).poll_shutdown(cx)
    }
}

/// Writes backend chunks to the client as binary frames.
pub struct FrameWriter {
    shared: Arc<Mutex<Shared>>,
    header: [u8; 10],
    header_len: usize,
    header_sent: usize,
    /// What the open frame has yet to write (empty when no frame is open).
    payload: Bytes,
}

impl FrameWriter {
    /// Send `data` as one binary frame and flush it. tungstenite must have nothing buffered
    /// (the caller flushed it): its writes wait from here until the frame is complete.
    /// Refused while a cancelled send's frame is still open: starting another would cut that
    /// one short mid-payload and the client would read the rest as garbage. The bridge never
    /// does this (a cancelled pump ends, then `finish` completes the frame); this keeps a
    /// future caller from corrupting a stream by mistake.
    pub async fn send(&mut self, data: Bytes) -> io::Result<()> {
        {
            let mut shared = lock(&self.shared);
            if shared.frame_open {
                return Err(io::Error::other("a frame is still open: finish it first"));
            }
            shared.frame_open = true;
        }
        self.header_len = encode_header(&mut self.header, data.len());
        self.header_sent = 0;
        self.payload = data;
        self.finish().await
    }

    /// Whether a frame was started and not finished (the pump was cancelled mid-frame).
    pub fn frame_open(&self) -> bool {
        lock(&self.shared).frame_open
    }

    /// Continue the open frame (if any) until the stream took all of it, then flush.
    /// Cancel-safe: the progress is kept here, so a later call resumes where this one stopped.
    pub async fn finish(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_finish(cx)).await
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        while shared.frame_open {
            let header = &self.header[self.header_sent..self.header_len];
            let slices = [IoSlice::new(header), IoSlice::new(&self.payload)];
            let n = ready!(Pin::new(&mut shared.stream).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_header = n.min(header.len());
            self.header_sent += from_header;
            // `split_to` on the rest never copies: the frame keeps the backend's allocation.
            let _ = self
                .payload
                .split_to((n - from_header).min(self.payload.len()));
            if self.header_sent == self.header_len && self.payload.is_empty() {
                shared.frame_open = false;
                if let Some(waker) = shared.waiting.take() {
                    waker.wake();
                }
            }
        }
        Pin::new(&mut shared.stream).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::l4::stream::Stream as L4Stream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of real sockets: the gateway's side as Pingora's stream, and the peer.
    async fn pair() -> (Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let stream: Stream = Box::new(L4Stream::from(client.unwrap()));
        (stream, accepted.unwrap().0)
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut header = [0; 10];
        let n = encode_header(&mut header, payload.len());
        [&header[..n], payload].concat()
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order() {
        let (stream, mut peer) = pair().await;
        let (_control, mut writer) = share(stream);
        let small = Bytes::from_static(b"hello");
        let large = Bytes::from(vec![7u8; 70_000]);
        writer.send(small.clone()).await.unwrap();
        writer.send(large.clone()).await.unwrap();
        let want = [frame(&small), frame(&large)].concat();
        let mut got = vec![0; want.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        assert!(!writer.frame_open());
    }

    /// A peer that reads nothing fills the socket mid-frame; tungstenite's write (a pong, say)
    /// must wait for the frame, and the bytes arrive frame after frame.
    #[tokio::test]
    async fn a_control_write_waits_for_the_open_frame() {
        let (stream, mut peer) = pair().await;
        let (mut control, mut writer) = share(stream);
        // Far more than the two sockets' buffers hold, so the send stops mid-frame.
        let big = Bytes::from((0..32 * 1024 * 1024).map(|i| i as u8).collect::<Vec<u8>>());
        let mut send = Box::pin(writer.send(big.clone()));
        assert!(futures_util::poll!(send.as_mut()).is_pending());
        let pong = [0x8a, 0x00];
        let mut control_write = Box::pin(control.write_all(&pong));
        assert!(futures_util::poll!(control_write.as_mut()).is_pending());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        send.await.unwrap();
        control_write.await.unwrap();
        control.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got, [frame(&big), pong.to_vec()].concat());
    }

    /// Start a frame far larger than the sockets' buffers hold and cancel its send mid-frame,
    /// as a pump cancelled by the session's end or a stall deadline leaves it.
    async fn cancel_a_big_send(writer: &mut FrameWriter) -> Bytes {
        let big = Bytes::from(vec![1u8; 16 * 1024 * 1024]);
        let mut send = Box::pin(writer.send(big.clone()));
        assert!(futures_util::poll!(send.as_mut()).is_pending());
        big
    }

    /// Read one frame's worth off `peer`: whether it is exactly `payload`'s frame.
    fn read_frame(mut peer: TcpStream, payload: &[u8]) -> tokio::task::JoinHandle<bool> {
        let expected = frame(payload);
        tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            peer.read_exact(&mut got).await.unwrap();
            got == expected
        })
    }

    /// The pump can be cancelled mid-frame (the session ends, a stall deadline); the frame is
    /// then completed by `finish`, before anything else is written.
    #[tokio::test]
    async fn a_cancelled_send_is_completed_by_finish() {
        let (stream, peer) = pair().await;
        let (_control, mut writer) = share(stream);
        let big = cancel_a_big_send(&mut writer).await;
        assert!(writer.frame_open());
        let whole = read_frame(peer, &big);
        writer.finish().await.unwrap();
        assert!(!writer.frame_open());
        assert!(whole.await.unwrap());
    }

    /// A second send over the open frame would cut it short mid-payload: it is refused, and
    /// `finish` still completes the first.
    #[tokio::test]
    async fn a_send_over_a_cancelled_frame_is_refused_and_the_frame_kept() {
        let (stream, peer) = pair().await;
        let (_control, mut writer) = share(stream);
        let big = cancel_a_big_send(&mut writer).await;
        // The peer reads from here on, so a send that wrongly went ahead would complete.
        let whole = read_frame(peer, &big);
        let err = writer.send(Bytes::from_static(b"next")).await.unwrap_err();
        assert!(err.to_string().contains("still open"), "{err}");
        writer.finish().await.unwrap();
        assert!(whole.await.unwrap());
    }
}
