//! The gateway as an RFB *client* of its backend (RFC 6143 §7.1-7.3): protocol version,
//! security with the configured credentials, ClientInit (always shared) and ServerInit.
//!
//! Done before the 101 in terminate mode, so a refusal is an HTTP answer, and done by the RFB
//! health check, so the checks authenticate: TigerVNC counts every connection that closes before
//! authenticating against the peer's address (its blacklist), and behind a gateway that one
//! address is every user.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::PixelFormat;
pub use super::transport::Transport;
use super::vnc_auth::{self, CHALLENGE_LEN};
use crate::config::{RfbCredentials, RfbTls};

/// The whole backend handshake; a server that accepts TCP and then says nothing is down.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Desktop names are a few dozen bytes; a bound keeps a broken server from making us allocate.
const MAX_NAME_LEN: usize = 64 * 1024;
const MAX_REASON_LEN: usize = 4 * 1024;

const SEC_INVALID: u8 = 0;
pub const SEC_NONE: u8 = 1;
pub const SEC_VNC_AUTH: u8 = 2;
const SEC_VENCRYPT: u8 = 19;

// VeNCrypt subtypes (u32). The TLS* ones (257-259) are anonymous Diffie-Hellman, which rustls
// does not implement; X509* (260-262) are ordinary certificate TLS.
const VENCRYPT_PLAIN: u32 = 256;
const VENCRYPT_X509_NONE: u32 = 260;
const VENCRYPT_X509_VNC: u32 = 261;
const VENCRYPT_X509_PLAIN: u32 = 262;

/// The RFB minor version both sides agreed on (major is always 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V3_3,
    V3_7,
    V3_8,
}

impl Version {
    pub fn greeting(self) -> &'static [u8; 12] {
        match self {
            Version::V3_3 => b"RFB 003.003\n",
            Version::V3_7 => b"RFB 003.007\n",
            Version::V3_8 => b"RFB 003.008\n",
        }
    }

    /// The version to speak with a peer that announced `greeting`: the highest we both know.
    /// 3.5 (an old typo'd release) is 3.3 per the RFC; 4.x and later servers speak 3.8 too.
    pub fn negotiate(greeting: &[u8; 12]) -> Option<Version> {
        let text = std::str::from_utf8(greeting).ok()?;
        let rest = text.strip_prefix("RFB ")?.strip_suffix('\n')?;
        let (major, minor) = rest.split_once('.')?;
        if major.len() != 3 || minor.len() != 3 {
            return None;
        }
        let major: u32 = major.parse().ok()?;
        let minor: u32 = minor.parse().ok()?;
        Some(match (major, minor) {
            (3, 0..=6) => Version::V3_3,
            (3, 7) => Version::V3_7,
            (3, _) => Version::V3_8,
            (4.., _) => Version::V3_8,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the backend does not speak RFB: {0}")]
    NotRfb(String),
    #[error("the backend refused the connection: {0}")]
    Refused(String),
    #[error("the backend offers no security type the gateway can use (offered {0:?})")]
    NoSecurityType(Vec<u32>),
    #[error("the backend refused the credentials{}", .0.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    AuthFailed(Option<String>),
    #[error("TLS to the backend failed: {0}")]
    Tls(String),
    #[error("the backend did not finish the handshake in time")]
    Timeout,
    #[error("the backend connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
}

/// The backend's byte stream: its transport as it is, or TLS over it when VeNCrypt X509* was
/// negotiated.
pub enum BackendStream {
    Plain(Transport),
    Tls(Box<tokio_rustls::client::TlsStream<Transport>>),
}

super::transport::delegate_io!(BackendStream { Plain, Tls });

/// The backend's ServerInit, kept whole: the gateway sends the same bytes to the browser.
#[derive(Debug, Clone)]
pub struct ServerInit {
    pub bytes: Bytes,
    pub width: u16,
    pub height: u16,
    pub pixel_format: PixelFormat,
}

/// Where the backend handshake stopped.
pub enum Handshaken {
    /// Authenticated, ClientInit sent, ServerInit read: the session can start.
    Ready {
        stream: BackendStream,
        server_init: ServerInit,
    },
    /// The backend wants VNC Authentication and the gateway has no password: the browser's user
    /// answers the challenge (relayed after the 101), then [`PendingAuth::finish`] completes.
    NeedsPassword(PendingAuth),
}

impl Handshaken {
    /// Whether the backend bytes arrive on a plain TCP socket (which splice(2) can read).
    pub fn over_plain_tcp(&self) -> bool {
        let stream = match self {
            Handshaken::Ready { stream, .. } => stream,
            Handshaken::NeedsPassword(pending) => &pending.stream,
        };
        matches!(stream, BackendStream::Plain(Transport::Tcp(_)))
    }
}

pub struct PendingAuth {
    stream: BackendStream,
    pub version: Version,
    pub challenge: [u8; CHALLENGE_LEN],
}

/// What the gateway presents to one backend.
pub struct Credentials<'a> {
    pub secrets: &'a RfbCredentials,
    pub tls: Option<&'a RfbTls>,
    /// The backend's host, for certificate checks when `tls.server_name` is not set.
    pub host: &'a str,
}

/// The whole client handshake, bounded by [`HANDSHAKE_TIMEOUT`].
pub async fn connect(
    transport: Transport,
    creds: &Credentials<'_>,
) -> Result<Handshaken, HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(transport, creds))
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

/// Write and flush: a WebSocket transport holds a message until flushed.
async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

async fn handshake(
    mut tcp: Transport,
    creds: &Credentials<'_>,
) -> Result<Handshaken, HandshakeError> {
    let mut greeting = [0u8; 12];
    tcp.read_exact(&mut greeting).await.map_err(not_rfb)?;
    let version = Version::negotiate(&greeting).ok_or_else(|| {
        HandshakeError::NotRfb(format!("greeting {:?}", String::from_utf8_lossy(&greeting)))
    })?;
    send(&mut tcp, version.greeting()).await?;

    let offered = read_security_types(&mut tcp, version).await?;
    let choice = choose(&offered, creds);
    let stream = match choice {
        Choice::None => {
            select_type(&mut tcp, version, SEC_NONE).await?;
            // 3.3 and 3.7 send no SecurityResult for None (RFC 6143 §7.1.3, appendix).
            if version == Version::V3_8 {
                read_security_result(&mut tcp, version).await?;
            }
            BackendStream::Plain(tcp)
        }
        Choice::VncAuth(password) => {
            select_type(&mut tcp, version, SEC_VNC_AUTH).await?;
            let mut stream = BackendStream::Plain(tcp);
            answer_challenge(&mut stream, password).await?;
            read_security_result(&mut stream, version).await?;
            stream
        }
        Choice::RelayVncAuth => {
            select_type(&mut tcp, version, SEC_VNC_AUTH).await?;
            let mut challenge = [0u8; CHALLENGE_LEN];
            tcp.read_exact(&mut challenge).await?;
            return Ok(Handshaken::NeedsPassword(PendingAuth {
                stream: BackendStream::Plain(tcp),
                version,
                challenge,
            }));
        }
        Choice::VeNCrypt => {
            select_type(&mut tcp, version, SEC_VENCRYPT).await?;
            let stream = vencrypt(tcp, creds).await?;
            let mut stream = stream;
            read_security_result(&mut stream, version).await?;
            stream
        }
        Choice::Nothing => return Err(HandshakeError::NoSecurityType(offered)),
    };
    finish_init(stream).await
}

/// After authentication: ClientInit with shared=1 (TigerVNC disconnects every other viewer of
/// a desktop when a client asks for exclusive access), then ServerInit.
async fn finish_init(mut stream: BackendStream) -> Result<Handshaken, HandshakeError> {
    send(&mut stream, &[1]).await?;
    let server_init = read_server_init(&mut stream).await?;
    Ok(Handshaken::Ready {
        stream,
        server_init,
    })
}

impl PendingAuth {
    /// Send the browser user's response; on success the handshake finishes through ServerInit.
    /// `Err(AuthFailed)` carries the backend's reason (3.8) for the browser.
    pub async fn finish(
        mut self,
        response: &[u8; CHALLENGE_LEN],
    ) -> Result<(BackendStream, ServerInit), HandshakeError> {
        let run = async {
            send(&mut self.stream, response).await?;
            read_security_result(&mut self.stream, self.version).await?;
            match finish_init(self.stream).await? {
                Handshaken::Ready {
                    stream,
                    server_init,
                } => Ok((stream, server_init)),
                Handshaken::NeedsPassword(_) => {
                    Err(HandshakeError::NotRfb("unexpected state".into()))
                }
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
            .await
            .map_err(|_| HandshakeError::Timeout)?
    }
}

enum Choice<'a> {
    None,
    VncAuth(&'a [u8]),
    RelayVncAuth,
    VeNCrypt,
    Nothing,
}

/// Which offered type to use. None when the server allows it (nothing to get wrong); then the
/// configured credentials: VeNCrypt when it can be done with them (X509* needs `rfb.tls`, Plain
/// needs a user name), else VNC Authentication; without a password a VncAuth backend's
/// challenge goes to the browser.
fn choose<'a>(offered: &[u32], creds: &Credentials<'a>) -> Choice<'a> {
    let has = |t: u8| offered.contains(&u32::from(t));
    let password = creds
        .secrets
        .password
        .as_ref()
        .map(|p| p.expose().as_bytes());
    if has(SEC_NONE) {
        return Choice::None;
    }
    if has(SEC_VENCRYPT) && (creds.tls.is_some() || creds.secrets.username.is_some()) {
        return Choice::VeNCrypt;
    }
    match (has(SEC_VNC_AUTH), password) {
        (true, Some(p)) => Choice::VncAuth(p),
        (true, None) => Choice::RelayVncAuth,
        _ => Choice::Nothing,
    }
}

/// The server's offer: 3.3 names one type (u32), 3.7+ lists them (u8 count, u8 each). A count of
/// zero (or type 0 in 3.3) is a refusal with a reason, e.g. TigerVNC's "Too many security
/// failures" while it blacklists us.
async fn read_security_types(
    s: &mut Transport,
    version: Version,
) -> Result<Vec<u32>, HandshakeError> {
    if version == Version::V3_3 {
        let t = s.read_u32().await?;
        if t == u32::from(SEC_INVALID) {
            return Err(HandshakeError::Refused(read_reason(s).await?));
        }
        return Ok(vec![t]);
    }
    let n = s.read_u8().await?;
    if n == 0 {
        return Err(HandshakeError::Refused(read_reason(s).await?));
    }
    let mut types = vec![0u8; usize::from(n)];
    s.read_exact(&mut types).await?;
    Ok(types.into_iter().map(u32::from).collect())
}

async fn select_type(s: &mut Transport, version: Version, t: u8) -> Result<(), HandshakeError> {
    // In 3.3 the server chose; the client has nothing to say.
    if version != Version::V3_3 {
        send(s, &[t]).await?;
    }
    Ok(())
}

async fn answer_challenge<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: &[u8],
) -> Result<(), HandshakeError> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut challenge).await?;
    send(s, &vnc_auth::response(password, &challenge)).await?;
    Ok(())
}

/// SecurityResult: 0 ok, else failed; 3.8 adds a reason string.
async fn read_security_result<S: AsyncRead + Unpin>(
    s: &mut S,
    version: Version,
) -> Result<(), HandshakeError> {
    match s.read_u32().await? {
        0 => Ok(()),
        _ if version == Version::V3_8 => {
            Err(HandshakeError::AuthFailed(Some(read_reason(s).await?)))
        }
        _ => Err(HandshakeError::AuthFailed(None)),
    }
}

async fn read_reason<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HandshakeError> {
    let len = s.read_u32().await? as usize;
    let mut reason = vec![0u8; len.min(MAX_REASON_LEN)];
    s.read_exact(&mut reason).await?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

async fn read_server_init<S: AsyncRead + Unpin>(s: &mut S) -> Result<ServerInit, HandshakeError> {
    let mut head = [0u8; 24];
    s.read_exact(&mut head).await?;
    let width = u16::from_be_bytes([head[0], head[1]]);
    let height = u16::from_be_bytes([head[2], head[3]]);
    let mut pf = [0u8; 16];
    pf.copy_from_slice(&head[4..20]);
    let name_len = u32::from_be_bytes([head[20], head[21], head[22], head[23]]) as usize;
    if name_len > MAX_NAME_LEN {
        return Err(HandshakeError::NotRfb(format!(
            "desktop name of {name_len} bytes"
        )));
    }
    if !matches!(pf[0], 8 | 16 | 32) {
        return Err(HandshakeError::NotRfb(format!("{} bits per pixel", pf[0])));
    }
    let mut bytes = BytesMut::with_capacity(24 + name_len);
    bytes.put_slice(&head);
    bytes.resize(24 + name_len, 0);
    s.read_exact(&mut bytes[24..]).await?;
    Ok(ServerInit {
        bytes: bytes.freeze(),
        width,
        height,
        pixel_format: PixelFormat(pf),
    })
}

/// VeNCrypt (type 19): version 0.2, then a subtype; X509* wrap the rest of the connection in
/// TLS (certificate checked against `rfb.tls.ca_file`), Plain sends user name and password.
async fn vencrypt(
    mut tcp: Transport,
    creds: &Credentials<'_>,
) -> Result<BackendStream, HandshakeError> {
    let mut version = [0u8; 2];
    tcp.read_exact(&mut version).await?;
    if version < [0, 2] {
        return Err(HandshakeError::NotRfb(format!(
            "VeNCrypt version {}.{}",
            version[0], version[1]
        )));
    }
    send(&mut tcp, &[0, 2]).await?;
    if tcp.read_u8().await? != 0 {
        return Err(HandshakeError::Refused(
            "VeNCrypt version 0.2 not accepted".into(),
        ));
    }
    let n = tcp.read_u8().await?;
    let mut subtypes = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        subtypes.push(tcp.read_u32().await?);
    }
    let password = creds.secrets.password.as_ref();
    let user = creds.secrets.username.as_ref();
    let has = |t: u32| subtypes.contains(&t);
    let chosen = match (creds.tls, password, user) {
        (Some(_), Some(_), Some(_)) if has(VENCRYPT_X509_PLAIN) => VENCRYPT_X509_PLAIN,
        (Some(_), Some(_), _) if has(VENCRYPT_X509_VNC) => VENCRYPT_X509_VNC,
        (Some(_), _, _) if has(VENCRYPT_X509_NONE) => VENCRYPT_X509_NONE,
        // Plain without TLS puts the password on the wire in clear: only where the operator
        // gave a user name and the server offers nothing better.
        (_, Some(_), Some(_)) if has(VENCRYPT_PLAIN) => VENCRYPT_PLAIN,
        _ => return Err(HandshakeError::NoSecurityType(subtypes)),
    };
    send(&mut tcp, &chosen.to_be_bytes()).await?;
    if chosen == VENCRYPT_PLAIN {
        let mut stream = BackendStream::Plain(tcp);
        send_plain(&mut stream, creds).await?;
        return Ok(stream);
    }
    // The server acknowledges a TLS subtype with one byte (1) before the TLS handshake.
    if tcp.read_u8().await? != 1 {
        return Err(HandshakeError::Tls(
            "the backend declined to start TLS".into(),
        ));
    }
    let Some(tls) = creds.tls else {
        return Err(HandshakeError::NoSecurityType(subtypes));
    };
    let name = tls.server_name.as_deref().unwrap_or(creds.host).to_owned();
    let server_name = rustls::pki_types::ServerName::try_from(name)
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
    let tls_stream = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    let mut stream = BackendStream::Tls(Box::new(tls_stream));
    match (chosen, password) {
        (VENCRYPT_X509_VNC, Some(p)) => {
            answer_challenge(&mut stream, p.expose().as_bytes()).await?
        }
        (VENCRYPT_X509_PLAIN, _) => send_plain(&mut stream, creds).await?,
        _ => {}
    }
    Ok(stream)
}

async fn send_plain(s: &mut BackendStream, creds: &Credentials<'_>) -> Result<(), HandshakeError> {
    let user = creds
        .secrets
        .username
        .as_ref()
        .map(|u| u.expose())
        .unwrap_or("");
    let pass = creds
        .secrets
        .password
        .as_ref()
        .map(|p| p.expose())
        .unwrap_or("");
    let mut msg = Vec::with_capacity(8 + user.len() + pass.len());
    msg.extend_from_slice(&(user.len() as u32).to_be_bytes());
    msg.extend_from_slice(&(pass.len() as u32).to_be_bytes());
    msg.extend_from_slice(user.as_bytes());
    msg.extend_from_slice(pass.as_bytes());
    send(s, &msg).await?;
    Ok(())
}

fn not_rfb(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => HandshakeError::NotRfb("closed before the greeting".into()),
        _ => HandshakeError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(b"RFB 003.003\n", Some(Version::V3_3))]
    #[case(b"RFB 003.005\n", Some(Version::V3_3))]
    #[case(b"RFB 003.007\n", Some(Version::V3_7))]
    #[case(b"RFB 003.008\n", Some(Version::V3_8))]
    #[case(b"RFB 003.889\n", Some(Version::V3_8))]
    #[case(b"RFB 004.001\n", Some(Version::V3_8))]
    #[case(b"RFB 002.000\n", None)]
    #[case(b"HTTP/1.1 200", None)]
    #[case(b"RFB 03.0008\n", None)]
    fn versions(#[case] greeting: &[u8; 12], #[case] expected: Option<Version>) {
        assert_eq!(Version::negotiate(greeting), expected);
    }
}
