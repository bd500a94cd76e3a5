//! E2B's secrets: a team's named values, each stored as versions of ciphertext.
//!
//! The store never sees a value: the API seals each version (AES-256-GCM, `alcove-api`
//! `secrets.rs`) and hands over its nonce and ciphertext. A secret's name is unique in its team
//! and stored lower-cased (the caller lower-cases it); its id starts with `sec_`, which no name
//! may, so one lookup takes either. Updates add a version and move `current_version` with a
//! compare-and-set, so two racing updates never store two versions under one number; only the
//! newest [`KEPT_VERSIONS`] are kept. Deleting a secret deletes every version with it.
//!
//! Callers: the API's secrets service (create, update, list, delete) and the egress proxy's
//! secret source ([`Store::sandbox_secret`], one indexed query per lookup).

use std::collections::BTreeMap;

use crate::db::{OptionalExtension, Row, Sql, SqlExt, params};

use crate::{Result, Store, StoreError};

/// Versions kept per secret: older ones are deleted when a new one is stored.
pub const KEPT_VERSIONS: i64 = 10;

/// A secret as everyone but the egress proxy sees it: never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    /// `sec_` and hex.
    pub id: String,
    pub team_id: String,
    /// Lower-cased.
    pub name: String,
    pub current_version: i64,
    pub metadata: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One version of a value as stored: what the API's cipher made of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedValue {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedValue")
            .field("nonce", &self.nonce.len())
            .field("ciphertext", &self.ciphertext.len())
            .finish()
    }
}

/// The current version of a secret, found through a sandbox (the egress proxy's lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSecret {
    pub team_id: String,
    pub secret_id: String,
    pub version: i64,
    pub sealed: SealedValue,
}

const COLUMNS: &str = "id, team_id, name, current_version, metadata, created_at, updated_at";

fn row(r: &Row) -> crate::db::Result<(SecretRecord, String)> {
    Ok((
        SecretRecord {
            id: r.get(0)?,
            team_id: r.get(1)?,
            name: r.get(2)?,
            current_version: r.get(3)?,
            metadata: BTreeMap::new(),
            created_at: r.get(5)?,
            updated_at: r.get(6)?,
        },
        r.get(4)?,
    ))
}

fn with_metadata((mut rec, json): (SecretRecord, String)) -> Result<SecretRecord> {
    rec.metadata = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(Box::new(e)))?;
    Ok(rec)
}

fn metadata_json(m: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(m).map_err(|e| StoreError::Corrupt(Box::new(e)))
}

fn find(conn: &dyn Sql, team_id: &str, id_or_name: &str) -> Result<Option<SecretRecord>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM secrets WHERE team_id = ?1 AND (id = ?2 OR name = ?2)"),
        params![team_id, id_or_name],
        row,
    )
    .optional()?
    .map(with_metadata)
    .transpose()
}

impl Store {
    /// Stores a new secret and its version 1 (`rec.current_version` is ignored). Refused with
    /// [`StoreError::SecretNameTaken`] when the team has a secret of that name, and with
    /// [`StoreError::SecretLimit`] when it already has `max_per_team`.
    pub fn insert_secret(
        &self,
        rec: &SecretRecord,
        sealed: &SealedValue,
        max_per_team: usize,
    ) -> Result<SecretRecord> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM secrets WHERE team_id = ?1 AND name = ?2)",
            params![rec.team_id, rec.name],
            |r| r.get(0),
        )?;
        if taken {
            return Err(StoreError::SecretNameTaken);
        }
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM secrets WHERE team_id = ?1",
            params![rec.team_id],
            |r| r.get(0),
        )?;
        if count as usize >= max_per_team {
            return Err(StoreError::SecretLimit {
                limit: max_per_team,
            });
        }
        tx.execute(
            &format!("INSERT INTO secrets ({COLUMNS}) VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6)"),
            params![
                rec.id,
                rec.team_id,
                rec.name,
                metadata_json(&rec.metadata)?,
                rec.created_at,
                rec.updated_at
            ],
        )?;
        tx.execute(
            "INSERT INTO secret_versions (secret_id, version, nonce, ciphertext, created_at)
             VALUES (?1, 1, ?2, ?3, ?4)",
            params![rec.id, sealed.nonce, sealed.ciphertext, rec.created_at],
        )?;
        tx.commit()?;
        Ok(SecretRecord {
            current_version: 1,
            ..rec.clone()
        })
    }

    /// A team's secret by id or (lower-cased) name.
    pub fn secret(&self, team_id: &str, id_or_name: &str) -> Result<Option<SecretRecord>> {
        find(&*self.conn(), team_id, id_or_name)
    }

    /// One page of a team's secrets in name order, starting after the name `after`, and
    /// whether more follow.
    pub fn secrets_of_team(
        &self,
        team_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SecretRecord>, bool)> {
        // One extra row tells whether another page follows.
        let rows = self.conn().query_map(
            &format!(
                "SELECT {COLUMNS} FROM secrets WHERE team_id = ?1 AND name > ?2
                 ORDER BY name LIMIT ?3"
            ),
            params![team_id, after.unwrap_or(""), limit as i64 + 1],
            row,
        )?;
        let more = rows.len() > limit;
        let out = rows
            .into_iter()
            .take(limit)
            .map(with_metadata)
            .collect::<Result<Vec<_>>>()?;
        Ok((out, more))
    }

    /// Stores `sealed` as version `expected + 1` of the team's secret `secret_id`, if its
    /// current version is still `expected` (`None` when another update came first: seal again
    /// for the new number). `metadata`, when given, replaces the stored metadata. Versions
    /// older than the newest [`KEPT_VERSIONS`] are deleted.
    pub fn add_secret_version(
        &self,
        team_id: &str,
        secret_id: &str,
        expected: i64,
        sealed: &SealedValue,
        metadata: Option<&BTreeMap<String, String>>,
        at: i64,
    ) -> Result<Option<SecretRecord>> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let next = expected + 1;
        let n = tx.execute(
            "UPDATE secrets SET current_version = ?3, updated_at = ?4,
                 metadata = COALESCE(?5, metadata)
             WHERE team_id = ?1 AND id = ?2 AND current_version = ?6",
            params![
                team_id,
                secret_id,
                next,
                at,
                metadata.map(metadata_json).transpose()?,
                expected
            ],
        )?;
        if n == 0 {
            return match find(&tx, team_id, secret_id)? {
                Some(_) => Ok(None),
                None => Err(StoreError::SecretNotFound),
            };
        }
        tx.execute(
            "INSERT INTO secret_versions (secret_id, version, nonce, ciphertext, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![secret_id, next, sealed.nonce, sealed.ciphertext, at],
        )?;
        tx.execute(
            "DELETE FROM secret_versions WHERE secret_id = ?1 AND version <= ?2",
            params![secret_id, next - KEPT_VERSIONS],
        )?;
        let rec = find(&tx, team_id, secret_id)?.ok_or(StoreError::SecretNotFound)?;
        tx.commit()?;
        Ok(Some(rec))
    }

    /// Deletes a team's secret (by id or lower-cased name) and all its versions.
    pub fn delete_secret(&self, team_id: &str, id_or_name: &str) -> Result<SecretRecord> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let rec = find(&tx, team_id, id_or_name)?.ok_or(StoreError::SecretNotFound)?;
        tx.execute(
            "DELETE FROM secret_versions WHERE secret_id = ?1",
            params![rec.id],
        )?;
        tx.execute("DELETE FROM secrets WHERE id = ?1", params![rec.id])?;
        tx.commit()?;
        Ok(rec)
    }

    /// A stored version of a secret, if it is kept.
    pub fn secret_version(&self, secret_id: &str, version: i64) -> Result<Option<SealedValue>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT nonce, ciphertext FROM secret_versions
                 WHERE secret_id = ?1 AND version = ?2",
                params![secret_id, version],
                |r| {
                    Ok(SealedValue {
                        nonce: r.get(0)?,
                        ciphertext: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// Of `names` (lower-cased), those the team has no secret of, in the order given.
    pub fn missing_secret_names(&self, team_id: &str, names: &[String]) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut out = Vec::new();
        for n in names {
            let found: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM secrets WHERE team_id = ?1 AND name = ?2)",
                params![team_id, n],
                |r| r.get(0),
            )?;
            if !found && !out.contains(n) {
                out.push(n.clone());
            }
        }
        Ok(out)
    }

    /// The current version of the secret `name` (lower-cased) of the team that owns
    /// `sandbox_id`, or `None` when there is no such sandbox or secret. One query over the
    /// primary key and the `(team_id, name)` index.
    pub fn sandbox_secret(&self, sandbox_id: &str, name: &str) -> Result<Option<SandboxSecret>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT s.team_id, k.id, k.current_version, v.nonce, v.ciphertext
                 FROM sandboxes s
                 JOIN secrets k ON k.team_id = s.team_id AND k.name = ?2
                 JOIN secret_versions v ON v.secret_id = k.id AND v.version = k.current_version
                 WHERE s.id = ?1",
                params![sandbox_id, name],
                |r| {
                    Ok(SandboxSecret {
                        team_id: r.get(0)?,
                        secret_id: r.get(1)?,
                        version: r.get(2)?,
                        sealed: SealedValue {
                            nonce: r.get(3)?,
                            ciphertext: r.get(4)?,
                        },
                    })
                },
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSandboxRecord, now_ms};

    fn rec(id: &str, team: &str, name: &str) -> SecretRecord {
        SecretRecord {
            id: id.into(),
            team_id: team.into(),
            name: name.into(),
            current_version: 0,
            metadata: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            created_at: 1,
            updated_at: 1,
        }
    }

    fn sealed(b: u8) -> SealedValue {
        SealedValue {
            nonce: vec![b; 12],
            ciphertext: vec![b; 20],
        }
    }

    #[test]
    fn secrets_are_found_by_id_or_name_within_their_team_only() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        let other = store.create_team("o").unwrap().id;
        let made = store
            .insert_secret(&rec("sec_1", &team, "api-key"), &sealed(1), 10)
            .unwrap();
        assert_eq!(made.current_version, 1);
        assert_eq!(store.secret(&team, "sec_1").unwrap().unwrap(), made);
        assert_eq!(store.secret(&team, "api-key").unwrap().unwrap(), made);
        assert!(store.secret(&other, "sec_1").unwrap().is_none());
        assert!(store.secret(&other, "api-key").unwrap().is_none());
        assert_eq!(store.secret_version("sec_1", 1).unwrap(), Some(sealed(1)));
        // The same name in another team is another secret.
        store
            .insert_secret(&rec("sec_2", &other, "api-key"), &sealed(2), 10)
            .unwrap();
        assert!(matches!(
            store.insert_secret(&rec("sec_3", &team, "api-key"), &sealed(3), 10),
            Err(StoreError::SecretNameTaken)
        ));
    }

    #[test]
    fn a_team_is_capped() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        store
            .insert_secret(&rec("sec_1", &team, "a"), &sealed(1), 2)
            .unwrap();
        store
            .insert_secret(&rec("sec_2", &team, "b"), &sealed(1), 2)
            .unwrap();
        assert!(matches!(
            store.insert_secret(&rec("sec_3", &team, "c"), &sealed(1), 2),
            Err(StoreError::SecretLimit { limit: 2 })
        ));
        store.delete_secret(&team, "a").unwrap();
        store
            .insert_secret(&rec("sec_3", &team, "c"), &sealed(1), 2)
            .unwrap();
    }

    #[test]
    fn updates_add_versions_by_compare_and_set_and_keep_the_newest() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        store
            .insert_secret(&rec("sec_1", &team, "a"), &sealed(1), 10)
            .unwrap();
        let v2 = store
            .add_secret_version(&team, "sec_1", 1, &sealed(2), None, 5)
            .unwrap()
            .unwrap();
        assert_eq!((v2.current_version, v2.updated_at), (2, 5));
        assert_eq!(v2.metadata["env"], "prod", "metadata kept when not given");
        // A racing update that read version 1 is told to seal again.
        assert!(
            store
                .add_secret_version(&team, "sec_1", 1, &sealed(9), None, 6)
                .unwrap()
                .is_none()
        );
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let v3 = store
            .add_secret_version(&team, "sec_1", 2, &sealed(3), Some(&meta), 7)
            .unwrap()
            .unwrap();
        assert_eq!(v3.metadata, meta, "metadata replaced");
        assert!(matches!(
            store.add_secret_version(&team, "sec_x", 1, &sealed(3), None, 7),
            Err(StoreError::SecretNotFound)
        ));
        let other = store.create_team("o").unwrap().id;
        assert!(matches!(
            store.add_secret_version(&other, "sec_1", 3, &sealed(3), None, 7),
            Err(StoreError::SecretNotFound)
        ));
        for v in 3..20 {
            store
                .add_secret_version(&team, "sec_1", v, &sealed(v as u8), None, 8)
                .unwrap()
                .unwrap();
        }
        let kept: i64 = store
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM secret_versions WHERE secret_id = 'sec_1'",
                params![],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, KEPT_VERSIONS);
        assert_eq!(store.secret_version("sec_1", 20).unwrap(), Some(sealed(19)));
        assert!(store.secret_version("sec_1", 10).unwrap().is_none());
    }

    #[test]
    fn deleting_removes_every_version() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        store
            .insert_secret(&rec("sec_1", &team, "a"), &sealed(1), 10)
            .unwrap();
        store
            .add_secret_version(&team, "sec_1", 1, &sealed(2), None, 2)
            .unwrap();
        let other = store.create_team("o").unwrap().id;
        assert!(matches!(
            store.delete_secret(&other, "a"),
            Err(StoreError::SecretNotFound)
        ));
        assert_eq!(store.delete_secret(&team, "sec_1").unwrap().name, "a");
        assert!(store.secret(&team, "a").unwrap().is_none());
        assert!(store.secret_version("sec_1", 1).unwrap().is_none());
        assert!(store.secret_version("sec_1", 2).unwrap().is_none());
        assert!(matches!(
            store.delete_secret(&team, "a"),
            Err(StoreError::SecretNotFound)
        ));
    }

    #[test]
    fn lists_page_in_name_order() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        let other = store.create_team("o").unwrap().id;
        for (i, n) in ["c", "a", "b"].iter().enumerate() {
            store
                .insert_secret(&rec(&format!("sec_{i}"), &team, n), &sealed(1), 10)
                .unwrap();
        }
        store
            .insert_secret(&rec("sec_x", &other, "aa"), &sealed(1), 10)
            .unwrap();
        let (page, more) = store.secrets_of_team(&team, None, 2).unwrap();
        let names: Vec<_> = page.iter().map(|s| s.name.as_str()).collect();
        assert_eq!((names, more), (vec!["a", "b"], true));
        let (page, more) = store.secrets_of_team(&team, Some("b"), 2).unwrap();
        let names: Vec<_> = page.iter().map(|s| s.name.as_str()).collect();
        assert_eq!((names, more), (vec!["c"], false));
        assert_eq!(page[0].metadata["env"], "prod");
    }

    #[test]
    fn a_sandbox_finds_its_teams_current_version_and_names_are_checked() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        let other = store.create_team("o").unwrap().id;
        store
            .upsert_template(&crate::TemplateRecord::sample("tpl1", &["base"]))
            .unwrap();
        store
            .insert_sandbox(&NewSandboxRecord::sample("sbx1", &team, "tpl1"))
            .unwrap();
        store
            .insert_secret(&rec("sec_1", &team, "a"), &sealed(1), 10)
            .unwrap();
        store
            .insert_secret(&rec("sec_2", &other, "b"), &sealed(1), 10)
            .unwrap();
        store
            .add_secret_version(&team, "sec_1", 1, &sealed(2), None, now_ms())
            .unwrap();
        let found = store.sandbox_secret("sbx1", "a").unwrap().unwrap();
        assert_eq!(
            (
                found.team_id.as_str(),
                found.secret_id.as_str(),
                found.version
            ),
            (team.as_str(), "sec_1", 2)
        );
        assert_eq!(found.sealed, sealed(2));
        assert!(
            store.sandbox_secret("sbx1", "b").unwrap().is_none(),
            "other team's"
        );
        assert!(store.sandbox_secret("nope", "a").unwrap().is_none());
        let names = vec![
            "a".to_string(),
            "b".to_string(),
            "c".to_string(),
            "b".into(),
        ];
        assert_eq!(
            store.missing_secret_names(&team, &names).unwrap(),
            vec!["b", "c"]
        );
    }
}
