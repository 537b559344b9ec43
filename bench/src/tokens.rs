//! HS256 tokens vncgate accepts, minted ahead of the timed part of a run.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: String,
    sid: String,
    exp: u64,
    iat: u64,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'a str>,
}

pub struct Minter {
    key: EncodingKey,
    header: Header,
    /// Distinguishes the sessions of one client process from those of earlier runs, so every
    /// token opens a fresh session (a new pin) rather than reusing one.
    prefix: String,
    ttl_secs: u64,
}

impl Minter {
    pub fn new(secret: &[u8], ttl_secs: u64) -> Minter {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Minter {
            key: EncodingKey::from_secret(secret),
            header: Header::new(Algorithm::HS256),
            prefix: format!("b{:x}-{}", nanos, std::process::id()),
            ttl_secs,
        }
    }

    /// A token for session number `i`: its own `sub` and `sid`, optionally pinned to a named
    /// backend of the pool.
    pub fn mint(&self, i: usize, backend: Option<&str>) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let id = format!("{}-{i}", self.prefix);
        let claims = Claims {
            sub: id.clone(),
            sid: id.clone(),
            exp: now + self.ttl_secs,
            iat: now,
            jti: id,
            backend,
        };
        encode(&self.header, &claims, &self.key).expect("HS256 signing cannot fail")
    }
}

/// The secret from the environment variable `var`, when a name is given.
pub fn minter_from_env(var: Option<&str>, ttl_secs: u64) -> Result<Option<Minter>, String> {
    let Some(var) = var else { return Ok(None) };
    let secret = std::env::var(var).map_err(|_| format!("{var}: environment variable not set"))?;
    if secret.is_empty() {
        return Err(format!("{var}: empty secret"));
    }
    Ok(Some(Minter::new(secret.as_bytes(), ttl_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_jwts() {
        let m = Minter::new(b"0123456789abcdef0123456789abcdef", 600);
        let a = m.mint(1, Some("echo"));
        let b = m.mint(2, None);
        assert_ne!(a, b);
        assert_eq!(a.split('.').count(), 3);
    }
}
