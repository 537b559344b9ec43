//! The browser side of the gateway, as a test sees it: a WebSocket client (plain or TLS) and the
//! client half of RFB spoken inside binary WebSocket messages, with no assumption about how the
//! RFB byte stream is cut into messages.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::UrlError;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::header::{
    CONTENT_LENGTH, HeaderName, HeaderValue, SEC_WEBSOCKET_PROTOCOL, TRANSFER_ENCODING,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::rfb_server::{FLOOD_SEED, FloodGen};

/// Bounds how long an error response's body may take to arrive after its header.
const ERROR_BODY_DEADLINE: Duration = Duration::from_secs(5);
/// Bounds how long `read_close` waits for the server to drop TCP after the Close exchange.
const CLOSE_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

pub struct WsConnect {
    /// `ws://` or `wss://`; TLS is used exactly when `tls` is set.
    pub url: String,
    /// Each name given here replaces the default header of that name; repeated names append.
    pub headers: Vec<(String, String)>,
    /// Sent as one `Sec-WebSocket-Protocol` header. tungstenite then fails the handshake when
    /// the 101 selects none of them, as Chromium does.
    pub subprotocols: Vec<String>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Bytes written right after the TCP connect, before TLS and HTTP (a PROXY header).
    pub preamble: Vec<u8>,
    /// The local address to connect from (another loopback address is another client).
    pub from: Option<std::net::IpAddr>,
}

impl WsConnect {
    pub fn new(url: impl Into<String>) -> WsConnect {
        WsConnect {
            url: url.into(),
            headers: Vec::new(),
            subprotocols: Vec::new(),
            tls: None,
            preamble: Vec::new(),
            from: None,
        }
    }
}

/// A TCP connection to `port` on 127.0.0.1 from `from` (any 127.0.0.0/8 address is local).
pub async fn connect_from(from: std::net::IpAddr, port: u16) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// TCP or TLS under the WebSocket. Shared behind a mutex only so `connect` can keep reading a
/// rejected handshake's body after tungstenite has consumed the stream; the lock is never
/// contended.
pub struct ClientStream {
    inner: Arc<Mutex<Transport>>,
}

pub type WsClient = WebSocketStream<ClientStream>;

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(*lock(&self.inner), Transport::Tls(_))
    }

    /// The ALPN protocol the TLS server selected, if any.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        match &*lock(&self.inner) {
            Transport::Plain(_) => None,
            Transport::Tls(s) => s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
        }
    }

    fn share(&self) -> ClientStream {
        ClientStream {
            inner: self.inner.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut *lock(&self.inner) {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut *lock(&self.inner) {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *lock(&self.inner) {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *lock(&self.inner) {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens TCP (and TLS when `c.tls` is set) and performs the WebSocket handshake. A non-101 answer
/// comes back as `WsError::Http` whose body has been read in full (Content-Length, chunked, or
/// until close): tungstenite alone keeps only what arrived in the same read as the header.
pub async fn connect(c: &WsConnect) -> Result<(WsClient, Response), WsError> {
    let mut request = c.url.as_str().into_client_request()?;
    let mut custom = Vec::with_capacity(c.headers.len());
    for (name, value) in &c.headers {
        custom.push((
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        ));
    }
    for (name, _) in &custom {
        request.headers_mut().remove(name);
    }
    for (name, value) in custom {
        request.headers_mut().append(name, value);
    }
    if !c.subprotocols.is_empty() {
        let offered = HeaderValue::from_str(&c.subprotocols.join(", "))?;
        request
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, offered);
    }

    let uri = request.uri();
    let secure_scheme = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or(WsError::Url(UrlError::NoHostName))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if secure_scheme { 443 } else { 80 });

    let mut tcp = match c.from {
        Some(from) => connect_from(from, port).await?,
        None => TcpStream::connect((host.as_str(), port)).await?,
    };
    if !c.preamble.is_empty() {
        use tokio::io::AsyncWriteExt;
        tcp.write_all(&c.preamble).await?;
    }
    // Latency assertions would otherwise measure Nagle's delay on small RFB messages.
    tcp.set_nodelay(true)?;
    let transport = match &c.tls {
        Some(config) => {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await?;
            Transport::Tls(Box::new(tls))
        }
        None if secure_scheme => {
            return Err(WsError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a wss:// URL needs WsConnect::tls",
            )));
        }
        None => Transport::Plain(tcp),
    };
    let stream = ClientStream {
        inner: Arc::new(Mutex::new(transport)),
    };
    let body_reader = stream.share();

    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Err(WsError::Http(mut response)) => {
            complete_error_body(&mut response, body_reader).await;
            Err(WsError::Http(response))
        }
        other => other,
    }
}

async fn complete_error_body(response: &mut Response, mut stream: ClientStream) {
    let status = response.status().as_u16();
    let headers = response.headers();
    let content_length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = headers
        .get(TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let bodyless = (100..200).contains(&status) || status == 204 || status == 304;

    let mut body = response.body_mut().take().unwrap_or_default();
    if !bodyless {
        let complete = |b: &[u8]| match (chunked, content_length) {
            (true, _) => decode_chunked(b).is_some(),
            (false, Some(len)) => b.len() >= len,
            (false, None) => false,
        };
        let read_rest = async {
            let mut buf = [0u8; 4096];
            while !complete(&body) {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
        };
        // A server that neither frames nor closes its error body still yields what it sent.
        let _ = tokio::time::timeout(ERROR_BODY_DEADLINE, read_rest).await;
        if chunked {
            if let Some(decoded) = decode_chunked(&body) {
                body = decoded;
            }
        } else if let Some(len) = content_length {
            body.truncate(len);
        }
    } else {
        body.clear();
    }
    *response.body_mut() = Some(body);
}

/// The decoded body once `raw` holds a complete chunked encoding, else `None`.
fn decode_chunked(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = raw;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size_text = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Either no trailers (a bare CRLF) or trailers ending in an empty line.
            let done = rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n");
            return done.then_some(out);
        }
        if rest.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Status and JSON `error` field of a rejected handshake (the raw body text when the body is
/// not JSON with a string `error`); `None` for any other error.
pub fn error_code(e: &WsError) -> Option<(u16, String)> {
    let WsError::Http(response) = e else {
        return None;
    };
    let body = response.body().as_deref().unwrap_or(&[]);
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| match v.get("error")? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    Some((response.status().as_u16(), message))
}

/// Trusts exactly one CA (or self-signed leaf) given in DER, e.g. from `rcgen`. Offers ALPN
/// `http/1.1`, as browsers' WebSocket connections do.
///
/// Panics if the certificate does not parse: that is a bug in the test, not a condition to test.
pub fn tls_client_config(ca_cert_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_cert_der.to_vec()))
        .expect("test CA certificate should be valid DER");
    // Named explicitly so the config never depends on a process-wide default provider.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The peer's Close frame carried inside an `io::Error` returned by the RFB helpers.
#[derive(Debug)]
pub struct ClosedByPeer(pub CloseFrame);

impl std::fmt::Display for ClosedByPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WebSocket closed by peer: {} {:?}",
            u16::from(self.0.code),
            self.0.reason.as_str()
        )
    }
}

impl std::error::Error for ClosedByPeer {}

/// The Close frame that ended the stream, if `e` came from one.
pub fn close_frame(e: &io::Error) -> Option<CloseFrame> {
    e.get_ref()?
        .downcast_ref::<ClosedByPeer>()
        .map(|c| c.0.clone())
}

/// RFC 6455 §7.1.5: a Close frame without a status code is reported as 1005.
fn close_or_no_status(frame: Option<CloseFrame>) -> CloseFrame {
    frame.unwrap_or(CloseFrame {
        code: CloseCode::Status,
        reason: "".into(),
    })
}

fn closed_error(frame: Option<CloseFrame>) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        ClosedByPeer(close_or_no_status(frame)),
    )
}

/// Next binary payload; control frames are skipped (tungstenite answers pings itself).
async fn recv_binary<R>(rx: &mut R) -> io::Result<bytes::Bytes>
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Text(_))) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "text message in an RFB stream",
                ));
            }
            Some(Ok(Message::Close(frame))) => return Err(closed_error(frame)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(io::Error::other(e)),
            None => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

async fn send_binary<W>(tx: &mut W, data: Vec<u8>) -> io::Result<()>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    tx.send(Message::binary(data))
        .await
        .map_err(io::Error::other)
}

/// RFB bytes received but not yet parsed: message boundaries of the two protocols are unrelated.
#[derive(Default)]
struct RxBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl RxBuf {
    async fn take<S>(&mut self, ws: &mut WebSocketStream<S>, n: usize) -> io::Result<&[u8]>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        while self.buf.len() - self.pos < n {
            let chunk = recv_binary(ws).await?;
            // Drop consumed bytes before growing, so a long session keeps only unparsed data.
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.buf.extend_from_slice(&chunk);
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..self.pos])
    }

    async fn u8<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut WebSocketStream<S>,
    ) -> io::Result<u8> {
        Ok(self.take(ws, 1).await?[0])
    }

    async fn u16<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut WebSocketStream<S>,
    ) -> io::Result<u16> {
        let b = self.take(ws, 2).await?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    async fn u32<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut WebSocketStream<S>,
    ) -> io::Result<u32> {
        let b = self.take(ws, 4).await?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    async fn string<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut WebSocketStream<S>,
    ) -> io::Result<String> {
        let len = self.u32(ws).await? as usize;
        Ok(String::from_utf8_lossy(self.take(ws, len).await?).into_owned())
    }

    async fn skip<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        n: usize,
    ) -> io::Result<()> {
        self.take(ws, n).await.map(|_| ())
    }
}

pub struct RfbSession {
    pub server_name: String,
    pub width: u16,
    pub height: u16,
    /// Negotiated minor version: 3, 7 or 8 (of RFB 3.x).
    pub minor_version: u8,
    /// The server's PIXEL_FORMAT from ServerInit.
    pub pixel_format: [u8; 16],
    /// From the first byte awaited to ServerInit parsed.
    pub handshake_time: Duration,
    rx: RxBuf,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Client side of the RFB handshake with security type None and ClientInit shared=1. Accepts
/// 3.3, 3.7 and 3.8 servers, answering in the server's version (capped at 3.8).
pub async fn rfb_handshake<S>(ws: &mut WebSocketStream<S>) -> io::Result<RfbSession>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut rx = RxBuf::default();
    let version = rx.take(ws, 12).await?.to_vec();
    let parse = |r: std::ops::Range<usize>| {
        std::str::from_utf8(&version[r])
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
    };
    let (major, minor) = match (&version[..4], parse(4..7), parse(8..11)) {
        (b"RFB ", Some(major), Some(minor)) if version[7] == b'.' && version[11] == b'\n' => {
            (major, minor)
        }
        _ => {
            return Err(protocol_error(format!(
                "not an RFB ProtocolVersion: {version:?}"
            )));
        }
    };
    let minor_version = match (major, minor) {
        (3, m) if m >= 8 => 8,
        (3, 7) => 7,
        (m, _) if m > 3 => 8,
        _ => 3,
    };
    send_binary(ws, format!("RFB 003.{minor_version:03}\n").into_bytes()).await?;

    if minor_version == 3 {
        match rx.u32(ws).await? {
            1 => {}
            0 => {
                let reason = rx.string(ws).await?;
                return Err(protocol_error(format!(
                    "server refused the connection: {reason}"
                )));
            }
            other => {
                return Err(protocol_error(format!(
                    "server requires security type {other}"
                )));
            }
        }
    } else {
        let count = rx.u8(ws).await? as usize;
        if count == 0 {
            let reason = rx.string(ws).await?;
            return Err(protocol_error(format!(
                "server refused the connection: {reason}"
            )));
        }
        let offered = rx.take(ws, count).await?.to_vec();
        if !offered.contains(&1) {
            return Err(protocol_error(format!(
                "server does not offer security None: {offered:?}"
            )));
        }
        send_binary(ws, vec![1]).await?;
        if minor_version == 8 {
            let result = rx.u32(ws).await?;
            if result != 0 {
                let reason = rx.string(ws).await?;
                return Err(protocol_error(format!(
                    "security handshake failed: {reason}"
                )));
            }
        }
    }

    send_binary(ws, vec![1]).await?;
    let width = rx.u16(ws).await?;
    let height = rx.u16(ws).await?;
    let mut pixel_format = [0u8; 16];
    pixel_format.copy_from_slice(rx.take(ws, 16).await?);
    let server_name = rx.string(ws).await?;
    Ok(RfbSession {
        server_name,
        width,
        height,
        minor_version,
        pixel_format,
        handshake_time: started.elapsed(),
        rx,
    })
}

#[derive(Debug, Clone)]
pub struct FramebufferInfo {
    /// Rectangles in the FramebufferUpdate, pseudo-encodings included.
    pub rects: u16,
    /// The pixel at (0, 0) when a Raw rectangle covers it, else the first pixel of the first
    /// non-empty Raw rectangle.
    pub first_pixel_rgb: [u8; 3],
    /// Pixels carried by Raw rectangles.
    pub pixels: u64,
    /// From sending the request to the whole update received.
    pub elapsed: Duration,
}

/// SetPixelFormat (32bpp true colour, little-endian, red shift 16, green 8, blue 0),
/// SetEncodings [Raw], then a non-incremental request for the whole screen and its update.
pub async fn first_framebuffer_update<S>(
    ws: &mut WebSocketStream<S>,
    session: &mut RfbSession,
) -> io::Result<FramebufferInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut set_pixel_format = vec![0u8, 0, 0, 0];
    set_pixel_format.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    let set_encodings = vec![2u8, 0, 0, 1, 0, 0, 0, 0];
    ws.feed(Message::binary(set_pixel_format))
        .await
        .map_err(io::Error::other)?;
    ws.feed(Message::binary(set_encodings))
        .await
        .map_err(io::Error::other)?;
    framebuffer_update(ws, session, false).await
}

/// Requests the whole screen and reads the next FramebufferUpdate, skipping other server
/// messages. Assumes the 32bpp format set by `first_framebuffer_update`.
pub async fn framebuffer_update<S>(
    ws: &mut WebSocketStream<S>,
    session: &mut RfbSession,
    incremental: bool,
) -> io::Result<FramebufferInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = vec![3u8, incremental as u8, 0, 0, 0, 0];
    request.extend_from_slice(&session.width.to_be_bytes());
    request.extend_from_slice(&session.height.to_be_bytes());
    let sent = Instant::now();
    send_binary(ws, request).await?;
    loop {
        let kind = session.rx.u8(ws).await?;
        match kind {
            0 => {
                let mut info = read_update(ws, session).await?;
                info.elapsed = sent.elapsed();
                return Ok(info);
            }
            1 => {
                session.rx.skip(ws, 3).await?;
                let colours = session.rx.u16(ws).await? as usize;
                session.rx.skip(ws, 6 * colours).await?;
            }
            2 | 150 => {}
            3 => {
                session.rx.skip(ws, 3).await?;
                let len = session.rx.u32(ws).await? as i32;
                session.rx.skip(ws, len.unsigned_abs() as usize).await?;
            }
            248 => {
                session.rx.skip(ws, 7).await?;
                let len = session.rx.u8(ws).await? as usize;
                session.rx.skip(ws, len).await?;
            }
            other => {
                return Err(protocol_error(format!(
                    "unexpected RFB server message {other}"
                )));
            }
        }
    }
}

async fn read_update<S>(
    ws: &mut WebSocketStream<S>,
    session: &mut RfbSession,
) -> io::Result<FramebufferInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rx = &mut session.rx;
    rx.skip(ws, 1).await?;
    let rects = rx.u16(ws).await?;
    let mut origin = None;
    let mut first = None;
    let mut pixels = 0u64;
    for _ in 0..rects {
        let head = rx.take(ws, 12).await?;
        let field = |i: usize| u16::from_be_bytes([head[i], head[i + 1]]);
        let (x, y, w, h) = (field(0), field(2), field(4), field(6));
        let encoding = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        match encoding {
            0 => {
                let area = w as usize * h as usize;
                let data = rx.take(ws, area * 4).await?;
                if area > 0 {
                    let rgb = [data[2], data[1], data[0]];
                    first.get_or_insert(rgb);
                    if x == 0 && y == 0 {
                        origin.get_or_insert(rgb);
                    }
                }
                pixels += area as u64;
            }
            // DesktopSize
            -223 => {
                session.width = w;
                session.height = h;
            }
            // LastRect
            -224 => break,
            // ExtendedDesktopSize
            -308 => {
                let screens = rx.u8(ws).await? as usize;
                rx.skip(ws, 3 + 16 * screens).await?;
                session.width = w;
                session.height = h;
            }
            other => {
                return Err(protocol_error(format!(
                    "unsupported encoding {other} in update"
                )));
            }
        }
    }
    let first_pixel_rgb = origin
        .or(first)
        .ok_or_else(|| protocol_error("FramebufferUpdate carried no pixels"))?;
    Ok(FramebufferInfo {
        rects,
        first_pixel_rgb,
        pixels,
        elapsed: Duration::ZERO,
    })
}

pub async fn send_key_event<W>(tx: &mut W, keysym: u32, down: bool) -> io::Result<()>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let mut msg = vec![4u8, down as u8, 0, 0];
    msg.extend_from_slice(&keysym.to_be_bytes());
    send_binary(tx, msg).await
}

pub async fn send_pointer_event<W>(tx: &mut W, x: u16, y: u16, buttons: u8) -> io::Result<()>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    let mut msg = vec![5u8, buttons];
    msg.extend_from_slice(&x.to_be_bytes());
    msg.extend_from_slice(&y.to_be_bytes());
    send_binary(tx, msg).await
}

/// Reads until the peer's Close frame (a frame without a status code reads as 1005) and
/// returns it; `None` when the stream ends or fails without one. Data messages are discarded.
/// Like a browser, it then completes the closing handshake: tungstenite sends the Close reply
/// only from a later read, and the server is expected to close TCP after it (bounded by
/// `CLOSE_HANDSHAKE_DEADLINE`).
pub async fn read_close<R>(rx: &mut R) -> Option<CloseFrame>
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    while let Some(Ok(message)) = rx.next().await {
        if let Message::Close(frame) = message {
            let finish = async { while let Some(Ok(_)) = rx.next().await {} };
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE_DEADLINE, finish).await;
            return Some(close_or_no_status(frame));
        }
    }
    None
}

/// Sends the first `total` bytes of the flood stream (seed `FLOOD_SEED`) in binary messages of
/// `message_size` bytes (the last may be shorter) and returns their SHA-256.
pub async fn send_all_and_hash<W>(
    tx: &mut W,
    total: u64,
    message_size: usize,
) -> io::Result<[u8; 32]>
where
    W: Sink<Message, Error = WsError> + Unpin,
{
    if message_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message_size must be positive",
        ));
    }
    let mut source = FloodGen::new(FLOOD_SEED);
    let mut hasher = Sha256::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(message_size as u64) as usize;
        let chunk = source.next_chunk(n);
        hasher.update(&chunk);
        send_binary(tx, chunk).await?;
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Receives exactly `total` bytes across binary messages, however they are split, and returns
/// their SHA-256. More bytes than `total` in the last message is an error.
pub async fn recv_exact_and_hash<R>(rx: &mut R, total: u64) -> io::Result<[u8; 32]>
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while got < total {
        let chunk = recv_binary(rx).await?;
        got += chunk.len() as u64;
        if got > total {
            return Err(protocol_error(format!(
                "received {got} bytes, expected {total}"
            )));
        }
        hasher.update(&chunk);
    }
    Ok(hasher.finalize().into())
}
