//! Where a token comes from (contract §3), first found wins:
//! 1. `Authorization: Bearer <jwt>`
//! 2. a `Sec-WebSocket-Protocol` entry `bearer.<jwt>` (browsers cannot set headers on a WebSocket)
//! 3. the query parameter `token` (noVNC's `path=websockify?token=...`)
//! 4. the cookie `vncgate_token`

use http::header::{AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, Uri};

use super::AuthError;

pub const QUERY_PARAM: &str = "token";
pub const COOKIE_NAME: &str = "vncgate_token";
const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
/// The only RFB subprotocol; noVNC offers it, and Chromium fails a handshake that offered
/// subprotocols when the 101 selects none.
pub const BINARY_PROTOCOL: &str = "binary";

/// Which of the four sources the token came from; logged (never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Subprotocol,
    Query,
    Cookie,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Header => "header",
            TokenSource::Subprotocol => "subprotocol",
            TokenSource::Query => "query",
            TokenSource::Cookie => "cookie",
        }
    }
}

/// What the client offered in `Sec-WebSocket-Protocol`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Subprotocols {
    /// The client offered at least one subprotocol: the 101 must then select `binary`.
    pub offered: bool,
    pub has_binary: bool,
    pub bearer: Option<String>,
}

/// Parse every `Sec-WebSocket-Protocol` line (the header may repeat; entries are comma-separated).
pub fn subprotocols(headers: &HeaderMap) -> Result<Subprotocols, AuthError> {
    let mut out = Subprotocols::default();
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Malformed("Sec-WebSocket-Protocol is not ASCII".into()))?;
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            out.offered = true;
            if entry == BINARY_PROTOCOL {
                out.has_binary = true;
            } else if let Some(token) = entry.strip_prefix(BEARER_PROTOCOL_PREFIX)
                && out.bearer.is_none()
                && !token.is_empty()
            {
                out.bearer = Some(token.to_owned());
            }
        }
    }
    Ok(out)
}

/// Find the token, in the contract's order. `Ok(None)` when no source carries one.
pub fn token(
    headers: &HeaderMap,
    uri: &Uri,
    protocols: &Subprotocols,
) -> Result<Option<(String, TokenSource)>, AuthError> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Malformed("Authorization header is not ASCII".into()))?;
        if let Some((scheme, token)) = value.split_once(' ') {
            let token = token.trim();
            if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
                return Ok(Some((token.to_owned(), TokenSource::Header)));
            }
        }
    }
    if let Some(token) = &protocols.bearer {
        return Ok(Some((token.clone(), TokenSource::Subprotocol)));
    }
    if let Some(query) = uri.query() {
        let found = form_urlencoded::parse(query.as_bytes())
            .find(|(k, v)| k == QUERY_PARAM && !v.is_empty());
        if let Some((_, v)) = found {
            return Ok(Some((v.into_owned(), TokenSource::Query)));
        }
    }
    for value in headers.get_all(COOKIE) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Malformed("Cookie header is not ASCII".into()))?;
        for cookie in cookie::Cookie::split_parse(value).flatten() {
            if cookie.name() == COOKIE_NAME && !cookie.value().is_empty() {
                return Ok(Some((cookie.value().to_owned(), TokenSource::Cookie)));
            }
        }
    }
    Ok(None)
}

/// The request target with the value of every `token` query parameter replaced, for logs.
pub fn redacted_target(uri: &Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == QUERY_PARAM {
            out.append_pair(&k, "REDACTED");
        } else {
            out.append_pair(&k, &v);
        }
    }
    format!("{path}?{}", out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rstest::rstest;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("test header"));
        }
        h
    }

    fn find(
        pairs: &[(&'static str, &str)],
        uri: &str,
    ) -> Result<Option<(String, TokenSource)>, AuthError> {
        let h = headers(pairs);
        let p = subprotocols(&h)?;
        token(&h, &uri.parse().expect("test uri"), &p)
    }

    #[rstest]
    #[case::header(&[("authorization", "Bearer H")], "/ws?token=Q", Some(("H", TokenSource::Header)))]
    #[case::header_case(&[("authorization", "bearer H")], "/ws", Some(("H", TokenSource::Header)))]
    #[case::basic_is_not_a_token(&[("authorization", "Basic abc")], "/ws", None)]
    #[case::protocol_beats_query(&[("sec-websocket-protocol", "binary, bearer.P")], "/ws?token=Q", Some(("P", TokenSource::Subprotocol)))]
    #[case::protocol_repeated_header(&[("sec-websocket-protocol", "binary"), ("sec-websocket-protocol", "bearer.P")], "/ws", Some(("P", TokenSource::Subprotocol)))]
    #[case::query(&[], "/ws?a=1&token=Q%2Eb", Some(("Q.b", TokenSource::Query)))]
    #[case::empty_query_then_cookie(&[("cookie", "x=1; vncgate_token=C")], "/ws?token=", Some(("C", TokenSource::Cookie)))]
    #[case::cookie(&[("cookie", "vncgate_token=C")], "/ws", Some(("C", TokenSource::Cookie)))]
    #[case::none(&[("cookie", "other=1")], "/ws?x=y", None)]
    fn token_sources_in_order(
        #[case] pairs: &[(&'static str, &str)],
        #[case] uri: &str,
        #[case] want: Option<(&str, TokenSource)>,
    ) {
        let got = find(pairs, uri).expect("extract");
        assert_eq!(got, want.map(|(t, s)| (t.to_owned(), s)));
    }

    #[test]
    fn non_ascii_authorization_is_malformed() {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("opaque bytes"),
        );
        let p = subprotocols(&h).expect("no protocols");
        let got = token(&h, &"/ws".parse().expect("uri"), &p);
        assert!(matches!(got, Err(AuthError::Malformed(_))));
    }

    #[test]
    fn subprotocol_offer_is_recorded() {
        let p =
            subprotocols(&headers(&[("sec-websocket-protocol", "chat, bearer.T")])).expect("parse");
        assert!(p.offered);
        assert!(!p.has_binary);
        assert_eq!(p.bearer.as_deref(), Some("T"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Base64url segments joined by dots: the shape of a JWS compact token.
        fn jwt() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,80}\\.[A-Za-z0-9_-]{0,60}"
        }

        proptest! {
            #[test]
            fn arbitrary_requests_never_panic(
                auth in proptest::collection::vec(any::<u8>(), 0..64),
                protocols in "[ -~]{0,80}",
                query in "[ -~]{0,80}",
                cookie in "[ -~]{0,80}",
            ) {
                let mut h = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_bytes(&auth) { h.insert(AUTHORIZATION, v); }
                if let Ok(v) = HeaderValue::from_str(&protocols) { h.insert(SEC_WEBSOCKET_PROTOCOL, v); }
                if let Ok(v) = HeaderValue::from_str(&cookie) { h.insert(COOKIE, v); }
                let target = format!("/ws?{}", query.replace([' ', '#'], "%20"));
                if let Ok(uri) = target.parse::<Uri>() {
                    if let Ok(p) = subprotocols(&h) {
                        let _ = token(&h, &uri, &p);
                    }
                    let _ = redacted_target(&uri);
                }
            }

            #[test]
            fn query_tokens_round_trip_and_are_redacted(t in jwt(), before in "[a-z]{1,8}", after in "[a-z]{1,8}") {
                let target = format!("/ws?{before}=1&token={t}&{after}=2");
                let uri: Uri = target.parse().expect("uri");
                let got = token(&HeaderMap::new(), &uri, &Subprotocols::default()).expect("extract");
                prop_assert_eq!(got, Some((t.clone(), TokenSource::Query)));
                prop_assert!(!redacted_target(&uri).contains(&t));
            }

            #[test]
            fn cookie_tokens_round_trip(t in jwt(), other in "[a-z]{1,8}=[a-z0-9]{0,8}") {
                let h = headers(&[("cookie", &format!("{other}; vncgate_token={t}; z=1"))]);
                let got = token(&h, &"/ws".parse().expect("uri"), &Subprotocols::default()).expect("extract");
                prop_assert_eq!(got, Some((t, TokenSource::Cookie)));
            }

            #[test]
            fn subprotocol_tokens_round_trip(t in jwt(), extra in proptest::collection::vec("[a-z]{1,10}", 0..4)) {
                let mut entries = extra.clone();
                entries.push("binary".into());
                entries.push(format!("bearer.{t}"));
                let h = headers(&[("sec-websocket-protocol", &entries.join(", "))]);
                let p = subprotocols(&h).expect("parse");
                prop_assert!(p.offered && p.has_binary);
                let got = token(&h, &"/ws".parse().expect("uri"), &p).expect("extract");
                prop_assert_eq!(got, Some((t, TokenSource::Subprotocol)));
            }
        }
    }

    #[test]
    fn redaction_hides_every_token_parameter() {
        let uri: Uri = "/websockify?token=secret.jwt&x=1&token=two"
            .parse()
            .expect("uri");
        let shown = redacted_target(&uri);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("two"), "{shown}");
        assert!(shown.contains("x=1"));
    }
}
