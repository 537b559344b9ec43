//! One client connection, over raw TCP (`tcp://host:port`, the direct baseline), TLS
//! (`tls://host:port`, the direct-TLS ceiling) or a WebSocket (`ws://host:port/path` and
//! `wss://host:port/path`, through vncgate or websockify). All read and write plain bytes.

use std::io;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::rfb::ByteStream;
use crate::tls::{ClientTls, Negotiated, TlsTcp};

#[derive(Debug, Clone)]
pub struct Target {
    /// host:port to connect to.
    addr: String,
    /// The WebSocket URL; `None` for a raw byte stream.
    ws_url: Option<String>,
    /// `Some` for tls:// and wss://.
    tls: Option<ClientTls>,
}

impl Target {
    /// `tls` is the client side of tls:// and wss:// targets (required for them, ignored
    /// otherwise).
    pub fn parse(s: &str, tls: Option<&ClientTls>) -> Result<Target, String> {
        let (rest, ws, secure) = if let Some(r) = s.strip_prefix("tcp://") {
            (r, false, false)
        } else if let Some(r) = s.strip_prefix("tls://") {
            (r, false, true)
        } else if let Some(r) = s.strip_prefix("ws://") {
            (r, true, false)
        } else if let Some(r) = s.strip_prefix("wss://") {
            (r, true, true)
        } else {
            return Err(format!(
                "{s}: expected tcp://host:port, tls://host:port, ws://host:port/path or \
                 wss://host:port/path"
            ));
        };
        let addr = if ws {
            rest.split(['/', '?']).next().unwrap_or("")
        } else {
            rest.trim_end_matches('/')
        };
        if addr.is_empty() {
            return Err(format!("{s}: no host:port"));
        }
        let ws_url = ws.then(|| {
            if rest.len() == addr.len() {
                format!("{s}/")
            } else {
                s.to_owned()
            }
        });
        let tls = match (secure, tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t.clone()),
            (true, None) => return Err(format!("{s}: a TLS target needs --ca-file")),
        };
        Ok(Target {
            addr: addr.to_owned(),
            ws_url,
            tls,
        })
    }

    /// The same target with a TLS session cache of its own (see [`ClientTls::own_cache`]).
    pub fn own_tls_cache(&self) -> Target {
        Target {
            tls: self.tls.as_ref().map(ClientTls::own_cache),
            ..self.clone()
        }
    }

    pub fn is_ws(&self) -> bool {
        self.ws_url.is_some()
    }

    /// The URL with `token` added as the `token` query parameter (JWTs are URL-safe).
    fn url_with_token(&self, token: Option<&str>) -> String {
        match (&self.ws_url, token) {
            (Some(url), Some(t)) => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}token={t}")
            }
            (Some(url), None) => url.clone(),
            (None, _) => self.addr.clone(),
        }
    }
}

/// Four variants rather than one over a boxed stream: the plain paths keep exactly the code
/// (and cost) they were measured with before TLS existed here.
enum Inner {
    Tcp(TcpStream),
    Tls(Box<TlsTcp>),
    Ws(Box<WebSocketStream<TcpStream>>),
    Wss(Box<WebSocketStream<TlsTcp>>),
}

pub struct Conn {
    inner: Inner,
    /// Bytes received but not yet consumed (WebSocket messages do not follow RFB boundaries).
    pending: BytesMut,
    tcp_buf: Vec<u8>,
    /// What the TLS handshake negotiated (TLS targets).
    tls: Option<Negotiated>,
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

/// The next binary message's payload, `None` at the end of the stream.
async fn ws_recv<S>(ws: &mut WebSocketStream<S>) -> io::Result<Option<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
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
    }
}

/// A read into the connection's 64 KiB buffer (allocated on first use: idle sessions that
/// never read a byte stream keep none).
async fn read_some<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.is_empty() {
        *buf = vec![0u8; 64 * 1024];
    }
    s.read(buf).await
}

async fn ws_send<S>(ws: &mut WebSocketStream<S>, data: &[u8]) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Binary(Bytes::copy_from_slice(data)))
        .await
        .map_err(ws_err)
}

impl Conn {
    /// Connect, and for TLS and WebSocket targets complete the TLS handshake and the upgrade.
    /// Returns the connection and the time from the start of the TCP connect to the end of
    /// the upgrade (101 received; the end of the TLS handshake for tls://).
    pub async fn open(
        target: &Target,
        token: Option<&str>,
        read: ReadSize,
    ) -> io::Result<(Conn, Duration)> {
        let started = Instant::now();
        let tcp = TcpStream::connect(target.addr.as_str()).await?;
        tcp.set_nodelay(true)?;
        let mut negotiated = None;
        let inner = match (&target.tls, &target.ws_url) {
            (None, None) => Inner::Tcp(tcp),
            (Some(tls), None) => {
                let s = tls.connect(&target.addr, tcp).await?;
                negotiated = Some(Negotiated::of(&s));
                Inner::Tls(Box::new(s))
            }
            (None, Some(_)) => {
                let url = target.url_with_token(token);
                let (ws, _resp) =
                    tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config(read)))
                        .await
                        .map_err(ws_err)?;
                Inner::Ws(Box::new(ws))
            }
            (Some(tls), Some(_)) => {
                let s = tls.connect(&target.addr, tcp).await?;
                negotiated = Some(Negotiated::of(&s));
                let url = target.url_with_token(token);
                let (ws, _resp) =
                    tokio_tungstenite::client_async_with_config(url, s, Some(ws_config(read)))
                        .await
                        .map_err(ws_err)?;
                Inner::Wss(Box::new(ws))
            }
        };
        let elapsed = started.elapsed();
        Ok((
            Conn {
                inner,
                pending: BytesMut::new(),
                tcp_buf: Vec::new(),
                tls: negotiated,
            },
            elapsed,
        ))
    }

    /// What the TLS handshake negotiated; `None` on plain targets.
    pub fn tls(&self) -> Option<&Negotiated> {
        self.tls.as_ref()
    }

    /// Receive the next piece of data: `Ok(None)` at the end of the stream.
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        let n = match &mut self.inner {
            Inner::Tcp(s) => read_some(s, &mut self.tcp_buf).await?,
            Inner::Tls(s) => read_some(s, &mut self.tcp_buf).await?,
            Inner::Ws(ws) => return ws_recv(ws).await,
            Inner::Wss(ws) => return ws_recv(ws).await,
        };
        Ok((n > 0).then(|| Bytes::copy_from_slice(&self.tcp_buf[..n])))
    }

    /// Read whatever arrives next and throw it away; the number of payload bytes, 0 at the end.
    pub async fn discard(&mut self) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len();
            self.pending.clear();
            return Ok(n);
        }
        match &mut self.inner {
            Inner::Tcp(s) => read_some(s, &mut self.tcp_buf).await,
            Inner::Tls(s) => read_some(s, &mut self.tcp_buf).await,
            Inner::Ws(_) | Inner::Wss(_) => Ok(self.recv().await?.map_or(0, |b| b.len())),
        }
    }

    /// Send `data` (one binary message on a WebSocket).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.inner {
            Inner::Tcp(s) => s.write_all(data).await,
            // A write can leave records queued in rustls when the socket was full; the flush
            // sends them, so a round trip's message never waits in the client.
            Inner::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Inner::Ws(ws) => ws_send(ws, data).await,
            Inner::Wss(ws) => ws_send(ws, data).await,
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

    /// Close politely: a WebSocket close frame (not waiting for the answer), a TLS
    /// close_notify, or a TCP FIN.
    pub async fn close(self) {
        match self.inner {
            Inner::Tcp(mut s) => {
                let _ = s.shutdown().await;
            }
            Inner::Tls(mut s) => {
                let _ = s.shutdown().await;
            }
            Inner::Ws(mut ws) => {
                let _ = ws.send(Message::Close(None)).await;
            }
            Inner::Wss(mut ws) => {
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
        let t = Target::parse("tcp://127.0.0.1:5900", None).unwrap();
        assert_eq!(t.addr, "127.0.0.1:5900");
        assert!(!t.is_ws() && t.tls.is_none());
        let t = Target::parse("ws://127.0.0.1:6080/websockify", None).unwrap();
        assert_eq!(t.addr, "127.0.0.1:6080");
        assert_eq!(t.url_with_token(None), "ws://127.0.0.1:6080/websockify");
        let t = Target::parse("ws://127.0.0.1:6080", None).unwrap();
        assert_eq!(t.url_with_token(None), "ws://127.0.0.1:6080/");
        let t = Target::parse("ws://h:1/websockify", None).unwrap();
        assert_eq!(
            t.url_with_token(Some("abc")),
            "ws://h:1/websockify?token=abc"
        );
        assert!(Target::parse("http://x", None).is_err());
        // TLS targets cannot be opened without the client's trust anchor.
        assert!(Target::parse("wss://127.0.0.1:8443/websockify", None).is_err());
        assert!(Target::parse("tls://127.0.0.1:5901", None).is_err());
    }
}
