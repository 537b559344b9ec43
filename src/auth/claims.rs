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
    /// Narrows the pool's clipboard policy (contract §3, §11); an unknown value is malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipboard: Option<ClipboardClaim>,
    /// Joins a session another `sub` owns (contract §11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
    /// Asks for this connection to be recorded (contract §12, `recording.when: claim`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub record: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ClipboardClaim {
    Both,
    ToClient,
    ToServer,
    None,
}

impl From<ClipboardClaim> for crate::rfb::policy::Clipboard {
    fn from(c: ClipboardClaim) -> Self {
        use crate::rfb::policy::Clipboard;
        match c {
            ClipboardClaim::Both => Clipboard::Both,
            ClipboardClaim::ToClient => Clipboard::ToClient,
            ClipboardClaim::ToServer => Clipboard::ToServer,
            ClipboardClaim::None => Clipboard::None,
        }
    }
}

/// How a token joins another user's session: `view` is always view-only.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    View,
    Control,
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

    /// Whether this connection starts view-only: the `view_only` claim, or a `share: view`.
    pub fn starts_view_only(&self) -> bool {
        self.view_only || self.share == Some(Share::View)
    }
}
