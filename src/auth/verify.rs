//! Token verification with `jsonwebtoken`. Keys and allowed algorithms come from config only:
//! the token header chooses among configured keys, never widens what is accepted.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::jwks::Jwks;
use super::{AuthError, Claims};
use crate::config::AuthConfig;

/// A verification key. `kid` is only ever compared with this in-memory set; `alg`, when the
/// key's source names one (a JWK's `alg`), is the only algorithm the key may verify.
pub struct Key {
    pub kid: Option<String>,
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        self.key.family() == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

/// Problems loading keys at start; reported like config errors, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.public_key_files: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.public_key_files: {path} is not an RSA, EC or Ed25519 public key in PEM")]
    Pem { path: String },
    #[error("auth.jwks_url: {0}")]
    Jwks(#[from] super::jwks::FetchError),
}

pub struct Verifier {
    allowed: Vec<Algorithm>,
    /// From `secret_env` and `public_key_files`.
    keys: Vec<Key>,
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Verifier {
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, KeyError> {
        Verifier::rebuild(cfg, None)
    }

    /// A verifier for a reloaded config, keeping `previous`'s JWKS cache when its settings did
    /// not change.
    pub fn rebuild(cfg: &AuthConfig, previous: Option<&Verifier>) -> Result<Verifier, KeyError> {
        let mut keys = Vec::new();
        if cfg.algorithms.iter().any(|a| is_hmac(*a))
            && let Some(secret) = &cfg.secret
        {
            keys.push(Key {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
            });
        }
        for path in &cfg.public_key_files {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: shown.clone(),
                source,
            })?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| KeyError::Pem { path: shown })?;
            keys.push(Key {
                kid: None,
                alg: None,
                key,
            });
        }
        let jwks = match &cfg.jwks_url {
            // A reload with the same JWKS settings keeps the cache (and its keys) it had.
            Some(url) => match previous
                .and_then(|p| p.jwks.as_ref())
                .filter(|j| j.same_settings(cfg))
            {
                Some(kept) => Some(Arc::clone(kept)),
                None => Some(Arc::new(Jwks::new(
                    url,
                    &cfg.algorithms,
                    cfg.jwks_cache,
                    cfg.jwks_min_refresh,
                )?)),
            },
            None => None,
        };
        Ok(Verifier {
            allowed: cfg.algorithms.clone(),
            keys,
            jwks,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: cfg.leeway.as_secs(),
        })
    }

    /// The JWKS cache, when `auth.jwks_url` is set (its refresh runs as a background task).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Verify signature and claims; the error says which contract code applies.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.precheck_algorithm(token)?;
        let header = decode_header(token).map_err(map_error)?;
        if !self.allowed.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        // A JWKS never supplies HMAC keys (see `jwks::usable_key`), so HS* tokens neither wait
        // for it nor make it refetch. Others get the key set that has their `kid` (or, before
        // the first fetch landed, the first one), waiting a bounded time for it.
        let jwks_keys = match &self.jwks {
            Some(jwks) if !is_hmac(header.alg) => jwks.keys_for(header.kid.as_deref()).await,
            _ => Arc::default(),
        };
        let all = self
            .keys
            .iter()
            .chain(jwks_keys.iter())
            .filter(|k| k.fits(header.alg));
        // A `kid` that names a key selects it; otherwise the keys without a kid are tried (PEM
        // files carry none). Without a `kid` in the token, every fitting key is tried.
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let named: Vec<&Key> = all
                    .clone()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    all.filter(|k| k.kid.is_none()).collect()
                } else {
                    named
                }
            }
            None => all.collect(),
        };
        let validation = self.validation(header.alg);
        for key in candidates {
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return self.check_iat(data.claims),
                // Not this key (another curve, another modulus): try the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidKeyFormat
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        Err(AuthError::Signature)
    }

    /// jsonwebtoken does not look at `iat`; a token issued in the future (beyond the leeway)
    /// is not valid yet.
    fn check_iat(&self, claims: Claims) -> Result<Claims, AuthError> {
        match claims.iat {
            Some(iat) if iat > super::mint::now_unix().saturating_add(self.leeway_secs) => {
                Err(AuthError::NotYetValid)
            }
            _ => Ok(claims),
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway_secs;
        v.validate_nbf = true;
        let mut required: HashSet<String> = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.insert("iss".into());
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.insert("aud".into());
            }
            // No audience configured: any `aud` is acceptable.
            None => v.validate_aud = false,
        }
        v.required_spec_claims = required;
        v
    }

    /// Refuse `alg: none` and algorithm names outside the allowed set with `token_algorithm`
    /// before the header parser turns them into a generic "malformed".
    fn precheck_algorithm(&self, token: &str) -> Result<(), AuthError> {
        let Some((header_b64, _)) = token.split_once('.') else {
            return Err(AuthError::Malformed("not a JWS compact token".into()));
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header_b64.trim_end_matches('='))
            .map_err(|_| AuthError::Malformed("header is not base64url".into()))?;
        let header: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| AuthError::Malformed("header is not JSON".into()))?;
        match header.get("alg").and_then(|a| a.as_str()) {
            None => Err(AuthError::Malformed("header has no alg".into())),
            Some(name) => match name.parse::<Algorithm>() {
                Ok(alg) if self.allowed.contains(&alg) => Ok(()),
                _ => Err(AuthError::Algorithm),
            },
        }
    }
}

fn map_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::Malformed(format!("missing claim {c}")),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => AuthError::Algorithm,
        ErrorKind::InvalidClaimFormat(c) => {
            AuthError::Malformed(format!("claim {c} has the wrong type"))
        }
        ErrorKind::Json(_) => {
            AuthError::Malformed("claims are missing or have the wrong type".into())
        }
        _ => AuthError::Malformed("not a valid JWT".into()),
    }
}
