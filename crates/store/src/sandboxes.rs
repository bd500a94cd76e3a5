//! Sandbox records: what was asked for, what the backend gave, where each sandbox is in its
//! lifecycle, and every state change with its reason. Env var values never reach this table,
//! only their names, so a secret passed at create cannot leak through the database or logs.

use std::collections::BTreeMap;

use crate::db::{self, DbError, OptionalExtension, Row, Sql, SqlExt, ToValue, Value, params};

use crate::{Result, SandboxState, Store, StoreError, now_ms};

/// What the API records when a create request is accepted (state `creating`).
#[derive(Debug, Clone)]
pub struct NewSandboxRecord {
    pub id: String,
    pub team_id: String,
    pub template_id: String,
    /// The alias the caller named the template by, when it was one.
    pub alias: Option<String>,
    pub started_at: i64,
    pub end_at: i64,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub envd_version: String,
    pub envd_access_token: Option<String>,
    pub auto_pause: bool,
    /// The timeout pause keeps only the disk (`autoPauseMemory: false`).
    pub auto_pause_disk_only: bool,
    pub allow_internet_access: Option<bool>,
    /// Set when the sandbox was created with `allowPublicTraffic: false`: proxied requests to
    /// its ports (other than the agent's) must carry it.
    pub traffic_access_token: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub env_names: Vec<String>,
    /// Resume when traffic arrives while paused (`autoResume.enabled`).
    pub auto_resume: bool,
    /// The lifetime asked for at create; a resume without its own timeout restarts it.
    pub timeout_ms: i64,
    /// The snapshot the sandbox is created from, when it is (create from snapshot, fork).
    pub snapshot_id: Option<String>,
    /// `network.maskRequestHost`: the Host header for requests proxied to its ports
    /// (`${PORT}` is the port).
    pub mask_request_host: Option<String>,
}

impl NewSandboxRecord {
    #[cfg(test)]
    pub(crate) fn sample(id: &str, team_id: &str, template_id: &str) -> NewSandboxRecord {
        NewSandboxRecord {
            id: id.into(),
            team_id: team_id.into(),
            template_id: template_id.into(),
            alias: None,
            started_at: now_ms(),
            end_at: now_ms() + 300_000,
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            envd_version: "0.2.0".into(),
            envd_access_token: Some("tok".into()),
            auto_pause: false,
            auto_pause_disk_only: false,
            allow_internet_access: None,
            traffic_access_token: None,
            metadata: BTreeMap::from([("user".to_string(), "alice".to_string())]),
            env_names: vec!["SECRET".into()],
            auto_resume: false,
            timeout_ms: 300_000,
            snapshot_id: None,
            mask_request_host: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub team_id: String,
    pub template_id: String,
    pub alias: Option<String>,
    pub state: SandboxState,
    pub created_at: i64,
    pub started_at: i64,
    pub end_at: i64,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub envd_version: String,
    pub envd_access_token: Option<String>,
    pub auto_pause: bool,
    pub auto_pause_disk_only: bool,
    pub allow_internet_access: Option<bool>,
    pub traffic_access_token: Option<String>,
    /// Why the sandbox ended (`killed`/`lost` only).
    pub end_reason: Option<String>,
    pub ended_at: Option<i64>,
    pub metadata: BTreeMap<String, String>,
    pub env_names: Vec<String>,
    pub auto_resume: bool,
    pub timeout_ms: Option<i64>,
    /// When the sandbox was last paused.
    pub paused_at: Option<i64>,
    pub snapshot_id: Option<String>,
    pub mask_request_host: Option<String>,
    /// The volumes it was created with, in the order asked for (`volumes.rs`).
    pub volume_mounts: Vec<crate::VolumeMount>,
}

/// One line of a sandbox's state history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxEvent {
    pub seq: i64,
    pub at: i64,
    pub from: Option<SandboxState>,
    pub to: SandboxState,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ListOrder {
    Asc,
    /// Newest first, E2B's order when the caller names none.
    #[default]
    Desc,
}

/// Where the next page starts: the last item of this page, in list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub started_at: i64,
    pub id: String,
}

#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    pub team_id: Option<String>,
    /// Empty means any state.
    pub states: Vec<SandboxState>,
    /// Every pair must match.
    pub metadata: Vec<(String, String)>,
    /// Template id or the alias it was created by.
    pub template: Option<String>,
    pub started_after: Option<i64>,
    pub order: ListOrder,
    pub limit: Option<usize>,
    pub after: Option<PageCursor>,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<SandboxRecord>,
    /// Set when more items follow.
    pub next: Option<PageCursor>,
}

const COLUMNS: &str = "id, team_id, template_id, alias, state, created_at, started_at, end_at, \
    cpu_count, memory_mb, disk_size_mb, envd_version, envd_access_token, auto_pause, \
    allow_internet_access, end_reason, ended_at, traffic_access_token, auto_resume, timeout_ms, \
    paused_at, snapshot_id, mask_request_host, auto_pause_disk_only";

fn row_to_sandbox(r: &Row) -> db::Result<SandboxRecord> {
    let state: String = r.get(4)?;
    let state = state
        .parse::<SandboxState>()
        .map_err(|e| DbError::conversion(4, e))?;
    Ok(SandboxRecord {
        id: r.get(0)?,
        team_id: r.get(1)?,
        template_id: r.get(2)?,
        alias: r.get(3)?,
        state,
        created_at: r.get(5)?,
        started_at: r.get(6)?,
        end_at: r.get(7)?,
        cpu_count: r.get(8)?,
        memory_mb: r.get(9)?,
        disk_size_mb: r.get(10)?,
        envd_version: r.get(11)?,
        envd_access_token: r.get(12)?,
        auto_pause: r.get(13)?,
        allow_internet_access: r.get(14)?,
        end_reason: r.get(15)?,
        ended_at: r.get(16)?,
        traffic_access_token: r.get(17)?,
        metadata: BTreeMap::new(),
        env_names: Vec::new(),
        auto_resume: r.get(18)?,
        timeout_ms: r.get(19)?,
        paused_at: r.get(20)?,
        snapshot_id: r.get(21)?,
        mask_request_host: r.get(22)?,
        auto_pause_disk_only: r.get(23)?,
        volume_mounts: Vec::new(),
    })
}

/// Sandboxes whose details one round of [`load_details`] asks for at once: few enough
/// parameters for either database, and three statements per batch instead of per sandbox.
const DETAILS_BATCH: usize = 500;

/// Fills in each record's metadata, env var names and volume mounts, a batch of sandboxes per
/// statement (a list of thousands, as the background duties read every few seconds, is a few
/// statements, not three per sandbox).
fn load_details(conn: &dyn Sql, records: &mut [SandboxRecord]) -> Result<()> {
    use std::collections::HashMap;
    for batch in records.chunks_mut(DETAILS_BATCH) {
        let ids: Vec<Value> = batch.iter().map(|s| Value::Text(s.id.clone())).collect();
        let refs: Vec<&dyn ToValue> = ids.iter().map(|v| v as &dyn ToValue).collect();
        let marks = (1..=ids.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut metadata: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        for (id, k, v) in conn.query_map(
            &format!(
                "SELECT sandbox_id, key, value FROM sandbox_metadata
                 WHERE sandbox_id IN ({marks})"
            ),
            &refs,
            |r| Ok((r.get::<String>(0)?, r.get(1)?, r.get(2)?)),
        )? {
            metadata.entry(id).or_default().insert(k, v);
        }
        let mut env: HashMap<String, Vec<String>> = HashMap::new();
        for (id, name) in conn.query_map(
            &format!(
                "SELECT sandbox_id, name FROM sandbox_env_names
                 WHERE sandbox_id IN ({marks}) ORDER BY sandbox_id, name"
            ),
            &refs,
            |r| Ok((r.get::<String>(0)?, r.get(1)?)),
        )? {
            env.entry(id).or_default().push(name);
        }
        let mut mounts = crate::volumes::mounts_of(conn, &marks, &refs)?;
        for s in batch {
            s.metadata = metadata.remove(&s.id).unwrap_or_default();
            s.env_names = env.remove(&s.id).unwrap_or_default();
            s.volume_mounts = mounts.remove(&s.id).unwrap_or_default();
        }
    }
    Ok(())
}

fn insert_event(
    tx: &dyn Sql,
    id: &str,
    from: Option<SandboxState>,
    to: SandboxState,
    reason: &str,
) -> Result<()> {
    let at = now_ms();
    tx.execute(
        "INSERT INTO sandbox_events (sandbox_id, at, from_state, to_state, reason)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, at, from.map(|s| s.as_str()), to.as_str(), reason],
    )?;
    crate::metering::on_state_change(tx, id, from, to, at)?;
    let team: Option<String> = tx
        .query_row(
            "SELECT team_id FROM sandboxes WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )
        .optional()?;
    crate::audit::append(
        tx,
        &[crate::NewAuditRecord {
            at,
            team_id: team,
            actor: "system".into(),
            sandbox_id: Some(id.to_owned()),
            kind: "state".into(),
            action: match from {
                Some(f) => format!("{f} -> {to}"),
                None => format!("-> {to}"),
            },
            target: Some(id.to_owned()),
            result: "ok".into(),
            detail: serde_json::json!({ "reason": reason }),
        }],
    )
}

fn current_state(tx: &dyn Sql, id: &str) -> Result<SandboxState> {
    let state: Option<String> = tx
        .query_row(
            "SELECT state FROM sandboxes WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )
        .optional()?;
    let state = state.ok_or(StoreError::SandboxNotFound)?;
    state.parse().map_err(|e| StoreError::Corrupt(Box::new(e)))
}

impl Store {
    /// Records an accepted create request, in state `creating`.
    pub fn insert_sandbox(&self, s: &NewSandboxRecord) -> Result<()> {
        self.insert_sandbox_with_mounts(s, &[])
    }

    /// [`Store::insert_sandbox`] for a sandbox that mounts `mounts`, recorded in the same
    /// transaction. Every volume must still be the team's, checked in that transaction (a
    /// racing delete either sees this sandbox and is refused, or wins and this insert fails
    /// with [`StoreError::MountedVolumeMissing`]).
    pub fn insert_sandbox_with_mounts(
        &self,
        s: &NewSandboxRecord,
        mounts: &[crate::VolumeMount],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        crate::volumes::check_mountable(&tx, &s.team_id, mounts)?;
        tx.execute(
            &format!(
                "INSERT INTO sandboxes ({COLUMNS}) VALUES
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, NULL, NULL, ?16,
                  ?17, ?18, NULL, ?19, ?20, ?21)"
            ),
            params![
                s.id,
                s.team_id,
                s.template_id,
                s.alias,
                SandboxState::Creating.as_str(),
                now_ms(),
                s.started_at,
                s.end_at,
                s.cpu_count,
                s.memory_mb,
                s.disk_size_mb,
                s.envd_version,
                s.envd_access_token,
                s.auto_pause,
                s.allow_internet_access,
                s.traffic_access_token,
                s.auto_resume,
                s.timeout_ms,
                s.snapshot_id,
                s.mask_request_host,
                s.auto_pause_disk_only,
            ],
        )?;
        for (k, v) in &s.metadata {
            tx.execute(
                "INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES (?1, ?2, ?3)",
                params![s.id, k, v],
            )?;
        }
        for name in &s.env_names {
            tx.execute(
                "INSERT INTO sandbox_env_names (sandbox_id, name) VALUES (?1, ?2)
                 ON CONFLICT DO NOTHING",
                params![s.id, name],
            )?;
        }
        crate::volumes::insert_mounts(&tx, &s.id, mounts)?;
        insert_event(&tx, &s.id, None, SandboxState::Creating, "create requested")?;
        tx.commit()?;
        Ok(())
    }

    /// Moves a sandbox to `to` if the lifecycle allows it, recording `reason` in its history.
    pub fn transition(&self, id: &str, to: SandboxState, reason: &str) -> Result<SandboxRecord> {
        {
            let mut conn = self.conn();
            let tx = conn.begin()?;
            let from = current_state(&tx, id)?;
            if !from.can_transition_to(to) {
                return Err(StoreError::Transition { from, to });
            }
            if to.is_terminal() {
                tx.execute(
                    "UPDATE sandboxes SET state = ?2, end_reason = ?3, ended_at = ?4 WHERE id = ?1",
                    params![id, to.as_str(), reason, now_ms()],
                )?;
            } else if to == SandboxState::Paused {
                tx.execute(
                    "UPDATE sandboxes SET state = ?2, paused_at = ?3 WHERE id = ?1",
                    params![id, to.as_str(), now_ms()],
                )?;
            } else {
                tx.execute(
                    "UPDATE sandboxes SET state = ?2 WHERE id = ?1",
                    params![id, to.as_str()],
                )?;
            }
            insert_event(&tx, id, Some(from), to, reason)?;
            tx.commit()?;
        }
        self.sandbox(id)?.ok_or(StoreError::SandboxNotFound)
    }

    /// A `creating` sandbox came up: records what the backend actually gave it and marks it
    /// `running`, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn mark_running(
        &self,
        id: &str,
        cpu_count: u32,
        memory_mb: u32,
        disk_size_mb: u32,
        envd_version: &str,
        started_at: i64,
        end_at: i64,
    ) -> Result<SandboxRecord> {
        {
            let mut conn = self.conn();
            let tx = conn.begin()?;
            let from = current_state(&tx, id)?;
            if !from.can_transition_to(SandboxState::Running) {
                return Err(StoreError::Transition {
                    from,
                    to: SandboxState::Running,
                });
            }
            tx.execute(
                "UPDATE sandboxes SET state = 'running', cpu_count = ?2, memory_mb = ?3,
                     disk_size_mb = ?4, envd_version = ?5, started_at = ?6, end_at = ?7
                 WHERE id = ?1",
                params![
                    id,
                    cpu_count,
                    memory_mb,
                    disk_size_mb,
                    envd_version,
                    started_at,
                    end_at
                ],
            )?;
            insert_event(&tx, id, Some(from), SandboxState::Running, "started")?;
            tx.commit()?;
        }
        self.sandbox(id)?.ok_or(StoreError::SandboxNotFound)
    }

    /// A paused sandbox runs again: `running`, with its new end time (paused time does not
    /// count against the lifetime), in one transaction.
    pub fn mark_resumed(&self, id: &str, end_at: i64, reason: &str) -> Result<SandboxRecord> {
        {
            let mut conn = self.conn();
            let tx = conn.begin()?;
            let from = current_state(&tx, id)?;
            if from != SandboxState::Paused {
                return Err(StoreError::Transition {
                    from,
                    to: SandboxState::Running,
                });
            }
            tx.execute(
                "UPDATE sandboxes SET state = 'running', end_at = ?2 WHERE id = ?1",
                params![id, end_at],
            )?;
            insert_event(&tx, id, Some(from), SandboxState::Running, reason)?;
            tx.commit()?;
        }
        self.sandbox(id)?.ok_or(StoreError::SandboxNotFound)
    }

    /// Records the latest checkpoint a sandbox descends from (after a snapshot of it).
    pub fn set_sandbox_snapshot(&self, id: &str, snapshot_id: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET snapshot_id = ?2 WHERE id = ?1",
            params![id, snapshot_id],
        )?;
        if n == 0 {
            return Err(StoreError::SandboxNotFound);
        }
        Ok(())
    }

    /// Sets when a live sandbox expires.
    pub fn set_end_at(&self, id: &str, end_at: i64) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET end_at = ?2 WHERE id = ?1 AND state IN ('creating','running','paused')",
            params![id, end_at],
        )?;
        if n == 0 {
            return Err(StoreError::SandboxNotFound);
        }
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>> {
        let conn = self.conn();
        let s = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"),
                params![id],
                row_to_sandbox,
            )
            .optional()?;
        let Some(s) = s else { return Ok(None) };
        let mut one = [s];
        load_details(&*conn, &mut one)?;
        let [s] = one;
        Ok(Some(s))
    }

    /// State history, oldest first.
    pub fn sandbox_events(&self, id: &str) -> Result<Vec<SandboxEvent>> {
        let conn = self.conn();
        let rows = conn.query_map(
            "SELECT seq, at, from_state, to_state, reason FROM sandbox_events
             WHERE sandbox_id = ?1 ORDER BY seq",
            params![id],
            |r| {
                let from: Option<String> = r.get(2)?;
                let to: String = r.get(3)?;
                Ok((r.get(0)?, r.get(1)?, from, to, r.get(4)?))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at, from, to, reason): (i64, i64, Option<String>, String, String) = row;
            let parse = |s: &str| s.parse().map_err(|e| StoreError::Corrupt(Box::new(e)));
            out.push(SandboxEvent {
                seq,
                at,
                from: from.as_deref().map(parse).transpose()?,
                to: parse(&to)?,
                reason,
            });
        }
        Ok(out)
    }

    /// Sandboxes matching `f`, one page of them.
    pub fn list_sandboxes(&self, f: &SandboxFilter) -> Result<Page> {
        let mut sql = format!("SELECT {COLUMNS} FROM sandboxes s WHERE 1=1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(team) = &f.team_id {
            args.push(Value::Text(team.clone()));
            sql += &format!(" AND team_id = ?{}", args.len());
        }
        if !f.states.is_empty() {
            let mut marks = Vec::new();
            for st in &f.states {
                args.push(Value::Text(st.as_str().into()));
                marks.push(format!("?{}", args.len()));
            }
            sql += &format!(" AND state IN ({})", marks.join(","));
        }
        for (k, v) in &f.metadata {
            args.push(Value::Text(k.clone()));
            args.push(Value::Text(v.clone()));
            sql += &format!(
                " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id \
                 AND m.key = ?{} AND m.value = ?{})",
                args.len() - 1,
                args.len()
            );
        }
        if let Some(t) = &f.template {
            args.push(Value::Text(t.clone()));
            sql += &format!(" AND (template_id = ?{0} OR alias = ?{0})", args.len());
        }
        if let Some(after) = f.started_after {
            args.push(Value::Int(after));
            sql += &format!(" AND started_at >= ?{}", args.len());
        }
        let (cmp, dir) = match f.order {
            ListOrder::Asc => (">", "ASC"),
            ListOrder::Desc => ("<", "DESC"),
        };
        if let Some(c) = &f.after {
            args.push(Value::Int(c.started_at));
            args.push(Value::Text(c.id.clone()));
            sql += &format!(
                " AND (started_at, id) {cmp} (?{}, ?{})",
                args.len() - 1,
                args.len()
            );
        }
        sql += &format!(" ORDER BY started_at {dir}, id {dir}");
        if let Some(limit) = f.limit {
            // One extra row tells whether another page follows.
            args.push(Value::Int(limit as i64 + 1));
            sql += &format!(" LIMIT ?{}", args.len());
        }
        let conn = self.conn();
        let refs: Vec<&dyn ToValue> = args.iter().map(|v| v as &dyn ToValue).collect();
        let mut items = conn.query_map(&sql, &refs, row_to_sandbox)?;
        let mut next = None;
        if let Some(limit) = f.limit
            && items.len() > limit
        {
            items.truncate(limit);
            next = items.last().map(|s| PageCursor {
                started_at: s.started_at,
                id: s.id.clone(),
            });
        }
        load_details(&*conn, &mut items)?;
        Ok(Page { items, next })
    }

    /// Sandboxes that still have (or should have) a VM: creating, running or paused.
    pub fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        Ok(self
            .list_sandboxes(&SandboxFilter {
                states: vec![
                    SandboxState::Creating,
                    SandboxState::Running,
                    SandboxState::Paused,
                ],
                ..Default::default()
            })?
            .items)
    }

    /// Running sandboxes whose end time has passed, each with whether it pauses (`autoPause`)
    /// rather than dies at its end, and whether that pause keeps only the disk. Paused sandboxes
    /// never expire.
    pub fn expired_sandboxes(&self, now: i64) -> Result<Vec<(String, bool, bool)>> {
        let conn = self.conn();
        let ids = conn.query_map(
            "SELECT id, auto_pause, auto_pause_disk_only FROM sandboxes
             WHERE state = 'running' AND end_at <= ?1 ORDER BY end_at, id",
            params![now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(ids)
    }

    /// Sandboxes of a team that hold a VM's CPU and memory (creating or running).
    pub fn count_active(&self, team_id: &str) -> Result<usize> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE team_id = ?1 AND state IN ('creating','running')",
            params![team_id],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_team() -> (Store, String) {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap();
        (store, team.id)
    }

    #[test]
    fn history_records_every_change_and_refuses_illegal_ones() {
        let (store, team) = store_with_team();
        store
            .insert_sandbox(&NewSandboxRecord::sample("s1", &team, "base"))
            .unwrap();
        assert!(matches!(
            store.transition("s1", SandboxState::Paused, "x"),
            Err(StoreError::Transition { .. })
        ));
        store
            .mark_running("s1", 4, 1024, 2048, "0.3.0", 10, 20)
            .unwrap();
        let s = store
            .transition("s1", SandboxState::Killed, "killed by API request")
            .unwrap();
        assert_eq!(s.cpu_count, 4);
        assert_eq!(s.end_reason.as_deref(), Some("killed by API request"));
        assert!(s.ended_at.is_some());
        assert!(matches!(
            store.transition("s1", SandboxState::Running, "again"),
            Err(StoreError::Transition { .. })
        ));
        let ev = store.sandbox_events("s1").unwrap();
        let states: Vec<_> = ev.iter().map(|e| (e.from, e.to)).collect();
        assert_eq!(
            states,
            [
                (None, SandboxState::Creating),
                (Some(SandboxState::Creating), SandboxState::Running),
                (Some(SandboxState::Running), SandboxState::Killed),
            ]
        );
        assert!(matches!(
            store.transition("nope", SandboxState::Killed, "x"),
            Err(StoreError::SandboxNotFound)
        ));
    }

    #[test]
    fn env_values_are_never_stored() {
        let (store, team) = store_with_team();
        let rec = NewSandboxRecord::sample("s1", &team, "base");
        store.insert_sandbox(&rec).unwrap();
        let s = store.sandbox("s1").unwrap().unwrap();
        assert_eq!(s.env_names, ["SECRET"]);
    }

    #[test]
    fn a_long_list_brings_each_sandbox_its_own_details() {
        let (store, team) = store_with_team();
        // More than one batch of details, and some sandboxes with none.
        let n = DETAILS_BATCH * 2 + 7;
        for i in 0..n {
            let mut rec = NewSandboxRecord::sample(&format!("s{i:05}"), &team, "base");
            rec.metadata = if i % 3 == 0 {
                BTreeMap::new()
            } else {
                BTreeMap::from([
                    ("i".to_string(), i.to_string()),
                    ("z".into(), "last".into()),
                ])
            };
            rec.env_names = if i % 5 == 0 {
                vec![]
            } else {
                vec![format!("B{i}"), format!("A{i}")]
            };
            store.insert_sandbox(&rec).unwrap();
        }
        let all = store
            .list_sandboxes(&SandboxFilter {
                order: ListOrder::Asc,
                ..Default::default()
            })
            .unwrap()
            .items;
        assert_eq!(all.len(), n);
        for (i, s) in all.iter().enumerate() {
            assert_eq!(s.id, format!("s{i:05}"));
            let meta: Vec<_> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if i % 3 == 0 {
                assert!(meta.is_empty(), "{}: {meta:?}", s.id);
            } else {
                assert_eq!(meta, [format!("i={i}"), "z=last".into()], "{}", s.id);
            }
            let env: Vec<String> = if i % 5 == 0 {
                vec![]
            } else {
                vec![format!("A{i}"), format!("B{i}")]
            };
            assert_eq!(s.env_names, env, "{}", s.id);
        }
        // One sandbox alone reads the same.
        assert_eq!(store.sandbox("s00001").unwrap().unwrap(), all[1]);
    }

    #[test]
    fn list_filters_and_pages() {
        let (store, team) = store_with_team();
        for i in 0..5 {
            let mut rec = NewSandboxRecord::sample(&format!("s{i}"), &team, "base");
            rec.started_at = 1000 + i;
            rec.metadata = BTreeMap::from([("parity".to_string(), (i % 2).to_string())]);
            store.insert_sandbox(&rec).unwrap();
            store
                .mark_running(&rec.id, 1, 1, 1, "0.2.0", rec.started_at, i64::MAX)
                .unwrap();
        }
        store.transition("s4", SandboxState::Killed, "x").unwrap();

        let even = store
            .list_sandboxes(&SandboxFilter {
                team_id: Some(team.clone()),
                states: vec![SandboxState::Running],
                metadata: vec![("parity".into(), "0".into())],
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<_> = even.items.iter().map(|s| s.id.as_str()).collect();
        // Newest first by default.
        assert_eq!(ids, ["s2", "s0"]);

        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list_sandboxes(&SandboxFilter {
                    order: ListOrder::Desc,
                    limit: Some(2),
                    after: after.clone(),
                    ..Default::default()
                })
                .unwrap();
            seen.extend(page.items.into_iter().map(|s| s.id));
            match page.next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, ["s4", "s3", "s2", "s1", "s0"]);

        assert_eq!(store.count_active(&team).unwrap(), 4);
        assert_eq!(store.expired_sandboxes(i64::MAX).unwrap().len(), 4);
        assert_eq!(store.live_sandboxes().unwrap().len(), 4);
    }

    #[test]
    fn pause_and_resume_record_their_times_and_paused_sandboxes_never_expire() {
        let (store, team) = store_with_team();
        let mut rec = NewSandboxRecord::sample("s1", &team, "base");
        rec.auto_pause = true;
        rec.auto_resume = true;
        store.insert_sandbox(&rec).unwrap();
        store.mark_running("s1", 1, 1, 1, "0.2.0", 1, 10).unwrap();
        assert_eq!(
            store.expired_sandboxes(11).unwrap(),
            [("s1".to_string(), true, false)]
        );
        let mut fs = NewSandboxRecord::sample("s2", &team, "base");
        (fs.auto_pause, fs.auto_pause_disk_only) = (true, true);
        store.insert_sandbox(&fs).unwrap();
        store.mark_running("s2", 1, 1, 1, "0.2.0", 1, 10).unwrap();
        assert!(store.sandbox("s2").unwrap().unwrap().auto_pause_disk_only);
        assert_eq!(
            store.expired_sandboxes(11).unwrap(),
            [
                ("s1".to_string(), true, false),
                ("s2".to_string(), true, true)
            ]
        );
        store.transition("s2", SandboxState::Killed, "x").unwrap();
        let p = store
            .transition("s1", SandboxState::Paused, "paused")
            .unwrap();
        assert!(p.paused_at.is_some());
        assert!(p.auto_resume);
        assert!(store.expired_sandboxes(i64::MAX).unwrap().is_empty());
        // A paused sandbox holds no VM: it does not count against the concurrency limit.
        assert_eq!(store.count_active(&team).unwrap(), 0);
        let r = store.mark_resumed("s1", 99, "resumed").unwrap();
        assert_eq!((r.state, r.end_at), (SandboxState::Running, 99));
        assert!(matches!(
            store.mark_resumed("s1", 100, "again"),
            Err(StoreError::Transition { .. })
        ));
    }
}
