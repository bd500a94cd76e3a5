//! What a team holds, for its quotas: sandboxes creating or running (a VM's CPU and memory),
//! paused sandboxes and live snapshots (disk), and the ids whose files the backend measures.
//! Also the paused sandboxes past the retention period, for the reaper.

use crate::db::{SqlExt, params};

use crate::{Result, Store};

/// One team's holdings, read in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeamUsage {
    /// Sandboxes `creating` or `running`.
    pub running: usize,
    /// Paused sandboxes, oldest pause first.
    pub paused_ids: Vec<String>,
    /// Snapshots asked for (`kind = 'snapshot'`) and not deleted, oldest first. A fork's
    /// implicit snapshot is deleted once its children exist and does not count.
    pub snapshot_ids: Vec<String>,
}

impl TeamUsage {
    pub fn paused(&self) -> usize {
        self.paused_ids.len()
    }

    pub fn snapshots(&self) -> usize {
        self.snapshot_ids.len()
    }
}

impl Store {
    pub fn team_usage(&self, team_id: &str) -> Result<TeamUsage> {
        let conn = self.conn();
        let running: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE team_id = ?1 AND state IN ('creating','running')",
            params![team_id],
            |r| r.get(0),
        )?;
        let paused_ids = conn.query_map(
            "SELECT id FROM sandboxes WHERE team_id = ?1 AND state = 'paused'
             ORDER BY paused_at, id",
            params![team_id],
            |r| r.get(0),
        )?;
        let snapshot_ids = conn.query_map(
            "SELECT id FROM snapshots WHERE team_id = ?1 AND kind = 'snapshot'
             AND deleted_at IS NULL ORDER BY created_at, id",
            params![team_id],
            |r| r.get(0),
        )?;
        Ok(TeamUsage {
            running: running as usize,
            paused_ids,
            snapshot_ids,
        })
    }

    /// Paused sandboxes paused at or before `cutoff` (ms since the epoch), oldest first.
    pub fn paused_before(&self, cutoff: i64) -> Result<Vec<String>> {
        Ok(self.conn().query_map(
            "SELECT id FROM sandboxes WHERE state = 'paused' AND paused_at IS NOT NULL
             AND paused_at <= ?1 ORDER BY paused_at, id",
            params![cutoff],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use crate::{NewSandboxRecord, SandboxState, SnapshotRecord, Store, TemplateRecord, now_ms};

    #[test]
    fn usage_counts_running_paused_and_live_snapshots_of_one_team() {
        let store = Store::open_in_memory().unwrap();
        let a = store.create_team("a").unwrap().id;
        let b = store.create_team("b").unwrap().id;
        store
            .upsert_template(&TemplateRecord::sample("tpl1", &["base"]))
            .unwrap();
        for (id, team) in [("s1", &a), ("s2", &a), ("s3", &a), ("s4", &b)] {
            store
                .insert_sandbox(&NewSandboxRecord::sample(id, team, "tpl1"))
                .unwrap();
            store
                .transition(id, SandboxState::Running, "started")
                .unwrap();
        }
        store
            .transition("s2", SandboxState::Paused, "paused")
            .unwrap();
        store
            .transition("s3", SandboxState::Killed, "killed")
            .unwrap();
        for (id, kind) in [
            ("snapA", "snapshot"),
            ("snapB", "snapshot"),
            ("forkC", "fork"),
        ] {
            store
                .insert_snapshot(&SnapshotRecord {
                    id: id.into(),
                    team_id: a.clone(),
                    sandbox_id: "s1".into(),
                    parent_id: None,
                    name: None,
                    kind: kind.into(),
                    template_id: "tpl1".into(),
                    created_at: now_ms(),
                    deleted_at: None,
                })
                .unwrap();
        }
        store.delete_snapshot("snapB").unwrap();
        let u = store.team_usage(&a).unwrap();
        assert_eq!(u.running, 1);
        assert_eq!(u.paused_ids, vec!["s2".to_owned()]);
        assert_eq!(u.snapshot_ids, vec!["snapA".to_owned()]);
        assert_eq!(store.team_usage(&b).unwrap().running, 1);
        assert_eq!(store.paused_before(now_ms() + 1).unwrap(), vec!["s2"]);
        assert!(store.paused_before(now_ms() - 60_000).unwrap().is_empty());
    }
}
