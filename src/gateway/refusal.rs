//! The one table from "why this request was refused" to the HTTP status and error code, for
//! both listeners: the contract's upgrade codes (§5) and the admin API's own few. Modules
//! return their own typed errors; they are turned into a [`Refusal`] here and nowhere else, so
//! a code cannot drift between two call sites.

use http::StatusCode;

use crate::admission::AdmissionError;
use crate::auth::AuthError;
use crate::routing::RoutingError;
use crate::sessions::StreamRefused;

/// Every error code of contract §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadUpgrade,
    BadSessionId,
    TokenMissing,
    TokenMalformed,
    TokenSignature,
    TokenExpired,
    TokenNotYetValid,
    TokenIssuer,
    TokenAudience,
    TokenAlgorithm,
    OriginDenied,
    SessionOwnedByOtherUser,
    TokenRevoked,
    PoolUnknown,
    BackendNotAllowed,
    ViewOnlyUnenforceable,
    NotFound,
    TooManySessions,
    TooManyAuthFailures,
    BackendConnectFailed,
    BackendAuthFailed,
    BackendProtocolError,
    BackendUnavailable,
    NoHealthyBackend,
    OverCapacity,
    Draining,
    // The admin listener's codes (not upgrade results: outside `ALL`).
    /// `/admin/*` without the admin bearer token.
    Unauthorized,
    /// A malformed admin request body.
    BadRequest,
    /// An admin request body above its bound.
    BodyTooLarge,
    /// The admin action happened on this replica only: the store did not take it.
    StoreUnavailable,
}

impl ErrorCode {
    /// Every upgrade refusal of contract §5 (the label values of `vncgate_upgrades_total`).
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::BadUpgrade,
        ErrorCode::BadSessionId,
        ErrorCode::TokenMissing,
        ErrorCode::TokenMalformed,
        ErrorCode::TokenSignature,
        ErrorCode::TokenExpired,
        ErrorCode::TokenNotYetValid,
        ErrorCode::TokenIssuer,
        ErrorCode::TokenAudience,
        ErrorCode::TokenAlgorithm,
        ErrorCode::OriginDenied,
        ErrorCode::SessionOwnedByOtherUser,
        ErrorCode::TokenRevoked,
        ErrorCode::PoolUnknown,
        ErrorCode::BackendNotAllowed,
        ErrorCode::ViewOnlyUnenforceable,
        ErrorCode::NotFound,
        ErrorCode::TooManySessions,
        ErrorCode::TooManyAuthFailures,
        ErrorCode::BackendConnectFailed,
        ErrorCode::BackendAuthFailed,
        ErrorCode::BackendProtocolError,
        ErrorCode::BackendUnavailable,
        ErrorCode::NoHealthyBackend,
        ErrorCode::OverCapacity,
        ErrorCode::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadUpgrade => "bad_upgrade",
            ErrorCode::BadSessionId => "bad_session_id",
            ErrorCode::TokenMissing => "token_missing",
            ErrorCode::TokenMalformed => "token_malformed",
            ErrorCode::TokenSignature => "token_signature",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenNotYetValid => "token_not_yet_valid",
            ErrorCode::TokenIssuer => "token_issuer",
            ErrorCode::TokenAudience => "token_audience",
            ErrorCode::TokenAlgorithm => "token_algorithm",
            ErrorCode::OriginDenied => "origin_denied",
            ErrorCode::SessionOwnedByOtherUser => "session_owned_by_other_user",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::PoolUnknown => "pool_unknown",
            ErrorCode::BackendNotAllowed => "backend_not_allowed",
            ErrorCode::ViewOnlyUnenforceable => "view_only_unenforceable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::TooManyAuthFailures => "too_many_auth_failures",
            ErrorCode::BackendConnectFailed => "backend_connect_failed",
            ErrorCode::BackendAuthFailed => "backend_auth_failed",
            ErrorCode::BackendProtocolError => "backend_protocol_error",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::NoHealthyBackend => "no_healthy_backend",
            ErrorCode::OverCapacity => "over_capacity",
            ErrorCode::Draining => "draining",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadRequest | ErrorCode::BodyTooLarge => "bad_request",
            ErrorCode::StoreUnavailable => "store_unavailable",
        }
    }

    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            BadUpgrade | BadSessionId | BadRequest => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            TokenMissing | TokenMalformed | TokenSignature | TokenExpired | TokenNotYetValid
            | TokenIssuer | TokenAudience | TokenAlgorithm => StatusCode::UNAUTHORIZED,
            OriginDenied
            | SessionOwnedByOtherUser
            | TokenRevoked
            | PoolUnknown
            | BackendNotAllowed
            | ViewOnlyUnenforceable => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            TooManySessions | TooManyAuthFailures => StatusCode::TOO_MANY_REQUESTS,
            BackendConnectFailed | BackendAuthFailed | BackendProtocolError => {
                StatusCode::BAD_GATEWAY
            }
            BackendUnavailable | NoHealthyBackend | OverCapacity | Draining | StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Refusals counted in `vncgate_auth_failures_total` and in the per-address throttle: the
    /// 401s and the 403s (contract §8: "the 401/403 code").
    pub fn is_auth_failure(self) -> bool {
        matches!(
            self.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        )
    }
}

impl ErrorCode {
    /// Refusals that count against the client address's auth-failure throttle: what a scanner
    /// or a forger produces. Not what a legitimate user's stale tab produces (an expired or
    /// revoked token that noVNC keeps retrying every 5 s, a clock a little ahead) nor a
    /// platform's misconfiguration: counting those let a few stale tabs behind one corporate
    /// NAT lock every user of that address out.
    pub fn counts_toward_throttle(self) -> bool {
        use ErrorCode::*;
        matches!(
            self,
            TokenMissing
                | TokenMalformed
                | TokenSignature
                | TokenAlgorithm
                | TokenIssuer
                | TokenAudience
                | OriginDenied
                | SessionOwnedByOtherUser
                | BackendNotAllowed
                | BadSessionId
        )
    }
}

/// A refused request: the code plus a short human message (never a token, never internals).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The JSON body of contract §5.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({ "error": self.code.as_str(), "message": self.message })
            .to_string()
            .into_bytes()
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let code = match &e {
            AuthError::Missing => ErrorCode::TokenMissing,
            AuthError::Malformed(_) => ErrorCode::TokenMalformed,
            AuthError::Signature => ErrorCode::TokenSignature,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::NotYetValid => ErrorCode::TokenNotYetValid,
            AuthError::Issuer => ErrorCode::TokenIssuer,
            AuthError::Audience => ErrorCode::TokenAudience,
            AuthError::Algorithm => ErrorCode::TokenAlgorithm,
            AuthError::BadSessionId => ErrorCode::BadSessionId,
            AuthError::OriginDenied => ErrorCode::OriginDenied,
            AuthError::Revoked => ErrorCode::TokenRevoked,
            AuthError::PoolUnknown => ErrorCode::PoolUnknown,
            AuthError::BackendNotAllowed => ErrorCode::BackendNotAllowed,
            AuthError::ViewOnlyUnenforceable(_) => ErrorCode::ViewOnlyUnenforceable,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<AdmissionError> for Refusal {
    fn from(e: AdmissionError) -> Self {
        let code = match &e {
            AdmissionError::OverCapacity => ErrorCode::OverCapacity,
            AdmissionError::TooManySessions => ErrorCode::TooManySessions,
            AdmissionError::TooManyAuthFailures => ErrorCode::TooManyAuthFailures,
            AdmissionError::Draining => ErrorCode::Draining,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<RoutingError> for Refusal {
    fn from(e: RoutingError) -> Self {
        let code = match &e {
            RoutingError::OwnedByOtherUser => ErrorCode::SessionOwnedByOtherUser,
            RoutingError::BackendUnavailable(_) => ErrorCode::BackendUnavailable,
            RoutingError::NoHealthyBackend(_) => ErrorCode::NoHealthyBackend,
            RoutingError::PoolUnknown(_) => ErrorCode::PoolUnknown,
            RoutingError::BackendNotAllowed => ErrorCode::BackendNotAllowed,
            RoutingError::NothingToJoin => ErrorCode::NotFound,
        };
        Refusal::new(code, e.to_string())
    }
}

/// Event streams over their bounds (`GET /vncgate/events`, [`super::events`]).
impl From<StreamRefused> for Refusal {
    fn from(e: StreamRefused) -> Self {
        let code = match e {
            StreamRefused::PerSession | StreamRefused::PerUser => ErrorCode::TooManySessions,
            StreamRefused::Total => ErrorCode::OverCapacity,
        };
        Refusal::new(code, e.to_string())
    }
}
