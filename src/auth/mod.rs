//! Authentication and authorization of an upgrade request.
//!
//! - [`extract`]: where the token comes from (contract §3: header, subprotocol, query, cookie)
//!   and which subprotocol the 101 selects.
//! - [`verify`]: the signature with a configured algorithm and key, and the time/issuer/audience
//!   claims, giving [`Claims`].
//! - [`authorize`]: what the claims may do here: Origin, `sid` format, pool, backend name.
//! - [`mint`]: signing tokens for the `token` and `demo` commands.

pub mod authorize;
pub mod claims;
pub mod extract;
pub mod jwks;
pub mod mint;
pub mod verify;

pub use claims::Claims;
pub use verify::Verifier;

/// Why a request's credentials were refused. The gateway maps each variant to one contract code.
/// Messages are for humans and never contain the token.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token in the Authorization header, a bearer subprotocol, the query or the cookie")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is missing or not accepted")]
    Issuer,
    #[error("token audience is missing or not accepted")]
    Audience,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("session id must match [A-Za-z0-9._:-]{{1,128}}")]
    BadSessionId,
    #[error("origin is not allowed")]
    OriginDenied,
    #[error("token has been revoked")]
    Revoked,
    #[error("pool is not configured")]
    PoolUnknown,
    #[error("backend is not a configured backend of the pool")]
    BackendNotAllowed,
    #[error(
        "the pool relays RFB untouched (rfb.mode: transparent) and cannot enforce this token's {0} policy"
    )]
    ViewOnlyUnenforceable(&'static str),
}
