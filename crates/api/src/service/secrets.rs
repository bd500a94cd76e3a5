//! E2B's secrets API (`/secrets`): a team's named values, write-only, each update a new version.
//!
//! Names are lower-cased before they are checked, stored or looked up; `sec_` starts ids and no
//! name. Values are sealed here ([`crate::secrets::SecretKey`], on the blocking pool with the
//! store write) and never leave the server in a response, an error, a log line or the audit
//! log, which records create, update and delete with the name and version only.

use std::collections::BTreeMap;
use std::sync::Arc;

use alcove_store::{NewAuditRecord, SecretRecord, Store, StoreError, now_ms};
use base64::Engine as _;
use zeroize::Zeroizing;

use super::Service;
use crate::error::ApiError;
use crate::models::{self, rfc3339};
use crate::secrets::SecretKey;

/// The most secrets one team may have.
pub const MAX_SECRETS_PER_TEAM: usize = 1000;
/// A name's longest, in bytes (after lower-casing).
pub const MAX_NAME_BYTES: usize = 128;
/// A value's longest, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Metadata: entries, a key's bytes, a value's bytes, all keys and values together.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_BYTES: usize = 128;
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
pub const MAX_METADATA_BYTES: usize = 8192;
/// A page's default size; `limit` may ask for 1 to [`crate::handlers::sandboxes::MAX_PAGE`].
pub const DEFAULT_PAGE: usize = 100;
/// What starts every secret id and no name.
pub const ID_PREFIX: &str = "sec_";

/// A checked name: lower-cased, 1 to [`MAX_NAME_BYTES`] bytes, no `{`, `}` or control
/// characters (it is spelled inside `${e2b.secrets.NAME}`), not starting with `sec_`.
pub fn check_name(name: &str) -> Result<String, ApiError> {
    let lower = name.to_lowercase();
    let bad = |why: &str| ApiError::InvalidBody {
        detail: format!(
            "the secret name {why}; a name is 1-{MAX_NAME_BYTES} bytes without '{{', '}}' or \
             control characters and does not start with '{ID_PREFIX}' (reserved for secret ids)"
        ),
    };
    if lower.trim().is_empty() {
        return Err(bad("is empty"));
    }
    if lower.len() > MAX_NAME_BYTES {
        return Err(bad(&format!("is {} bytes long", lower.len())));
    }
    if lower
        .chars()
        .any(|c| c == '{' || c == '}' || c.is_control())
    {
        return Err(bad("holds '{', '}' or a control character"));
    }
    if lower.starts_with(ID_PREFIX) {
        return Err(bad(&format!("starts with '{ID_PREFIX}'")));
    }
    Ok(lower)
}

fn check_value(value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::InvalidBody {
            detail: "value is empty; a secret's value is 1 byte or more".into(),
        });
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::InvalidBody {
            detail: format!(
                "value is {} bytes; a secret's value is at most {MAX_VALUE_BYTES} bytes",
                value.len()
            ),
        });
    }
    Ok(())
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let bad = |detail: String| Err(ApiError::InvalidBody { detail });
    if m.len() > MAX_METADATA_ENTRIES {
        return bad(format!(
            "metadata has {} entries; at most {MAX_METADATA_ENTRIES} are allowed",
            m.len()
        ));
    }
    let mut total = 0;
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES {
            return bad(format!(
                "the metadata key {k:?} is {} bytes; keys are 1-{MAX_METADATA_KEY_BYTES} bytes",
                k.len()
            ));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return bad(format!(
                "the metadata value of {k:?} is {} bytes; values are at most \
                 {MAX_METADATA_VALUE_BYTES} bytes",
                v.len()
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return bad(format!(
            "metadata keys and values add up to {total} bytes; at most {MAX_METADATA_BYTES} \
             are allowed"
        ));
    }
    Ok(())
}

/// `sec_` and 32 hex digits.
fn new_secret_id() -> String {
    format!("{ID_PREFIX}{}", hex::encode(rand::random::<[u8; 16]>()))
}

fn view(r: SecretRecord) -> models::Secret {
    models::Secret {
        secret_id: r.id,
        name: r.name,
        current_version: r.current_version,
        metadata: r.metadata,
        created_at: rfc3339(r.created_at),
        updated_at: rfc3339(r.updated_at),
    }
}

fn page_token(name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

fn page_after(token: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    String::from_utf8(bytes).ok()
}

impl Service {
    /// Enables the secrets API with the server's key.
    pub fn with_secrets(mut self, key: Arc<SecretKey>) -> Self {
        self.secrets = Some(key);
        self
    }

    /// The egress proxy's secret source over this service's store and key.
    pub fn secret_source(&self) -> Option<crate::secrets::StoreSecrets> {
        self.secrets
            .clone()
            .map(|k| crate::secrets::StoreSecrets::new(self.store.clone(), k))
    }

    fn secret_key(&self) -> Result<Arc<SecretKey>, ApiError> {
        self.secrets.clone().ok_or(ApiError::NotImplemented {
            what: "secrets (this server runs without a data directory for its key)",
        })
    }

    /// `POST /secrets`: a new secret, its value sealed as version 1.
    pub async fn create_secret(
        &self,
        team_id: &str,
        actor: &str,
        body: models::NewSecret,
    ) -> Result<models::Secret, ApiError> {
        let models::NewSecret {
            name,
            value,
            metadata,
        } = body;
        let value = Zeroizing::new(value);
        let name = check_name(&name)?;
        check_value(&value)?;
        let metadata = metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        let key = self.secret_key()?;
        let at = now_ms();
        let rec = SecretRecord {
            id: new_secret_id(),
            team_id: team_id.to_owned(),
            name: name.clone(),
            current_version: 1,
            metadata,
            created_at: at,
            updated_at: at,
        };
        let made = self
            .db(move |s| {
                let sealed = key
                    .seal(&rec.team_id, &rec.id, 1, value.as_bytes())
                    .map_err(|e| StoreError::Corrupt(Box::new(e)))?;
                s.insert_secret(&rec, &sealed, MAX_SECRETS_PER_TEAM)
            })
            .await
            .map_err(|e| match e {
                StoreError::SecretNameTaken => ApiError::SecretNameTaken { name },
                StoreError::SecretLimit { limit } => ApiError::SecretLimit { limit },
                e => e.into(),
            })?;
        self.audit_secret(&made, actor, "create");
        Ok(view(made))
    }

    /// `GET /secrets/{secretID}`: by id or name.
    pub async fn get_secret(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<models::Secret, ApiError> {
        let (team, key) = (team_id.to_owned(), id_or_name.to_lowercase());
        self.db(move |s| s.secret(&team, &key))
            .await?
            .map(view)
            .ok_or_else(|| ApiError::SecretNotFound {
                secret: id_or_name.to_owned(),
            })
    }

    /// `GET /secrets`: one page in name order and the next page's token.
    pub async fn list_secrets(
        &self,
        team_id: &str,
        limit: Option<usize>,
        next_token: Option<String>,
    ) -> Result<(Vec<models::Secret>, Option<String>), ApiError> {
        let after = match next_token {
            Some(t) => {
                Some(
                    page_after(&t).ok_or_else(|| ApiError::InvalidQuery {
                        detail:
                            "nextToken is not a token this server issued; start again without it"
                                .into(),
                    })?,
                )
            }
            None => None,
        };
        let (team, limit) = (team_id.to_owned(), limit.unwrap_or(DEFAULT_PAGE));
        let (items, more) = self
            .db(move |s| s.secrets_of_team(&team, after.as_deref(), limit))
            .await?;
        let next = more
            .then(|| items.last().map(|r| page_token(&r.name)))
            .flatten();
        Ok((items.into_iter().map(view).collect(), next))
    }

    /// `POST /secrets/{secretID}`: the value sealed as the next version; metadata, when given,
    /// replaces the stored one.
    pub async fn update_secret(
        &self,
        team_id: &str,
        actor: &str,
        id_or_name: &str,
        body: models::SecretUpdate,
    ) -> Result<models::Secret, ApiError> {
        let models::SecretUpdate { value, metadata } = body;
        let value = Zeroizing::new(value);
        check_value(&value)?;
        if let Some(m) = &metadata {
            check_metadata(m)?;
        }
        let key = self.secret_key()?;
        let (team, lookup) = (team_id.to_owned(), id_or_name.to_lowercase());
        let updated = self
            .db(move |s: &Store| {
                // Sealed for the number it will have; a racing update moves the number and this
                // one seals again.
                loop {
                    let cur = s
                        .secret(&team, &lookup)?
                        .ok_or(StoreError::SecretNotFound)?;
                    let next = cur.current_version + 1;
                    let sealed = key
                        .seal(&team, &cur.id, next, value.as_bytes())
                        .map_err(|e| StoreError::Corrupt(Box::new(e)))?;
                    if let Some(rec) = s.add_secret_version(
                        &team,
                        &cur.id,
                        cur.current_version,
                        &sealed,
                        metadata.as_ref(),
                        now_ms(),
                    )? {
                        return Ok(rec);
                    }
                }
            })
            .await
            .map_err(not_found_as(id_or_name))?;
        self.audit_secret(&updated, actor, "update");
        Ok(view(updated))
    }

    /// `DELETE /secrets/{secretID}`: the secret and every version.
    pub async fn delete_secret(
        &self,
        team_id: &str,
        actor: &str,
        id_or_name: &str,
    ) -> Result<(), ApiError> {
        let (team, key) = (team_id.to_owned(), id_or_name.to_lowercase());
        let gone = self
            .db(move |s| s.delete_secret(&team, &key))
            .await
            .map_err(not_found_as(id_or_name))?;
        self.audit_secret(&gone, actor, "delete");
        Ok(())
    }

    /// Of `names` (already lower-cased), those the team has no secret of, each once, in the
    /// order given: what a sandbox's network rules refer to and cannot be resolved.
    // Called by the network rules' checks (`network.rs`) once they refer to secrets.
    pub(crate) async fn missing_secrets(
        &self,
        team: &str,
        names: &[String],
    ) -> Result<Vec<String>, ApiError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let (team, names) = (team.to_owned(), names.to_vec());
        Ok(self
            .db(move |s| s.missing_secret_names(&team, &names))
            .await?)
    }

    /// The audit record of a change by the key `actor`: name and version, never the value.
    /// (The request middleware audits the call itself, without either.)
    fn audit_secret(&self, r: &SecretRecord, actor: &str, action: &str) {
        tracing::info!(secret_id = %r.id, name = %r.name, version = r.current_version, action, "secret changed");
        self.audit(NewAuditRecord {
            at: now_ms(),
            team_id: Some(r.team_id.clone()),
            actor: actor.into(),
            sandbox_id: None,
            kind: "secret".into(),
            action: action.into(),
            target: Some(r.name.clone()),
            result: "ok".into(),
            detail: serde_json::json!({ "secretID": r.id, "version": r.current_version }),
        });
    }
}

/// A store error, with "no such secret" named as the caller named it.
fn not_found_as(id_or_name: &str) -> impl FnOnce(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::SecretNotFound => ApiError::SecretNotFound {
            secret: id_or_name.to_owned(),
        },
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lower_cased_and_checked() {
        assert_eq!(check_name("OpenAI-Key").unwrap(), "openai-key");
        for bad in ["", "  ", "a{b", "a}b", "a\nb", "a\u{7f}", "sec_x", "SEC_x"] {
            let e = check_name(bad).unwrap_err();
            let (status, code, msg) = e.parts();
            assert_eq!(
                (status.as_u16(), code),
                (400, "invalid_request_body"),
                "{bad:?}"
            );
            assert!(msg.contains("1-128 bytes"), "{msg}");
        }
        assert!(check_name(&"a".repeat(128)).is_ok());
        assert!(check_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn values_and_metadata_are_bounded() {
        assert!(check_value("").is_err());
        assert!(check_value(&"x".repeat(MAX_VALUE_BYTES)).is_ok());
        let (_, _, msg) = check_value(&"x".repeat(MAX_VALUE_BYTES + 1))
            .unwrap_err()
            .parts();
        assert!(!msg.contains("xxxx"), "the value is never echoed");
        let many: BTreeMap<_, _> = (0..33).map(|i| (i.to_string(), "v".into())).collect();
        assert!(check_metadata(&many).is_err());
        let big: BTreeMap<_, _> = (0..9).map(|i| (i.to_string(), "v".repeat(1000))).collect();
        assert!(check_metadata(&big).is_err(), "over 8192 bytes in all");
        assert!(check_metadata(&BTreeMap::from([("k".repeat(129), String::new())])).is_err());
        assert!(check_metadata(&BTreeMap::from([("k".into(), "v".repeat(1025))])).is_err());
        assert!(check_metadata(&BTreeMap::from([("k".into(), "v".repeat(1024))])).is_ok());
    }

    #[test]
    fn ids_and_page_tokens_round_trip() {
        let id = new_secret_id();
        assert!(id.starts_with("sec_") && id.len() == 36);
        assert!(check_name(&id).is_err(), "an id is never a name");
        let t = page_token("a b/é");
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(page_after(&t).as_deref(), Some("a b/é"));
        assert!(page_after("%%").is_none());
    }
}
