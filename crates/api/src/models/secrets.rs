//! Wire types of E2B's secrets API (`/secrets`), as the 2.63 SDKs' generated models spell them.
//! A value travels only in requests; no response type has a field for it, and the request types'
//! `Debug` leaves it out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /secrets`.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSecret {
    /// Unique in the team; lower-cased before storage. 1-128 bytes, no `{`, `}` or control
    /// characters, not starting with `sec_` (reserved for ids).
    pub name: String,
    /// The value, 1 byte to 64 KiB. Write-only: stored encrypted, never returned.
    pub value: String,
    /// At most 32 entries; keys at most 128 bytes, values 1024, 8192 bytes in all.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("metadata", &self.metadata)
            .finish()
    }
}

/// Body of `POST /secrets/{secretID}`: a new version of the value.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretUpdate {
    /// The new value, 1 byte to 64 KiB. Write-only.
    pub value: String,
    /// When given, replaces the stored metadata (same limits as at create).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl std::fmt::Debug for SecretUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretUpdate")
            .field("value", &"<redacted>")
            .field("metadata", &self.metadata)
            .finish()
    }
}

/// A secret as every response shows it: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    /// `sec_` and 32 hex digits.
    #[serde(rename = "secretID")]
    pub secret_id: String,
    /// Lower-cased.
    pub name: String,
    /// 1 at create, one more at each update.
    #[serde(rename = "currentVersion")]
    pub current_version: i64,
    /// Always present, empty when unset.
    pub metadata: BTreeMap<String, String>,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
}
