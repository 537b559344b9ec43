//! WebSocket close codes (contract §6) and why a session ended.

/// The codes vncgate sends, plus the ones a client or a broken connection produces; the set is
/// closed so `vncgate_disconnects_total{code}` has bounded cardinality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the backend closed the session (or the client closed normally).
    Normal,
    /// 1001: the gateway is draining or shutting down; the client should reconnect.
    GoingAway,
    /// 1002: the client broke the WebSocket protocol (bad framing, unmasked frame).
    ProtocolError,
    /// 1003: a text frame (RFB is binary).
    Unsupported,
    /// 1005: the client closed without a status code.
    NoStatus,
    /// 1006: the connection dropped without a close frame (reset, dead peer, pong timeout).
    Abnormal,
    /// 1008: an RFB message the gateway refuses (terminate mode: undelimitable or malformed).
    PolicyViolation,
    /// 1009: a client message above `limits.max_message_bytes`.
    TooBig,
    /// 1011: an internal error.
    Internal,
    /// 1013: the backend connection was lost; try again.
    TryAgain,
    /// 4001: the token expired.
    TokenExpired,
    /// 4003: kicked or revoked.
    Kicked,
    /// 4008: no client input for `limits.idle_timeout_seconds`.
    Idle,
}

impl CloseCode {
    pub const ALL: [CloseCode; 13] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::Unsupported,
        CloseCode::NoStatus,
        CloseCode::Abnormal,
        CloseCode::PolicyViolation,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::TryAgain,
        CloseCode::TokenExpired,
        CloseCode::Kicked,
        CloseCode::Idle,
    ];

    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::NoStatus => 1005,
            CloseCode::Abnormal => 1006,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::TryAgain => 1013,
            CloseCode::TokenExpired => 4001,
            CloseCode::Kicked => 4003,
            CloseCode::Idle => 4008,
        }
    }

    /// A code a client sent in its close frame, folded into the closed set: anything outside it
    /// counts as a normal client close.
    pub fn from_client(code: u16) -> CloseCode {
        CloseCode::ALL
            .into_iter()
            .find(|c| c.as_u16() == code)
            .unwrap_or(CloseCode::Normal)
    }

    /// The reason text sent with the close frame (short: control frames cap at 125 bytes).
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "backend closed the session",
            CloseCode::GoingAway => "gateway draining; reconnect",
            CloseCode::ProtocolError => "websocket protocol error",
            CloseCode::Unsupported => "text frames are not RFB",
            CloseCode::NoStatus | CloseCode::Abnormal => "",
            CloseCode::PolicyViolation => "RFB message refused",
            CloseCode::TooBig => "message too big",
            CloseCode::Internal => "internal error",
            CloseCode::TryAgain => "backend connection lost; try again",
            CloseCode::TokenExpired => "token expired",
            CloseCode::Kicked => "session kicked or token revoked",
            CloseCode::Idle => "idle timeout",
        }
    }

    /// Whether vncgate should send this code in a close frame (1005/1006 are never sent).
    pub fn is_sendable(self) -> bool {
        !matches!(self, CloseCode::NoStatus | CloseCode::Abnormal)
    }
}

/// Who ended the session and how; decides the close frame and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent a close frame (its code) or vanished.
    Client(CloseCode),
    /// The gateway closes the session with this code.
    Gateway(CloseCode),
}

impl EndReason {
    pub fn code(self) -> CloseCode {
        match self {
            EndReason::Client(c) | EndReason::Gateway(c) => c,
        }
    }

    /// The code `vncgate_disconnects_total` counts. A code a client put in its own close frame
    /// says nothing about the gateway: counted as the client's normal close, so no browser can
    /// fire the gateway's 1011/1013 alerts by sending those codes. A vanished client (1006),
    /// a close without a code (1005) and a tab going away (1001) keep their codes. The
    /// `session_ended` log line keeps the code the client sent.
    pub fn counted_code(self) -> CloseCode {
        match self {
            EndReason::Gateway(c) => c,
            EndReason::Client(
                c @ (CloseCode::Normal
                | CloseCode::GoingAway
                | CloseCode::NoStatus
                | CloseCode::Abnormal),
            ) => c,
            EndReason::Client(_) => CloseCode::Normal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_sent_codes_never_count_as_the_gateways_errors() {
        for code in CloseCode::ALL {
            let counted = EndReason::Client(code).counted_code();
            assert!(
                !matches!(
                    counted,
                    CloseCode::Internal | CloseCode::TryAgain | CloseCode::Kicked
                ),
                "a client's {code:?} counted as {counted:?}"
            );
            assert_eq!(EndReason::Gateway(code).counted_code(), code);
        }
        assert_eq!(
            EndReason::Client(CloseCode::from_client(1011)).counted_code(),
            CloseCode::Normal
        );
        assert_eq!(
            EndReason::Client(CloseCode::Abnormal).counted_code(),
            CloseCode::Abnormal
        );
    }
}
