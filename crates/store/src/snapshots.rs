//! Snapshot records: the checkpoint tree. Each snapshot names the sandbox it was taken from and
//! its parent, the snapshot that sandbox was itself created from (none for a sandbox made from a
//! template), so the records form a forest rooted at templates.
//!
//! Deleting a snapshot only marks it (`deleted_at`): it can no longer be restored, listed or
//! named, but the tree keeps the node so its descendants keep their ancestry. Whether its files
//! can go is the node's business (reference counting over disk layers, `alcove-node`).

use crate::db::{self, OptionalExtension, Row, Sql, SqlExt, params};

use crate::{Result, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub team_id: String,
    /// The sandbox the snapshot was taken from.
    pub sandbox_id: String,
    /// The snapshot that sandbox was created from.
    pub parent_id: Option<String>,
    pub name: Option<String>,
    /// `snapshot` (asked for) or `fork` (taken implicitly by a fork).
    pub kind: String,
    /// The template at the root of the chain.
    pub template_id: String,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

const COLUMNS: &str =
    "id, team_id, sandbox_id, parent_id, name, kind, template_id, created_at, deleted_at";

fn row(r: &Row) -> db::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: r.get(0)?,
        team_id: r.get(1)?,
        sandbox_id: r.get(2)?,
        parent_id: r.get(3)?,
        name: r.get(4)?,
        kind: r.get(5)?,
        template_id: r.get(6)?,
        created_at: r.get(7)?,
        deleted_at: r.get(8)?,
    })
}

impl Store {
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                s.id,
                s.team_id,
                s.sandbox_id,
                s.parent_id,
                s.name,
                s.kind,
                s.template_id,
                s.created_at,
                s.deleted_at
            ],
        )?;
        Ok(())
    }

    /// A snapshot by id, deleted or not.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()?)
    }

    /// The live snapshot a team can restore by `id_or_name`: an id, or a name (the newest
    /// snapshot of that name).
    pub fn resolve_snapshot(
        &self,
        team_id: &str,
        id_or_name: &str,
    ) -> Result<Option<SnapshotRecord>> {
        let conn = self.conn();
        let by_id = conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM snapshots WHERE id = ?1 AND team_id = ?2
                     AND deleted_at IS NULL"
                ),
                params![id_or_name, team_id],
                row,
            )
            .optional()?;
        if by_id.is_some() {
            return Ok(by_id);
        }
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM snapshots WHERE name = ?1 AND team_id = ?2
                     AND deleted_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 1"
                ),
                params![id_or_name, team_id],
                row,
            )
            .optional()?)
    }

    /// Every snapshot of a team, deleted ones included, oldest first (the whole tree).
    pub fn snapshots_of_team(&self, team_id: &str) -> Result<Vec<SnapshotRecord>> {
        Ok(self.conn().query_map(
            &format!("SELECT {COLUMNS} FROM snapshots WHERE team_id = ?1 ORDER BY created_at, id"),
            params![team_id],
            row,
        )?)
    }

    /// Marks a snapshot deleted. Deleting twice is an error the caller can map to 404.
    pub fn delete_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        {
            let mut conn = self.conn();
            let tx = conn.begin()?;
            let at = now_ms();
            let n = tx.execute(
                "UPDATE snapshots SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL",
                params![id, at],
            )?;
            if n == 0 {
                return Err(StoreError::SnapshotNotFound);
            }
            crate::metering::on_snapshot_deleted(&tx, id, at)?;
            tx.commit()?;
        }
        self.snapshot(id)?.ok_or(StoreError::SnapshotNotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(
        id: &str,
        team: &str,
        parent: Option<&str>,
        name: Option<&str>,
        at: i64,
    ) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            team_id: team.into(),
            sandbox_id: "s1".into(),
            parent_id: parent.map(Into::into),
            name: name.map(Into::into),
            kind: "snapshot".into(),
            template_id: "base".into(),
            created_at: at,
            deleted_at: None,
        }
    }

    #[test]
    fn snapshots_resolve_by_id_or_newest_name_and_deleted_ones_stay_in_the_tree() {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        let other = store.create_team("o").unwrap().id;
        store
            .insert_snapshot(&snap("a", &team, None, Some("cp"), 1))
            .unwrap();
        store
            .insert_snapshot(&snap("b", &team, Some("a"), Some("cp"), 2))
            .unwrap();
        store
            .insert_snapshot(&snap("c", &other, None, None, 3))
            .unwrap();
        assert_eq!(store.resolve_snapshot(&team, "a").unwrap().unwrap().id, "a");
        assert_eq!(
            store.resolve_snapshot(&team, "cp").unwrap().unwrap().id,
            "b"
        );
        assert!(
            store.resolve_snapshot(&team, "c").unwrap().is_none(),
            "other team's"
        );
        store.delete_snapshot("b").unwrap();
        assert!(matches!(
            store.delete_snapshot("b"),
            Err(StoreError::SnapshotNotFound)
        ));
        assert_eq!(
            store.resolve_snapshot(&team, "cp").unwrap().unwrap().id,
            "a"
        );
        let tree = store.snapshots_of_team(&team).unwrap();
        assert_eq!(tree.len(), 2);
        assert_eq!(tree[1].parent_id.as_deref(), Some("a"));
        assert!(tree[1].deleted_at.is_some());
    }
}
