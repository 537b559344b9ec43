//! The gateway as the RFB *server* for the browser, after the 101 in terminate mode: version
//! 3.8, security type None (the JWT already authenticated the user), the client's ClientInit,
//! then the backend's ServerInit. When the backend wants a VNC password the gateway does not
//! have, it offers VNC Authentication instead and relays the challenge and the response.
//!
//! RFB bytes travel in WebSocket binary messages that may split or join RFB messages anywhere,
//! so reads go through a small buffer; what the browser sent after its ClientInit is handed back
//! for the client message filter.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::handshake::{
    BackendStream, HandshakeError, Handshaken, SEC_NONE, SEC_VNC_AUTH, ServerInit, Version,
};
use super::vnc_auth::CHALLENGE_LEN;

/// noVNC answers at once; this only bounds a client that upgraded and then went quiet.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A person types the password into noVNC's prompt meanwhile.
const PASSWORD_TIMEOUT: Duration = Duration::from_secs(300);
/// Nothing in the client's part of the handshake is longer than 16 bytes; a browser sending
/// more before its ClientInit gets the rest back as input, bounded by the message limit.
const MAX_BUFFERED: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("the browser closed the connection during the RFB handshake")]
    Closed,
    #[error("the browser sent a text frame")]
    Text,
    #[error("the browser broke the RFB handshake: {0}")]
    Protocol(&'static str),
    #[error("the browser did not finish the RFB handshake in time")]
    Timeout,
    #[error("the user's VNC password was refused by the backend")]
    PasswordRefused,
    #[error("the backend failed during the relayed authentication: {0}")]
    Backend(HandshakeError),
    #[error("websocket error: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// The browser side is done: the backend stream, its ServerInit, and the bytes the browser sent
/// after ClientInit (the start of its message stream).
pub struct Served {
    pub backend: BackendStream,
    pub server_init: ServerInit,
    pub leftover: Bytes,
    /// Handshake bytes read from the browser (the leftover not included) and sent to it: they
    /// count as relayed, as they did when the backend spoke them itself.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Run the server side of the handshake with the browser over `ws`.
pub async fn serve<S>(
    ws: &mut WebSocketStream<S>,
    backend: Handshaken,
) -> Result<Served, BrowserError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = match backend {
        Handshaken::Ready { .. } => HANDSHAKE_TIMEOUT,
        Handshaken::NeedsPassword(_) => PASSWORD_TIMEOUT,
    };
    tokio::time::timeout(deadline, run(ws, backend))
        .await
        .map_err(|_| BrowserError::Timeout)?
}

async fn run<S>(ws: &mut WebSocketStream<S>, backend: Handshaken) -> Result<Served, BrowserError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = Input {
        ws,
        buf: BytesMut::new(),
        consumed: 0,
        sent: 0,
    };
    input.send(Version::V3_8.greeting()).await?;
    let mut greeting = [0u8; 12];
    input.read_exact(&mut greeting).await?;
    // A client may answer with a lower version; 3.3 and 3.7 differ only in how the security
    // type is chosen and whether None ends with a SecurityResult.
    let version = Version::negotiate(&greeting).ok_or(BrowserError::Protocol("version"))?;
    let offered = match backend {
        Handshaken::Ready { .. } => SEC_NONE,
        Handshaken::NeedsPassword(_) => SEC_VNC_AUTH,
    };
    if version == Version::V3_3 {
        input.send(&u32::from(offered).to_be_bytes()).await?;
    } else {
        input.send(&[1, offered]).await?;
        let mut chosen = [0u8; 1];
        input.read_exact(&mut chosen).await?;
        if chosen[0] != offered {
            return Err(BrowserError::Protocol("security type"));
        }
    }
    let (stream, server_init) = match backend {
        Handshaken::Ready {
            stream,
            server_init,
        } => {
            if version == Version::V3_8 {
                input.send(&0u32.to_be_bytes()).await?;
            }
            (stream, server_init)
        }
        Handshaken::NeedsPassword(pending) => {
            input.send(&pending.challenge).await?;
            let mut response = [0u8; CHALLENGE_LEN];
            input.read_exact(&mut response).await?;
            match pending.finish(&response).await {
                Ok(done) => {
                    input.send(&0u32.to_be_bytes()).await?;
                    done
                }
                Err(HandshakeError::AuthFailed(reason)) => {
                    let mut failed = 1u32.to_be_bytes().to_vec();
                    if version == Version::V3_8 {
                        let reason = reason.unwrap_or_else(|| "Authentication failed".into());
                        failed.extend_from_slice(&(reason.len() as u32).to_be_bytes());
                        failed.extend_from_slice(reason.as_bytes());
                    }
                    // Best effort: the session ends either way.
                    let _ = input.send(&failed).await;
                    return Err(BrowserError::PasswordRefused);
                }
                Err(e) => return Err(BrowserError::Backend(e)),
            }
        }
    };
    // ClientInit's shared flag is not passed on: the backend connection is always shared.
    let mut client_init = [0u8; 1];
    input.read_exact(&mut client_init).await?;
    input.send(&server_init.bytes).await?;
    Ok(Served {
        backend: stream,
        server_init,
        bytes_in: input.consumed,
        bytes_out: input.sent,
        leftover: input.buf.freeze(),
    })
}

/// Reads RFB bytes out of WebSocket messages.
struct Input<'a, S> {
    ws: &'a mut WebSocketStream<S>,
    buf: BytesMut,
    consumed: u64,
    sent: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Input<'_, S> {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), BrowserError> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    async fn read_exact(&mut self, out: &mut [u8]) -> Result<(), BrowserError> {
        while self.buf.len() < out.len() {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Err(BrowserError::Closed),
                Some(Ok(Message::Binary(data))) => {
                    if self.buf.len() + data.len() > MAX_BUFFERED {
                        return Err(BrowserError::Protocol("too much data before ClientInit"));
                    }
                    self.buf.extend_from_slice(&data);
                }
                Some(Ok(Message::Text(_))) => return Err(BrowserError::Text),
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
        out.copy_from_slice(&self.buf[..out.len()]);
        self.buf.advance(out.len());
        self.consumed += out.len() as u64;
        Ok(())
    }
}
