//! Strict RFC 6455 §4.2.1 checks on the upgrade request, and the 101 answer.

use base64::Engine;
use http::header::{CONNECTION, HOST, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{HeaderMap, Method, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::auth::extract::{self, Subprotocols};

/// A request that passed the handshake checks.
#[derive(Debug)]
pub struct Handshake {
    /// `Sec-WebSocket-Accept` for the 101.
    pub accept: String,
    pub protocols: Subprotocols,
}

/// Why the request is not a valid WebSocket upgrade (all answered with 400 `bad_upgrade`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("a WebSocket upgrade must be a GET")]
    Method,
    #[error("a WebSocket upgrade needs HTTP/1.1")]
    Version,
    #[error("missing Host header")]
    Host,
    #[error("missing or wrong Upgrade: websocket header")]
    Upgrade,
    #[error("Connection header must include Upgrade")]
    Connection,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    Key,
    #[error("only Sec-WebSocket-Version 13 is supported")]
    WsVersion,
    #[error("subprotocols were offered but not \"binary\"")]
    Subprotocol,
    #[error("Sec-WebSocket-Protocol is not valid")]
    SubprotocolSyntax,
}

/// Whether a comma-separated header (possibly repeated) contains `token`, case-insensitively.
fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

pub fn validate(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<Handshake, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::Method);
    }
    if version < Version::HTTP_11 {
        return Err(HandshakeError::Version);
    }
    if headers.get(HOST).is_none_or(|h| h.is_empty()) {
        return Err(HandshakeError::Host);
    }
    if !has_token(headers, UPGRADE, "websocket") {
        return Err(HandshakeError::Upgrade);
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(HandshakeError::Connection);
    }
    let key = headers.get(SEC_WEBSOCKET_KEY).ok_or(HandshakeError::Key)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .map_err(|_| HandshakeError::Key)?;
    if decoded.len() != 16 {
        return Err(HandshakeError::Key);
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::WsVersion);
    }
    let protocols =
        extract::subprotocols(headers).map_err(|_| HandshakeError::SubprotocolSyntax)?;
    if protocols.offered && !protocols.has_binary {
        return Err(HandshakeError::Subprotocol);
    }
    Ok(Handshake {
        accept: derive_accept_key(key.as_bytes()),
        protocols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rstest::rstest;

    fn good() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("gw"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        h
    }

    #[test]
    fn rfc_example_accept_key() {
        let hs = validate(&Method::GET, Version::HTTP_11, &good()).expect("valid");
        assert_eq!(hs.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(!hs.protocols.offered);
    }

    #[rstest]
    #[case::no_upgrade("upgrade", None, HandshakeError::Upgrade)]
    #[case::wrong_upgrade("upgrade", Some("h2c"), HandshakeError::Upgrade)]
    #[case::no_connection("connection", None, HandshakeError::Connection)]
    #[case::short_key("sec-websocket-key", Some("c2hvcnQ="), HandshakeError::Key)]
    #[case::bad_key("sec-websocket-key", Some("!!!"), HandshakeError::Key)]
    #[case::version_8("sec-websocket-version", Some("8"), HandshakeError::WsVersion)]
    #[case::no_host("host", None, HandshakeError::Host)]
    #[case::protocol_without_binary(
        "sec-websocket-protocol",
        Some("chat"),
        HandshakeError::Subprotocol
    )]
    fn refusals(
        #[case] name: &'static str,
        #[case] value: Option<&'static str>,
        #[case] want: HandshakeError,
    ) {
        let mut h = good();
        match value {
            Some(v) => {
                h.insert(name, HeaderValue::from_static(v));
            }
            None => {
                h.remove(name);
            }
        }
        assert_eq!(
            validate(&Method::GET, Version::HTTP_11, &h).err(),
            Some(want)
        );
    }

    #[test]
    fn post_and_http10_are_refused() {
        assert_eq!(
            validate(&Method::POST, Version::HTTP_11, &good()).err(),
            Some(HandshakeError::Method)
        );
        assert_eq!(
            validate(&Method::GET, Version::HTTP_10, &good()).err(),
            Some(HandshakeError::Version)
        );
    }
}
