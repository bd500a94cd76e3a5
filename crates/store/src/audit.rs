//! The audit log and run traces: one append-only table of structured events (API calls, state
//! changes, processes, file operations, egress connections), chained by SHA-256 so an edited,
//! removed or reordered record shows.
//!
//! Each team's records form one chain (records of no team, one more), so a team's own export
//! verifies without anyone else's records; `seq` is global and increasing, the cursor of every
//! reader. Each record's `hash` is `sha256(prev_hash "\n" canonical)`, where `canonical` is
//! [`AuditRecord::canonical`]: its fields in a fixed order, one per line, the detail as compact
//! JSON with sorted keys. A chain's first record links to 64 zeros; after retention removed
//! old records, the first one kept carries its `prev_hash`, which is then the anchor.

use sha2::{Digest, Sha256};

use crate::db::{OptionalExtension, Row, Sql, SqlExt, params};
use crate::{Result, Store, StoreError};

/// The `prev_hash` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit event as written (without its place in the chain).
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditRecord {
    /// Milliseconds since the epoch.
    pub at: i64,
    pub team_id: Option<String>,
    /// Who acted: an API key id, `system` (the server itself: reaper, caps) or `sandbox`.
    pub actor: String,
    pub sandbox_id: Option<String>,
    /// `api`, `state`, `process`, `file` or `egress`.
    pub kind: String,
    /// What was done: `POST /v2/sandboxes`, `running -> paused`, `start`, `write`, `connect`.
    pub action: String,
    /// What it was done to (a sandbox, a path, a host), if anything.
    pub target: Option<String>,
    /// How it ended: a status code, `ok`, `exit 0`, `allowed`, `denied`...
    pub result: String,
    /// Everything else, as a JSON object.
    pub detail: serde_json::Value,
}

/// A stored audit record: the event, its number and its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: i64,
    pub event: NewAuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// What the hash covers, besides the previous hash.
    pub fn canonical(seq: i64, e: &NewAuditRecord) -> String {
        let opt = |o: &Option<String>| o.clone().unwrap_or_default();
        format!(
            "{seq}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            e.at,
            opt(&e.team_id),
            e.actor,
            opt(&e.sandbox_id),
            e.kind,
            e.action,
            opt(&e.target),
            e.result,
            // serde_json's maps are sorted (no `preserve_order`), so this is canonical.
            serde_json::to_string(&e.detail).unwrap_or_default()
        )
    }

    pub fn compute_hash(prev_hash: &str, seq: i64, e: &NewAuditRecord) -> String {
        let mut h = Sha256::new();
        h.update(prev_hash.as_bytes());
        h.update(b"\n");
        h.update(Self::canonical(seq, e).as_bytes());
        hex::encode(h.finalize())
    }
}

/// Where a chain breaks: the first record whose hash or link is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub seq: i64,
    pub why: String,
}

/// Checks that `records` (in `seq` order, any mix of teams) chain: each hash is right and each
/// links to the one before of the same team. Each team's first record's `prev_hash` is taken as
/// its anchor (a window of a longer chain).
pub fn verify_chain(records: &[AuditRecord]) -> std::result::Result<(), ChainBreak> {
    let mut last: std::collections::HashMap<Option<&str>, &AuditRecord> =
        std::collections::HashMap::new();
    for r in records {
        if let Some(p) = last.get(&r.event.team_id.as_deref())
            && r.prev_hash != p.hash
        {
            return Err(ChainBreak {
                seq: r.seq,
                why: format!(
                    "its prev_hash does not match record {}'s hash (a record was removed, \
                     reordered or rewritten)",
                    p.seq
                ),
            });
        }
        let want = AuditRecord::compute_hash(&r.prev_hash, r.seq, &r.event);
        if r.hash != want {
            return Err(ChainBreak {
                seq: r.seq,
                why: "its hash does not match its content (the record was edited)".into(),
            });
        }
        last.insert(r.event.team_id.as_deref(), r);
    }
    Ok(())
}

const COLUMNS: &str =
    "seq, at, team_id, actor, sandbox_id, kind, action, target, result, detail, prev_hash, hash";

fn row_to_record(r: &Row) -> crate::db::Result<AuditRecord> {
    let detail: String = r.get(9)?;
    Ok(AuditRecord {
        seq: r.get(0)?,
        event: NewAuditRecord {
            at: r.get(1)?,
            team_id: r.get(2)?,
            actor: r.get(3)?,
            sandbox_id: r.get(4)?,
            kind: r.get(5)?,
            action: r.get(6)?,
            target: r.get(7)?,
            result: r.get(8)?,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        },
        prev_hash: r.get(10)?,
        hash: r.get(11)?,
    })
}

/// Appends records in order, each chained to the last of its team, in the caller's transaction.
pub(crate) fn append(tx: &dyn Sql, records: &[NewAuditRecord]) -> Result<()> {
    let mut seq: i64 = tx.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM audit_events",
        params![],
        |r| r.get(0),
    )?;
    let mut heads: std::collections::HashMap<Option<String>, String> =
        std::collections::HashMap::new();
    let insert = format!(
        "INSERT INTO audit_events ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
         ?11, ?12)"
    );
    for e in records {
        seq += 1;
        let prev = match heads.get(&e.team_id) {
            Some(h) => h.clone(),
            // The team's last record (or the last of no team): two statements rather than
            // SQLite's `team_id IS ?1`, which Postgres lacks, so both use the team index.
            None => match &e.team_id {
                Some(team) => tx.query_row(
                    "SELECT hash FROM audit_events WHERE team_id = ?1 ORDER BY seq DESC LIMIT 1",
                    params![team],
                    |r| r.get::<String>(0),
                ),
                None => tx.query_row(
                    "SELECT hash FROM audit_events WHERE team_id IS NULL ORDER BY seq DESC LIMIT 1",
                    params![],
                    |r| r.get::<String>(0),
                ),
            }
            .optional()?
            .unwrap_or_else(|| GENESIS.to_owned()),
        };
        let hash = AuditRecord::compute_hash(&prev, seq, e);
        let detail =
            serde_json::to_string(&e.detail).map_err(|e| StoreError::Corrupt(Box::new(e)))?;
        tx.execute(
            &insert,
            params![
                seq,
                e.at,
                e.team_id,
                e.actor,
                e.sandbox_id,
                e.kind,
                e.action,
                e.target,
                e.result,
                detail,
                prev,
                hash
            ],
        )?;
        heads.insert(e.team_id.clone(), hash);
    }
    Ok(())
}

/// Which records [`Store::audit_records`] returns.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub team_id: Option<String>,
    pub sandbox_id: Option<String>,
    /// Only records with `seq` above this.
    pub after: i64,
    /// `[since, until)` in ms, when set.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: usize,
}

impl Store {
    /// Appends audit records, chained, in one transaction.
    pub fn append_audit(&self, records: &[NewAuditRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn.begin()?;
        append(&tx, records)?;
        tx.commit()?;
        Ok(())
    }

    /// Records in `seq` order.
    pub fn audit_records(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let conn = self.conn();
        Ok(conn.query_map(
            &format!(
                "SELECT {COLUMNS} FROM audit_events
                 WHERE seq > ?1
                   AND (CAST(?2 AS TEXT) IS NULL OR team_id = ?2)
                   AND (CAST(?3 AS TEXT) IS NULL OR sandbox_id = ?3)
                   AND (CAST(?4 AS BIGINT) IS NULL OR at >= ?4)
                   AND (CAST(?5 AS BIGINT) IS NULL OR at < ?5)
                 ORDER BY seq LIMIT ?6"
            ),
            params![
                q.after,
                q.team_id,
                q.sandbox_id,
                q.since,
                q.until,
                q.limit as i64
            ],
            row_to_record,
        )?)
    }

    /// Deletes records older than `before` (ms), never the newest (it carries the numbering
    /// and the chain on). The first record kept then anchors the chain.
    pub fn prune_audit(&self, before: i64) -> Result<usize> {
        Ok(self.conn().execute(
            "DELETE FROM audit_events WHERE at < ?1
             AND seq < (SELECT MAX(seq) FROM audit_events)",
            params![before],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: i64) -> NewAuditRecord {
        NewAuditRecord {
            at: 1_800_000_000_000 + i,
            team_id: Some("t".into()),
            actor: "key1".into(),
            sandbox_id: Some("s1".into()),
            kind: "process".into(),
            action: "start".into(),
            target: Some("/bin/echo".into()),
            result: "exit 0".into(),
            detail: serde_json::json!({"args": ["hi"], "z": 1, "a": {"y": 2, "b": 3}}),
        }
    }

    #[test]
    fn the_chain_verifies_and_shows_an_edit_a_removal_and_a_reorder() {
        let store = Store::open_in_memory().unwrap();
        store.append_audit(&[ev(1), ev(2)]).unwrap();
        store.append_audit(&[ev(3), ev(4), ev(5)]).unwrap();
        let all = store
            .audit_records(&AuditQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].prev_hash, GENESIS);
        verify_chain(&all).unwrap();
        // A window verifies from its own anchor.
        verify_chain(&all[2..]).unwrap();

        let mut edited = all.clone();
        edited[2].event.result = "exit 1".into();
        assert_eq!(verify_chain(&edited).unwrap_err().seq, 3);
        let mut detail_edited = all.clone();
        detail_edited[1].event.detail["z"] = serde_json::json!(2);
        assert_eq!(verify_chain(&detail_edited).unwrap_err().seq, 2);
        let mut removed = all.clone();
        removed.remove(3);
        assert_eq!(verify_chain(&removed).unwrap_err().seq, 5);
        let mut swapped = all.clone();
        swapped.swap(1, 2);
        assert!(verify_chain(&swapped).is_err());

        // An edit made in the database itself is caught the same way.
        store
            .conn()
            .execute(
                "UPDATE audit_events SET target = 'rm -rf /' WHERE seq = 4",
                params![],
            )
            .unwrap();
        let again = store
            .audit_records(&AuditQuery {
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(verify_chain(&again).unwrap_err().seq, 4);
    }

    #[test]
    fn each_team_has_its_own_chain_so_its_export_verifies_alone() {
        let store = Store::open_in_memory().unwrap();
        let mut b = ev(2);
        b.team_id = Some("u".into());
        let mut none = ev(3);
        none.team_id = None;
        store
            .append_audit(&[ev(1), b.clone(), none, ev(4), b])
            .unwrap();
        let q = |team: Option<&str>| {
            store
                .audit_records(&AuditQuery {
                    team_id: team.map(str::to_owned),
                    limit: 100,
                    ..Default::default()
                })
                .unwrap()
        };
        let all = q(None);
        assert_eq!(all.len(), 5);
        verify_chain(&all).unwrap();
        let t = q(Some("t"));
        assert_eq!(t.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(t[0].prev_hash, GENESIS);
        verify_chain(&t).unwrap();
        verify_chain(&q(Some("u"))).unwrap();
    }

    #[test]
    fn queries_filter_by_team_sandbox_time_and_cursor_and_pruning_keeps_an_anchor() {
        let store = Store::open_in_memory().unwrap();
        let mut other = ev(3);
        other.sandbox_id = Some("s2".into());
        store.append_audit(&[ev(1), ev(2), other, ev(4)]).unwrap();
        let q = |f: AuditQuery| {
            store
                .audit_records(&AuditQuery { limit: 100, ..f })
                .unwrap()
        };
        assert_eq!(
            q(AuditQuery {
                sandbox_id: Some("s1".into()),
                ..Default::default()
            })
            .len(),
            3
        );
        assert_eq!(
            q(AuditQuery {
                after: 2,
                ..Default::default()
            })
            .len(),
            2
        );
        assert_eq!(
            q(AuditQuery {
                since: Some(1_800_000_000_002),
                until: Some(1_800_000_000_004),
                ..Default::default()
            })
            .len(),
            2
        );
        assert!(
            q(AuditQuery {
                team_id: Some("nobody".into()),
                ..Default::default()
            })
            .is_empty()
        );
        assert_eq!(store.prune_audit(1_800_000_000_003).unwrap(), 2);
        let kept = q(AuditQuery::default());
        assert_eq!(kept[0].seq, 3);
        verify_chain(&kept).unwrap();
        // Numbering goes on after a prune.
        store.append_audit(&[ev(9)]).unwrap();
        let kept = q(AuditQuery::default());
        assert_eq!(kept.last().unwrap().seq, 5);
        verify_chain(&kept).unwrap();
    }
}
