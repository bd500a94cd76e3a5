//! Teams and their API keys. A key's plaintext exists only in the value returned by
//! [`Store::create_api_key`]; the database keeps its SHA-256 and a short prefix for listings.

use crate::db::{OptionalExtension, Sql, SqlExt, params};
use sha2::{Digest, Sha256};

use crate::{Result, Store, StoreError, now_ms};

/// Plaintext keys look like `e2b_<40 hex>`, E2B's own format: SDKs that check a key's form before
/// sending it (`e2b` 2.45 for Python wants `e2b_` and hex) take them. Keys made before this
/// format (`alcove_<40 hex>`) keep working: a key is found by its hash, whatever its form. The
/// listing shows the first 12 characters.
const KEY_PREFIX: &str = "e2b_";
const SHOWN_PREFIX_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// A key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// The first characters of the secret, to tell keys apart.
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A freshly created key: `secret` is shown once and not stored.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub info: ApiKeyInfo,
    pub secret: String,
}

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub team_id: String,
    pub key_id: String,
}

pub(crate) fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

impl Store {
    pub fn create_team(&self, name: &str) -> Result<Team> {
        let team = Team {
            id: format!("team_{}", random_hex(8)),
            name: name.to_owned(),
            created_at: now_ms(),
        };
        self.conn().execute(
            "INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![team.id, team.name, team.created_at],
        )?;
        Ok(team)
    }

    pub fn teams(&self) -> Result<Vec<Team>> {
        Ok(self.conn().query_map(
            "SELECT id, name, created_at FROM teams ORDER BY created_at",
            params![],
            |r| {
                Ok(Team {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created_at: r.get(2)?,
                })
            },
        )?)
    }

    /// The team with this id or name.
    pub fn team(&self, id_or_name: &str) -> Result<Option<Team>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, created_at FROM teams WHERE id = ?1 OR name = ?1",
                params![id_or_name],
                |r| {
                    Ok(Team {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Creates a key for `team_id`. The returned secret is the only copy.
    pub fn create_api_key(&self, team_id: &str, name: &str) -> Result<NewApiKey> {
        if self.team(team_id)?.is_none() {
            return Err(StoreError::TeamNotFound);
        }
        let secret = format!("{KEY_PREFIX}{}", random_hex(20));
        let info = ApiKeyInfo {
            id: format!("key_{}", random_hex(8)),
            team_id: team_id.to_owned(),
            name: name.to_owned(),
            prefix: secret[..SHOWN_PREFIX_LEN].to_owned(),
            created_at: now_ms(),
            last_used_at: None,
            revoked_at: None,
        };
        self.conn().execute(
            "INSERT INTO api_keys (id, team_id, name, prefix, hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                info.id,
                info.team_id,
                info.name,
                info.prefix,
                hash_secret(&secret),
                info.created_at
            ],
        )?;
        Ok(NewApiKey { info, secret })
    }

    /// Keys of one team, or of all teams.
    pub fn list_api_keys(&self, team_id: Option<&str>) -> Result<Vec<ApiKeyInfo>> {
        // The CAST: Postgres cannot tell a parameter's type from `IS NULL` alone.
        Ok(self.conn().query_map(
            "SELECT id, team_id, name, prefix, created_at, last_used_at, revoked_at
             FROM api_keys WHERE CAST(?1 AS TEXT) IS NULL OR team_id = ?1
             ORDER BY created_at, id",
            params![team_id],
            |r| {
                Ok(ApiKeyInfo {
                    id: r.get(0)?,
                    team_id: r.get(1)?,
                    name: r.get(2)?,
                    prefix: r.get(3)?,
                    created_at: r.get(4)?,
                    last_used_at: r.get(5)?,
                    revoked_at: r.get(6)?,
                })
            },
        )?)
    }

    /// Revokes the key with this id. Returns false when no active key has it.
    pub fn revoke_api_key(&self, key_id: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![key_id, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// The team behind a presented secret, if it is a live key. Records the use.
    pub fn authenticate(&self, secret: &str) -> Result<Option<Authenticated>> {
        let hash = hash_secret(secret);
        let conn = self.conn();
        let found = conn
            .query_row(
                "SELECT id, team_id FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
                params![hash],
                |r| {
                    Ok(Authenticated {
                        key_id: r.get(0)?,
                        team_id: r.get(1)?,
                    })
                },
            )
            .optional()?;
        if let Some(a) = &found {
            // At most one write a minute per key: authentication stays a read on hot paths.
            // (The CAST: Postgres would take `?2 - 60000` for a 32-bit integer.)
            let now = now_ms();
            conn.execute(
                "UPDATE api_keys SET last_used_at = ?2
                 WHERE id = ?1
                   AND (last_used_at IS NULL OR last_used_at < CAST(?2 AS BIGINT) - 60000)",
                params![a.key_id, now],
            )?;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashed_listed_without_secret_and_revocable() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("admin").unwrap();
        let key = store.create_api_key(&team.id, "ci").unwrap();
        assert!(key.secret.starts_with(KEY_PREFIX));

        let stored: String = store
            .conn()
            .query_row("SELECT hash FROM api_keys", params![], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, key.secret);
        assert!(!stored.contains(&key.secret[KEY_PREFIX.len()..]));

        let auth = store.authenticate(&key.secret).unwrap().unwrap();
        assert_eq!(auth.team_id, team.id);
        assert!(store.authenticate("alcove_nope").unwrap().is_none());

        let listed = store.list_api_keys(Some(&team.id)).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].prefix, &key.secret[..SHOWN_PREFIX_LEN]);

        assert!(store.revoke_api_key(&key.info.id).unwrap());
        assert!(!store.revoke_api_key(&key.info.id).unwrap());
        assert!(store.authenticate(&key.secret).unwrap().is_none());
    }

    #[test]
    fn a_key_needs_an_existing_team() {
        let store = Store::open_in_memory().unwrap();
        assert!(matches!(
            store.create_api_key("team_missing", "x"),
            Err(StoreError::TeamNotFound)
        ));
    }
}
