//! Token verification with `jsonwebtoken`. Keys and allowed algorithms come from config only:
//! the token header chooses among configured keys, never widens what is accepted.

use std::collections::HashSet;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::{AuthError, Claims};
use crate::config::AuthConfig;

/// A configured verification key. `kid` is only ever compared with this in-memory set.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
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
}

pub struct Verifier {
    allowed: Vec<Algorithm>,
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Verifier {
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, KeyError> {
        let mut keys = Vec::new();
        if cfg.algorithms.iter().any(|a| is_hmac(*a)) {
            if let Some(secret) = &cfg.secret {
                keys.push(Key {
                    kid: None,
                    key: DecodingKey::from_secret(secret.expose().as_bytes()),
                });
            }
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
            keys.push(Key { kid: None, key });
        }
        Ok(Verifier {
            allowed: cfg.algorithms.clone(),
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: cfg.leeway.as_secs(),
        })
    }

    /// Verify signature and claims; the error says which contract code applies.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.precheck_algorithm(token)?;
        let header = decode_header(token).map_err(map_error)?;
        if !self.allowed.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        let family = header.alg.family();
        let same_family = || self.keys.iter().filter(|k| k.key.family() == family);
        // A `kid` that names one of our keys selects it; otherwise every key of the family is
        // tried (PEM files carry no kid). An unknown kid is never looked up anywhere else.
        let by_kid: Vec<&Key> = match &header.kid {
            Some(kid) => same_family()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&Key> = if by_kid.is_empty() {
            same_family()
                .filter(|k| k.kid.is_none() || header.kid.is_none())
                .collect()
        } else {
            by_kid
        };
        let validation = self.validation(header.alg);
        let mut last = AuthError::Signature;
        for key in candidates {
            match decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = AuthError::Signature
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        Err(last)
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
