//! RFB (RFC 6143), the protocol and nothing else: no sockets here except in the handshakes.
//!
//! - [`handshake`]: the gateway as an RFB *client* of its backend (version, security with the
//!   configured credentials, ClientInit, ServerInit) and as the RFB *server* for the browser.
//! - [`client_msg`]: client -> server messages, framed as a stream and filtered by [`policy`].
//! - [`server_msg`]: the server -> client stream delimited by encoding, where a policy needs it.
//! - [`policy`]: view-only and clipboard rules as values.
//!
//! Why hand-written: no maintained crate delimits every RFB message type and encoding that
//! noVNC and TigerVNC exchange (the extensions included), and the gateway needs a streaming
//! framer that never buffers a whole message, which a decoder-oriented crate is not.

pub mod browser;
pub mod client_msg;
pub mod handshake;
pub mod policy;
pub mod server_msg;
pub mod transport;
pub mod vnc_auth;

/// The 16-byte PIXEL_FORMAT of ServerInit and SetPixelFormat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat(pub [u8; 16]);

impl PixelFormat {
    pub fn bits_per_pixel(&self) -> u8 {
        self.0[0]
    }
    /// Bytes per pixel in Raw, RRE and Hextile data (8, 16 or 32 bits).
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.0[0]).div_ceil(8)
    }
}
