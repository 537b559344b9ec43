//! Keys from a JWKS endpoint: fetched with a timeout, cached for `auth.jwks_cache_seconds`, and
//! refetched early when a token names an unknown `kid` (at most once per
//! `auth.jwks_min_refresh_seconds`). A failed fetch keeps the previous keys, so an identity
//! provider outage does not log everyone out.
//!
//! jsonwebtoken parses JWKs but does not fetch or cache them; reqwest does the HTTP.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::verify::Key;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document is a few KiB; anything far larger is not one.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("status {0}")]
    Status(u16),
    #[error("document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS document: {0}")]
    Parse(String),
}

pub struct Jwks {
    url: String,
    client: reqwest::Client,
    allowed: Vec<Algorithm>,
    keys: RwLock<Arc<Vec<Key>>>,
    /// When the last fetch was attempted (success or not); guards the rate limit and makes
    /// concurrent unknown-kid lookups share one fetch.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    cache: Duration,
    min_refresh: Duration,
}

impl Jwks {
    pub fn new(
        url: &str,
        allowed: &[Algorithm],
        cache: Duration,
        min_refresh: Duration,
    ) -> Result<Jwks, FetchError> {
        pingora_core::tls::install_default_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| FetchError::Http(e.to_string()))?;
        Ok(Jwks {
            url: url.to_owned(),
            client,
            allowed: allowed.to_vec(),
            keys: RwLock::new(Arc::new(Vec::new())),
            last_attempt: tokio::sync::Mutex::new(None),
            cache,
            min_refresh,
        })
    }

    /// Whether this cache was built for exactly these settings (a reload may keep it).
    pub fn same_settings(&self, cfg: &crate::config::AuthConfig) -> bool {
        cfg.jwks_url.as_deref() == Some(self.url.as_str())
            && cfg.algorithms == self.allowed
            && cfg.jwks_cache == self.cache
            && cfg.jwks_min_refresh == self.min_refresh
    }

    /// The current key set (cheap: an `Arc` clone).
    pub fn keys(&self) -> Arc<Vec<Key>> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Refetch because a token named a `kid` we do not have. Returns whether a fetch happened
    /// (false when rate-limited). Callers arriving while a fetch runs wait for it and reuse it.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let mut last = self.last_attempt.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return false;
        }
        *last = Some(Instant::now());
        self.fetch_and_swap("unknown_kid").await;
        true
    }

    /// Fetch now, then every `cache` interval, forever (a background task).
    pub async fn run_refresh(self: Arc<Self>) {
        loop {
            *self.last_attempt.lock().await = Some(Instant::now());
            self.fetch_and_swap("scheduled").await;
            tokio::time::sleep(self.cache).await;
        }
    }

    async fn fetch_and_swap(&self, reason: &str) {
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(
                    event = "jwks_refreshed",
                    reason,
                    keys = keys.len(),
                    "JWKS loaded {} keys",
                    keys.len()
                );
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
            }
            Err(e) => {
                tracing::warn!(event = "jwks_fetch_failed", reason, error = %e, "JWKS fetch failed; keeping the cached keys");
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, FetchError> {
        let mut response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body, &self.allowed)
    }
}

/// Parse a JWKS document into usable verification keys. Keys are parsed one by one so one
/// unusable entry (an unknown `kty`, an encryption key) does not discard the others.
pub fn parse_key_set(body: &[u8], allowed: &[Algorithm]) -> Result<Vec<Key>, FetchError> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| FetchError::Parse(e.to_string()))?;
    let entries = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| FetchError::Parse("no \"keys\" array".into()))?;
    Ok(entries
        .iter()
        .filter_map(|entry| usable_key(entry, allowed))
        .collect())
}

fn usable_key(entry: &serde_json::Value, allowed: &[Algorithm]) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    // Signature keys only; never a symmetric (`oct`) key from the network: HMAC secrets come
    // from config alone, or anyone who can publish a JWKS could mint tokens.
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return None;
    }
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let alg = match &jwk.common.key_algorithm {
        Some(ka) => {
            let alg: Algorithm = ka.to_string().parse().ok()?;
            if !allowed.contains(&alg) {
                return None;
            }
            Some(alg)
        }
        None => None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    if !allowed.iter().any(|a| a.family() == key.family()) {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}
