//! One client connection, over raw TCP (`tcp://host:port`, the direct baseline) or a WebSocket
//! (`ws://host:port/path`, through vncgate or websockify). Both read and write plain bytes.

use std::io;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::rfb::ByteStream;

#[derive(Debug, Clone)]
pub enum Target {
    Tcp { addr: String },
    Ws { addr: String, url: String },
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let addr = rest.trim_end_matches('/').to_owned();
            if addr.is_empty() {
                return Err(format!("{s}: no host:port"));
            }
            Ok(Target::Tcp { addr })
        } else if let Some(rest) = s.strip_prefix("ws://") {
            let addr = rest.split(['/', '?']).next().unwrap_or("").to_owned();
            if addr.is_empty() {
                return Err(format!("{s}: no host:port"));
            }
            let url = if rest.len() == addr.len() {
                format!("{s}/")
            } else {
                s.to_owned()
            };
            Ok(Target::Ws { addr, url })
        } else {
            Err(format!(
                "{s}: expected tcp://host:port or ws://host:port/path"
            ))
        }
    }

    pub fn is_ws(&self) -> bool {
        matches!(self, Target::Ws { .. })
    }

    /// The URL with `token` added as the `token` query parameter (JWTs are URL-safe).
    fn url_with_token(&self, token: Option<&str>) -> String {
        match (self, token) {
            (Target::Ws { url, .. }, Some(t)) => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}token={t}")
            }
            (Target::Ws { url, .. }, None) => url.clone(),
            (Target::Tcp { addr }, _) => addr.clone(),
        }
    }
}

enum Inner {
    Tcp(TcpStream),
    Ws(Box<WebSocketStream<TcpStream>>),
}

pub struct Conn {
    inner: Inner,
    /// Bytes received but not yet consumed (WebSocket messages do not follow RFB boundaries).
    pending: BytesMut,
    tcp_buf: Vec<u8>,
}

/// How a connection reads: tungstenite zero-fills the unused part of its read buffer on every
/// read, so a session that only exchanges small messages reads into a small one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSize {
    /// tungstenite's default (128 KiB): fewest reads for a stream of large updates.
    Bulk,
    /// 8 KiB: round trips of small messages.
    Small,
}

fn ws_config(read: ReadSize) -> WebSocketConfig {
    let read_buffer = match read {
        ReadSize::Bulk => 128 * 1024,
        ReadSize::Small => 8 * 1024,
    };
    // Frames go out on every send (like a browser); reads are bounded like noVNC's queue.
    WebSocketConfig::default()
        .write_buffer_size(0)
        .read_buffer_size(read_buffer)
        .max_message_size(Some(64 << 20))
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl Conn {
    /// Connect, and for WebSocket targets complete the upgrade. Returns the connection and the
    /// time from the start of the TCP connect to the end of the upgrade (101 received).
    pub async fn open(
        target: &Target,
        token: Option<&str>,
        read: ReadSize,
    ) -> io::Result<(Conn, Duration)> {
        let started = Instant::now();
        let addr = match target {
            Target::Tcp { addr } | Target::Ws { addr, .. } => addr,
        };
        let tcp = TcpStream::connect(addr.as_str()).await?;
        tcp.set_nodelay(true)?;
        let inner = match target {
            Target::Tcp { .. } => Inner::Tcp(tcp),
            Target::Ws { .. } => {
                let url = target.url_with_token(token);
                let (ws, _resp) =
                    tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config(read)))
                        .await
                        .map_err(ws_err)?;
                Inner::Ws(Box::new(ws))
            }
        };
        let elapsed = started.elapsed();
        Ok((
            Conn {
                inner,
                pending: BytesMut::new(),
                tcp_buf: Vec::new(),
            },
            elapsed,
        ))
    }

    /// Receive the next piece of data: `Ok(None)` at the end of the stream.
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match &mut self.inner {
            Inner::Tcp(s) => {
                if self.tcp_buf.is_empty() {
                    self.tcp_buf = vec![0u8; 64 * 1024];
                }
                let n = s.read(&mut self.tcp_buf).await?;
                Ok((n > 0).then(|| Bytes::copy_from_slice(&self.tcp_buf[..n])))
            }
            Inner::Ws(ws) => loop {
                match ws.next().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(ws_err(e)),
                    Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                    Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text frame received",
                        ));
                    }
                    Some(Ok(_)) => continue,
                }
            },
        }
    }

    /// Read whatever arrives next and throw it away; the number of payload bytes, 0 at the end.
    pub async fn discard(&mut self) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len();
            self.pending.clear();
            return Ok(n);
        }
        match &mut self.inner {
            Inner::Tcp(s) => {
                if self.tcp_buf.is_empty() {
                    self.tcp_buf = vec![0u8; 64 * 1024];
                }
                s.read(&mut self.tcp_buf).await
            }
            Inner::Ws(_) => Ok(self.recv().await?.map_or(0, |b| b.len())),
        }
    }

    /// Send `data` (one binary message on a WebSocket).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.inner {
            Inner::Tcp(s) => s.write_all(data).await,
            Inner::Ws(ws) => ws
                .send(Message::Binary(Bytes::copy_from_slice(data)))
                .await
                .map_err(ws_err),
        }
    }

    /// Wait until exactly `n` bytes have arrived and drop them (echo replies).
    pub async fn consume(&mut self, n: usize) -> io::Result<()> {
        while self.pending.len() < n {
            match self.recv().await? {
                Some(b) => self.pending.extend_from_slice(&b),
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        self.pending.advance(n);
        Ok(())
    }

    /// Close politely: a WebSocket close frame (not waiting for the answer), or a TCP FIN.
    pub async fn close(self) {
        match self.inner {
            Inner::Tcp(mut s) => {
                let _ = s.shutdown().await;
            }
            Inner::Ws(mut ws) => {
                let _ = ws.send(Message::Close(None)).await;
            }
        }
    }
}

impl ByteStream for Conn {
    async fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.pending.len() < n {
            match self.recv().await? {
                Some(b) => self.pending.extend_from_slice(&b),
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        Ok(self.pending.split_to(n).to_vec())
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.send(data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert!(
            matches!(Target::parse("tcp://127.0.0.1:5900"), Ok(Target::Tcp { addr }) if addr == "127.0.0.1:5900")
        );
        match Target::parse("ws://127.0.0.1:6080/websockify").unwrap() {
            Target::Ws { addr, url } => {
                assert_eq!(addr, "127.0.0.1:6080");
                assert_eq!(url, "ws://127.0.0.1:6080/websockify");
            }
            _ => panic!(),
        }
        let t = Target::parse("ws://127.0.0.1:6080").unwrap();
        assert_eq!(t.url_with_token(None), "ws://127.0.0.1:6080/");
        let t = Target::parse("ws://h:1/websockify").unwrap();
        assert_eq!(
            t.url_with_token(Some("abc")),
            "ws://h:1/websockify?token=abc"
        );
        assert!(Target::parse("http://x").is_err());
    }
}
