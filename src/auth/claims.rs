use serde::{Deserialize, Serialize};

/// The claims vncgate reads (contract §3). `exp` and `sub` are required by the type itself, so a
/// token without them fails to deserialize rather than passing with a default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub view_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// RFC 7519 allows `aud` as one string or an array of strings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    /// The session key: `sid`, or the user when the token names none.
    pub fn session_id(&self) -> &str {
        self.sid.as_deref().unwrap_or(&self.sub)
    }

    pub fn pool_name(&self) -> &str {
        self.pool.as_deref().unwrap_or("default")
    }
}
