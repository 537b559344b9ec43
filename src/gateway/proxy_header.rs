//! PROXY protocol v1/v2 (`listeners[].proxy_protocol`): behind an L4 load balancer every TCP
//! peer is the balancer; the header it sends first carries the real client address, which the
//! throttle, the pre-auth caps and the logs then use. Pingora 0.9 has no support for it, so the
//! header is read here, on the accepted socket, before TLS and HTTP; the `ppp` crate parses it.

use std::net::SocketAddr;

use pingora_core::protocols::l4::stream::Stream as L4Stream;
use ppp::v2::Command;
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;

/// v1 headers are at most 107 bytes; v2 headers from cloud balancers carry a few TLVs (AWS's
/// VPC endpoint id, GCP's PSC id), far below this. A longer header is refused, not buffered.
const MAX_HEADER_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection closed before a PROXY header")]
    Closed,
    #[error("not a PROXY protocol v1/v2 header")]
    Invalid,
    #[error("PROXY header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Read the header at the start of `stream`; bytes read past it are put back on the stream.
/// Returns the client's address, or `None` when the balancer speaks for itself (v2 `LOCAL`,
/// e.g. its own health check, or v1 `UNKNOWN`): the peer address then stands.
pub async fn read(stream: &mut L4Stream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let header = HeaderResult::parse(&buf);
        if header.is_incomplete() {
            if buf.len() >= MAX_HEADER_BYTES {
                return Err(ProxyHeaderError::TooLong);
            }
            continue;
        }
        let (len, addr) = match header {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_source(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_source(&h)),
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
                return Err(ProxyHeaderError::Invalid);
            }
        };
        stream.rewind(&buf[len..]);
        return Ok(addr);
    }
}

fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == Command::Local {
        return None;
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    }
}
