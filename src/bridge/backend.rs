//! The backend side of a bridge: raw RFB over TCP, or a WebSocket-native backend. Both are read
//! as chunks of bytes and written as chunks, so the pumps in [`super`] do not care which.

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::fairness;

/// How much one backend read into user space may take (less while many streams move bulk
/// data: [`fairness::chunk_cap`] keeps a round over them short on the copying path too, as on
/// the zero-copy one; on `wss://`, where nothing is spliced, 100 streams of 64 KiB chunks made
/// a round of ~5 ms and an interactive session's p50 6 ms): 64 KiB less the 4-byte header of a
/// WebSocket frame of that size, so a whole frame is 64 KiB, exactly four full TLS records on a
/// `wss://` listener (rustls takes 64 KiB of plaintext per write). With a 64 KiB payload the
/// frame's 10-byte header overflowed into a fifth, 32-byte record: a bulk session sent one
/// tiny record (and `writev`) per four full ones, 6,179 against 24,716 in one measured run.
/// 64 KiB also matches the kernel's usual TCP window growth steps, keeps a framebuffer update
/// in a few frames, and bounds the bytes held per direction on the copying path (the buffer is
/// only refilled after its bytes were sent). Spliced chunks are bounded by
/// [`super::fairness::MAX_CHUNK`] instead.
pub const READ_CHUNK: usize = 64 * 1024 - 4;

pub trait BackendRead: Send {
    /// The next chunk, or `None` when the backend closed its side.
    fn read_chunk(
        &mut self,
        buf: &mut BytesMut,
    ) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;

    /// The TCP reader behind this backend, whose bytes can be spliced to the client.
    fn as_tcp(&mut self) -> Option<&mut TcpRead> {
        None
    }
}

pub trait BackendWrite: Send {
    fn write_chunk(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Tell the backend the client is gone (TCP FIN / WebSocket close).
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// The smallest read: an idle desktop's session holds only this much between updates.
const MIN_CHUNK: usize = 4 * 1024;

/// From this read size on the traffic counts as bulk and is spliced where possible
/// ([`super::splice`]); below it, one copy costs less than the extra system calls.
const BULK_CHUNK: usize = READ_CHUNK / 2;

pub struct TcpRead {
    half: OwnedReadHalf,
    /// The current read size, adapted to the traffic: doubled while reads fill it (a
    /// framebuffer burst), halved while they use under a quarter of it (idle, input echoes).
    chunk: usize,
}

pub struct TcpWrite(pub OwnedWriteHalf);

pub fn tcp(stream: TcpStream) -> (TcpRead, TcpWrite) {
    let (r, w) = stream.into_split();
    (
        TcpRead {
            half: r,
            chunk: MIN_CHUNK,
        },
        TcpWrite(w),
    )
}

impl BackendRead for TcpRead {
    async fn read_chunk(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        if buf.is_empty() && self.chunk == MIN_CHUNK {
            // Idle or interactive: wait without a buffer, so 10,000 idle sessions do not hold
            // 40 MiB of empty ones. A 4 KiB allocation per small chunk costs about 0.1 µs of a
            // round trip of tens of µs; bulk streams (larger chunks) keep theirs.
            *buf = BytesMut::new();
            self.half.readable().await?;
        } else if buf.is_empty() && buf.capacity() > self.chunk * 4 {
            // After a burst, give the large allocation back rather than keep 64 KiB per session.
            *buf = BytesMut::new();
        }
        // `split().freeze()` hands the bytes to the WebSocket layer; once that frame is written
        // the `Bytes` is dropped and this `reserve` reclaims the same allocation, so a stream
        // allocates nothing per chunk.
        let want = self.chunk.min(fairness::chunk_cap());
        buf.reserve(want);
        let n = (&mut self.half).take(want as u64).read_buf(buf).await?;
        self.adapt(n);
        Ok((n > 0).then(|| buf.split().freeze()))
    }

    fn as_tcp(&mut self) -> Option<&mut TcpRead> {
        Some(self)
    }
}

impl TcpRead {
    /// Follow the traffic after a read of `n` bytes.
    pub fn adapt(&mut self, n: usize) {
        if n >= self.chunk {
            self.chunk = (self.chunk * 2).min(READ_CHUNK);
        } else if n < self.chunk / 4 {
            self.chunk = (self.chunk / 2).max(MIN_CHUNK);
        }
    }

    /// Reads have been filling large chunks: a framebuffer burst rather than input echoes.
    pub fn is_bulk(&self) -> bool {
        self.chunk >= BULK_CHUNK
    }

    pub fn socket(&self) -> &TcpStream {
        self.half.as_ref()
    }
}

impl BackendWrite for TcpWrite {
    async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await
    }

    async fn shutdown(&mut self) {
        // Best effort: the backend may already be gone.
        let _ = self.0.shutdown().await;
    }
}

/// Any other byte stream (TLS to a VeNCrypt backend): read in chunks of up to [`READ_CHUNK`].
pub struct IoRead<T>(tokio::io::ReadHalf<T>);
pub struct IoWrite<T>(tokio::io::WriteHalf<T>);

pub fn stream<T: AsyncRead + AsyncWrite + Send>(s: T) -> (IoRead<T>, IoWrite<T>) {
    let (r, w) = tokio::io::split(s);
    (IoRead(r), IoWrite(w))
}

impl<T: AsyncRead + Send> BackendRead for IoRead<T> {
    async fn read_chunk(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        let want = READ_CHUNK.min(fairness::chunk_cap());
        buf.reserve(want);
        let n = (&mut self.0).take(want as u64).read_buf(buf).await?;
        Ok((n > 0).then(|| buf.split().freeze()))
    }
}

impl<T: AsyncWrite + Send> BackendWrite for IoWrite<T> {
    async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await?;
        self.0.flush().await
    }

    async fn shutdown(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

pub struct WsRead(pub SplitStream<WebSocketStream<TcpStream>>);
pub struct WsWrite(pub SplitSink<WebSocketStream<TcpStream>, Message>);

pub fn websocket(ws: WebSocketStream<TcpStream>) -> (WsRead, WsWrite) {
    let (sink, stream) = ws.split();
    (WsRead(stream), WsWrite(sink))
}

impl BackendRead for WsRead {
    async fn read_chunk(&mut self, _buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        loop {
            match self.0.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Binary(data))) => return Ok(Some(data)),
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "backend sent a text frame",
                    ));
                }
                // Pings are answered by tungstenite itself; pongs and raw frames carry no RFB.
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }
}

impl BackendWrite for WsWrite {
    async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        self.0
            .send(Message::Binary(data))
            .await
            .map_err(io::Error::other)
    }

    async fn shutdown(&mut self) {
        let _ = self.0.close().await;
    }
}
