//! What a verified token may do here: the Origin allowlist, the `sid` format, the pool, and the
//! backend name. A token can name a backend only by its configured name (or, in a pool whose
//! backends are dynamic, by a name matching the pool's `name_pattern`), never by address.

use super::{AuthError, Claims};
use crate::config::{Config, Discovery, RfbMode};
use crate::rfb::policy::Clipboard;

/// Exact match against `auth.allowed_origins`; an empty list allows any Origin (warned at start).
/// A request without an Origin header (a non-browser client) is allowed only when the list is
/// empty: browsers always send one on a WebSocket, so a missing Origin cannot be a browser page
/// from another site, but with an allowlist configured the operator asked for explicit origins.
pub fn check_origin(origin: Option<&[u8]>, allowed: &[String]) -> Result<(), AuthError> {
    if allowed.is_empty() {
        return Ok(());
    }
    match origin {
        Some(o) if allowed.iter().any(|a| a.as_bytes() == o) => Ok(()),
        _ => Err(AuthError::OriginDenied),
    }
}

pub fn valid_session_id(sid: &str) -> bool {
    (1..=128).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Check the claims against the config: `sid` format, pool exists, backend belongs to the pool.
pub fn authorize(claims: &Claims, config: &Config) -> Result<(), AuthError> {
    if !valid_session_id(claims.session_id()) {
        return Err(AuthError::BadSessionId);
    }
    let pool = config
        .pool(claims.pool_name())
        .ok_or(AuthError::PoolUnknown)?;
    let named_ok = |name: &str| match pool.discovery.name_pattern() {
        // Dynamic backends: the pool's pattern, on top of the name rules every backend name
        // follows (it becomes part of a host name and of store keys).
        Some(pattern) => crate::config::is_valid_name(name) && pattern.matches(name),
        None => pool.backends.iter().any(|b| b.name == name),
    };
    match (&claims.backend, &pool.discovery) {
        (Some(name), _) if !named_ok(name) => return Err(AuthError::BackendNotAllowed),
        // A dns pool's backend is the one the token names: without a name there is none.
        (None, Discovery::Dns { .. }) => return Err(AuthError::BackendNotAllowed),
        _ => {}
    }
    // Fail closed: a transparent pool relays the browser's input untouched, so a token that
    // limits input or the clipboard would be a promise the gateway cannot keep.
    if pool.rfb.mode == RfbMode::Transparent {
        // A recording needs the ServerInit and a delimited stream, which only terminate mode
        // has: a token asking for one is refused rather than served unrecorded.
        if config.recording.dir.is_some() && claims.record {
            return Err(AuthError::ViewOnlyUnenforceable("recording"));
        }
        if claims.starts_view_only() {
            return Err(AuthError::ViewOnlyUnenforceable("view-only"));
        }
        if claims
            .clipboard
            .is_some_and(|c| Clipboard::from(c) != Clipboard::Both)
        {
            return Err(AuthError::ViewOnlyUnenforceable("clipboard"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("alice", true)]
    #[case("a.b_c:d-1", true)]
    #[case("", false)]
    #[case("a b", false)]
    #[case("../etc", false)]
    #[case("ü", false)]
    fn session_id_format(#[case] sid: &str, #[case] ok: bool) {
        assert_eq!(valid_session_id(sid), ok);
    }

    #[test]
    fn session_id_length_limit() {
        assert!(valid_session_id(&"a".repeat(128)));
        assert!(!valid_session_id(&"a".repeat(129)));
    }

    #[test]
    fn origin_allowlist_is_exact() {
        let allowed = vec!["https://app.example".to_string()];
        assert!(check_origin(Some(b"https://app.example"), &allowed).is_ok());
        assert_eq!(
            check_origin(Some(b"https://app.example.evil"), &allowed),
            Err(AuthError::OriginDenied)
        );
        assert_eq!(check_origin(None, &allowed), Err(AuthError::OriginDenied));
        assert!(check_origin(None, &[]).is_ok());
    }
}
