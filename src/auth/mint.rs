//! Signing HS256 tokens for operators (`vncgate token`) and the demo.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

use super::Claims;

/// What a minted token says; everything but `sub` is optional.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub sub: String,
    pub sid: Option<String>,
    pub ttl: Duration,
    pub pool: Option<String>,
    pub backend: Option<String>,
    pub view_only: bool,
    pub jti: Option<String>,
    pub share: Option<super::claims::Share>,
    pub clipboard: Option<super::claims::ClipboardClaim>,
    pub record: bool,
    /// Set from `auth.issuer` / `auth.audience`, so a minted token passes the gateway's checks.
    pub iss: Option<String>,
    pub aud: Option<String>,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn mint_hs256(
    secret: &[u8],
    req: &TokenRequest,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_unix();
    let claims = Claims {
        sub: req.sub.clone(),
        exp: now + req.ttl.as_secs(),
        nbf: None,
        iat: Some(now),
        iss: req.iss.clone(),
        aud: req.aud.clone().map(super::claims::Audience::One),
        sid: req.sid.clone(),
        pool: req.pool.clone(),
        backend: req.backend.clone(),
        view_only: req.view_only,
        jti: req.jti.clone(),
        clipboard: req.clipboard,
        share: req.share,
        record: req.record,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}
