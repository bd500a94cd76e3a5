//! Template builds made through the API: a team's templates, their builds (status, request,
//! result, log), tags, and the nonces that make signed upload URLs single-use.
//!
//! A build's status moves `waiting → building → ready | error`, or `waiting → error` (cancelled
//! or interrupted); [`BuildStatus::can_become`] is the one list of allowed moves and every status
//! write checks it in the same transaction. A template row (`templates`, `team_id` set) points at
//! its newest ready build through `build_id`; `Sandbox.create(name)` uses that build and
//! `name:tag` the tagged one.

use crate::db::{DbError, OptionalExtension, Row, Sql, SqlExt, params};
use crate::{Result, Store, StoreError, TemplateRecord, now_ms};

/// Log lines kept per build; later lines are dropped (the build itself goes on).
pub const MAX_BUILD_LOG_LINES: i64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Waiting,
    Building,
    Ready,
    Error,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Waiting => "waiting",
            BuildStatus::Building => "building",
            BuildStatus::Ready => "ready",
            BuildStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<BuildStatus> {
        Some(match s {
            "waiting" => BuildStatus::Waiting,
            "building" => BuildStatus::Building,
            "ready" => BuildStatus::Ready,
            "error" => BuildStatus::Error,
            _ => return None,
        })
    }

    /// The allowed moves: forward only, and a finished build stays finished.
    pub fn can_become(self, next: BuildStatus) -> bool {
        use BuildStatus::*;
        matches!(
            (self, next),
            (Waiting, Building) | (Waiting, Error) | (Building, Ready) | (Building, Error)
        )
    }

    pub fn is_finished(self) -> bool {
        matches!(self, BuildStatus::Ready | BuildStatus::Error)
    }
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    pub id: String,
    pub template_id: String,
    pub team_id: String,
    pub status: BuildStatus,
    /// The build request (`POST /v2/templates/{id}/builds/{build}`) as JSON, once triggered.
    pub spec: Option<String>,
    /// Tags the build gets when it is ready.
    pub tags: Vec<String>,
    /// The node's template key, once ready.
    pub image_key: Option<String>,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub reason: Option<String>,
    /// `base`, a 1-based step index, or `finalize`.
    pub reason_step: Option<String>,
    pub stored_bytes: u64,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    /// Set once the build's files were handed back to the backend for collection.
    pub deleted_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLogRecord {
    pub seq: i64,
    pub at: i64,
    pub level: String,
    pub step: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub tag: String,
    pub build_id: String,
    pub created_at: i64,
}

const COLUMNS: &str = "id, template_id, team_id, status, spec, tags, image_key, cpu_count, \
     memory_mb, disk_size_mb, reason, reason_step, stored_bytes, created_at, updated_at, \
     finished_at, deleted_at";

fn row(r: &Row) -> crate::db::Result<BuildRecord> {
    let status: String = r.get(3)?;
    let tags: String = r.get(5)?;
    Ok(BuildRecord {
        id: r.get(0)?,
        template_id: r.get(1)?,
        team_id: r.get(2)?,
        status: BuildStatus::parse(&status)
            .ok_or_else(|| DbError::conversion(3, format!("unknown build status `{status}`")))?,
        spec: r.get(4)?,
        tags: serde_json::from_str(&tags).map_err(|e| DbError::conversion(5, e))?,
        image_key: r.get(6)?,
        cpu_count: r.get(7)?,
        memory_mb: r.get(8)?,
        disk_size_mb: r.get(9)?,
        reason: r.get(10)?,
        reason_step: r.get(11)?,
        stored_bytes: r.get::<i64>(12)? as u64,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
        finished_at: r.get(15)?,
        deleted_at: r.get(16)?,
    })
}

/// What `request_build` made or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedBuild {
    pub template: TemplateRecord,
    pub build: BuildRecord,
    /// The template was made by this request (not an existing name's).
    pub new_template: bool,
}

/// Why a name cannot be built by a team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOwner {
    /// The host's own template (`base`, …).
    Host,
    /// Another team's template.
    OtherTeam,
}

impl Store {
    /// Who owns `name` if it is not `team_id`'s to build: `None` when the team may build it (its
    /// own template, or a free name).
    pub fn name_taken(&self, team_id: &str, name: &str) -> Result<Option<NameOwner>> {
        let owner: Option<Option<String>> = self
            .conn()
            .query_row(
                "SELECT t.team_id FROM template_aliases a JOIN templates t ON t.id = a.template_id
                 WHERE a.alias = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match owner {
            None => None,
            Some(None) => Some(NameOwner::Host),
            Some(Some(t)) if t == team_id => None,
            Some(Some(_)) => Some(NameOwner::OtherTeam),
        })
    }

    /// `POST /v3/templates`: the team's template called `name` (made with `new_template_id` if
    /// there is none) and a new `waiting` build of it, in one transaction. The caller checked the
    /// name with [`Store::name_taken`]; a race with another team's request fails on the alias key.
    pub fn request_build(
        &self,
        team_id: &str,
        name: &str,
        new_template_id: &str,
        build: &BuildRecord,
    ) -> Result<RequestedBuild> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT t.id FROM template_aliases a JOIN templates t ON t.id = a.template_id
                 WHERE a.alias = ?1 AND t.team_id = ?2",
                params![name, team_id],
                |r| r.get(0),
            )
            .optional()?;
        let now = now_ms();
        let (template_id, new_template) = match existing {
            Some(id) => (id, false),
            None => {
                tx.execute(
                    "INSERT INTO templates (id, team_id, build_id, cpu_count, memory_mb,
                         disk_size_mb, envd_version, public, created_at, updated_at, name)
                     VALUES (?1, ?2, '', ?3, ?4, ?5, '', 0, ?6, ?6, ?7)",
                    params![
                        new_template_id,
                        team_id,
                        build.cpu_count,
                        build.memory_mb,
                        build.disk_size_mb,
                        now,
                        name
                    ],
                )?;
                tx.execute(
                    "INSERT INTO template_aliases (alias, template_id) VALUES (?1, ?2)",
                    params![name, new_template_id],
                )?;
                (new_template_id.to_string(), true)
            }
        };
        let mut b = build.clone();
        b.template_id = template_id.clone();
        b.team_id = team_id.to_string();
        insert_build(&tx, &b)?;
        tx.commit()?;
        drop(conn);
        let template = self
            .resolve_template(&template_id)?
            .ok_or(StoreError::TeamNotFound)?;
        Ok(RequestedBuild {
            template,
            build: b,
            new_template,
        })
    }

    pub fn build(&self, id: &str) -> Result<Option<BuildRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM template_builds WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()?)
    }

    /// A template's builds, newest first.
    pub fn builds_of_template(&self, template_id: &str) -> Result<Vec<BuildRecord>> {
        Ok(self.conn().query_map(
            &format!(
                "SELECT {COLUMNS} FROM template_builds WHERE template_id = ?1
                 ORDER BY created_at DESC, id DESC"
            ),
            params![template_id],
            row,
        )?)
    }

    /// Builds in `status`, oldest first (the queue, and restart clean-up).
    pub fn builds_in(&self, status: BuildStatus) -> Result<Vec<BuildRecord>> {
        Ok(self.conn().query_map(
            &format!(
                "SELECT {COLUMNS} FROM template_builds WHERE status = ?1 ORDER BY created_at, id"
            ),
            params![status.as_str()],
            row,
        )?)
    }

    /// Records the build request of a `waiting` build; a build is triggered once.
    pub fn set_build_spec(&self, id: &str, spec: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE template_builds SET spec = ?2, updated_at = ?3
             WHERE id = ?1 AND spec IS NULL AND status = 'waiting'",
            params![id, spec, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Moves a build to `to` (checked against [`BuildStatus::can_become`]), with a reason for
    /// `error`.
    pub fn set_build_status(
        &self,
        id: &str,
        to: BuildStatus,
        reason: Option<(&str, Option<&str>)>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let from: String = tx
            .query_row(
                "SELECT status FROM template_builds WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or(StoreError::BuildNotFound)?;
        let from = BuildStatus::parse(&from)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown build status `{from}`").into()))?;
        if !from.can_become(to) {
            return Err(StoreError::BuildTransition { from, to });
        }
        let now = now_ms();
        tx.execute(
            "UPDATE template_builds SET status = ?2, reason = ?3, reason_step = ?4,
                 updated_at = ?5, finished_at = CASE WHEN ?6 = 1 THEN ?5 ELSE finished_at END
             WHERE id = ?1",
            params![
                id,
                to.as_str(),
                reason.map(|r| r.0),
                reason.and_then(|r| r.1),
                now,
                to.is_finished()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A build finished: `ready` with the node's key, the template now points at it, and its
    /// tags name it. One transaction.
    pub fn finish_build(
        &self,
        id: &str,
        image_key: &str,
        resources: (u32, u32, u32),
        stored_bytes: u64,
    ) -> Result<BuildRecord> {
        let b = self.build(id)?.ok_or(StoreError::BuildNotFound)?;
        if !b.status.can_become(BuildStatus::Ready) {
            return Err(StoreError::BuildTransition {
                from: b.status,
                to: BuildStatus::Ready,
            });
        }
        let (cpu, mem, disk) = resources;
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let now = now_ms();
        tx.execute(
            "UPDATE template_builds SET status = 'ready', image_key = ?2, cpu_count = ?3,
                 memory_mb = ?4, disk_size_mb = ?5, stored_bytes = ?6, updated_at = ?7,
                 finished_at = ?7
             WHERE id = ?1",
            params![id, image_key, cpu, mem, disk, stored_bytes as i64, now],
        )?;
        tx.execute(
            "UPDATE templates SET build_id = ?2, cpu_count = ?3, memory_mb = ?4,
                 disk_size_mb = ?5, envd_version = ?6, updated_at = ?7
             WHERE id = ?1",
            params![b.template_id, id, cpu, mem, disk, ENVD_VERSION, now],
        )?;
        for tag in &b.tags {
            upsert_tag(&tx, &b.template_id, tag, id, now)?;
        }
        tx.commit()?;
        drop(conn);
        self.build(id)?.ok_or(StoreError::BuildNotFound)
    }

    /// Appends log lines to a build, dropping what passes [`MAX_BUILD_LOG_LINES`]. Returns how
    /// many were kept.
    pub fn append_build_logs(
        &self,
        build_id: &str,
        lines: &[(i64, &str, Option<&str>, &str)],
    ) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let next: i64 = tx.query_row(
            "SELECT COALESCE(MAX(seq) + 1, 0) FROM template_build_logs WHERE build_id = ?1",
            params![build_id],
            |r| r.get(0),
        )?;
        let room = (MAX_BUILD_LOG_LINES - next).max(0) as usize;
        let keep = lines.len().min(room);
        for (i, (at, level, step, message)) in lines.iter().take(keep).enumerate() {
            tx.execute(
                "INSERT INTO template_build_logs (build_id, seq, at, level, step, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![build_id, next + i as i64, at, level, step, message],
            )?;
        }
        tx.commit()?;
        Ok(keep)
    }

    /// Up to `limit` log lines from `offset` (in order), those at `levels` only when given.
    pub fn build_logs(
        &self,
        build_id: &str,
        offset: i64,
        limit: i64,
        levels: Option<&[&str]>,
    ) -> Result<Vec<BuildLogRecord>> {
        let rows = self.conn().query_map(
            "SELECT seq, at, level, step, message FROM template_build_logs
             WHERE build_id = ?1 ORDER BY seq",
            params![build_id],
            |r| {
                Ok(BuildLogRecord {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    level: r.get(2)?,
                    step: r.get(3)?,
                    message: r.get(4)?,
                })
            },
        )?;
        let mut out = Vec::new();
        let mut skipped = 0i64;
        for r in rows {
            if let Some(levels) = levels
                && !levels.contains(&r.level.as_str())
            {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            out.push(r);
            if out.len() as i64 >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Points `tags` of `template_id` at `build_id`.
    pub fn assign_tags(&self, template_id: &str, build_id: &str, tags: &[String]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let now = now_ms();
        for tag in tags {
            upsert_tag(&tx, template_id, tag, build_id, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes `tags` from a template; returns those that were not there.
    pub fn remove_tags(&self, template_id: &str, tags: &[String]) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut missing = Vec::new();
        for tag in tags {
            let n = conn.execute(
                "DELETE FROM template_tags WHERE template_id = ?1 AND tag = ?2",
                params![template_id, tag],
            )?;
            if n == 0 {
                missing.push(tag.clone());
            }
        }
        Ok(missing)
    }

    pub fn tags(&self, template_id: &str) -> Result<Vec<TagRecord>> {
        Ok(self.conn().query_map(
            "SELECT tag, build_id, created_at FROM template_tags WHERE template_id = ?1
             ORDER BY created_at, tag",
            params![template_id],
            |r| {
                Ok(TagRecord {
                    tag: r.get(0)?,
                    build_id: r.get(1)?,
                    created_at: r.get(2)?,
                })
            },
        )?)
    }

    pub fn tagged_build(&self, template_id: &str, tag: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT build_id FROM template_tags WHERE template_id = ?1 AND tag = ?2",
                params![template_id, tag],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Makes a team's template usable by every team (`public`) or by its own only.
    pub fn set_template_public(&self, template_id: &str, public: bool) -> Result<()> {
        self.conn().execute(
            "UPDATE templates SET public = ?2, updated_at = ?3 WHERE id = ?1 AND team_id IS NOT NULL",
            params![template_id, public, now_ms()],
        )?;
        Ok(())
    }

    /// Deletes a team's template: its row, aliases and tags. Its builds stay (marked by the
    /// caller once their files are handed back) so running sandboxes keep their records.
    pub fn delete_team_template(&self, template_id: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        tx.execute(
            "DELETE FROM template_aliases WHERE template_id = ?1",
            params![template_id],
        )?;
        tx.execute(
            "DELETE FROM template_tags WHERE template_id = ?1",
            params![template_id],
        )?;
        tx.execute(
            "DELETE FROM templates WHERE id = ?1 AND team_id IS NOT NULL",
            params![template_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ready builds whose files no one can reach any more: not their template's current build,
    /// not tagged, or of a deleted template. Not yet marked deleted.
    pub fn unreachable_builds(&self) -> Result<Vec<BuildRecord>> {
        Ok(self.conn().query_map(
            &format!(
                "SELECT {COLUMNS} FROM template_builds b
             WHERE b.status = 'ready' AND b.deleted_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM templates t WHERE t.id = b.template_id
                                   AND t.build_id = b.id)
               AND NOT EXISTS (SELECT 1 FROM template_tags g WHERE g.build_id = b.id)"
            ),
            params![],
            row,
        )?)
    }

    /// Marks a build's files as handed back. Returns whether another live build still uses the
    /// same node key (then the files must stay).
    pub fn mark_build_deleted(&self, id: &str) -> Result<bool> {
        let conn = self.conn();
        conn.execute(
            "UPDATE template_builds SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL",
            params![id, now_ms()],
        )?;
        let shared: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM template_builds o, template_builds b
                 WHERE b.id = ?1 AND o.id != b.id AND o.image_key = b.image_key
                   AND o.deleted_at IS NULL)",
            params![id],
            |r| r.get(0),
        )?;
        Ok(shared)
    }

    /// Templates a team owns, and the bytes their live builds take.
    pub fn team_template_usage(&self, team_id: &str) -> Result<(u64, u64)> {
        let conn = self.conn();
        let count: i64 = conn.query_row(
            "SELECT COUNT(*) FROM templates WHERE team_id = ?1",
            params![team_id],
            |r| r.get(0),
        )?;
        let bytes: i64 = conn.query_row(
            "SELECT CAST(COALESCE(SUM(stored_bytes), 0) AS BIGINT) FROM template_builds
             WHERE team_id = ?1 AND status = 'ready' AND deleted_at IS NULL",
            params![team_id],
            |r| r.get(0),
        )?;
        Ok((count as u64, bytes as u64))
    }

    /// Uses an upload nonce: `true` the first time, `false` if it was used before. Expired
    /// nonces are forgotten (their URLs fail the expiry check anyway).
    pub fn use_upload_nonce(&self, nonce: &str, expires_at: i64) -> Result<bool> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM upload_nonces WHERE expires_at < ?1",
            params![now_ms()],
        )?;
        let n = conn.execute(
            "INSERT INTO upload_nonces (nonce, expires_at) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
            params![nonce, expires_at],
        )?;
        Ok(n == 1)
    }
}

/// The envd protocol version built templates' agents speak (the agent is the host's).
const ENVD_VERSION: &str = "0.2.0";

fn insert_build(tx: &dyn Sql, b: &BuildRecord) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO template_builds ({COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        ),
        params![
            b.id,
            b.template_id,
            b.team_id,
            b.status.as_str(),
            b.spec,
            serde_json::to_string(&b.tags).expect("tags serialise"),
            b.image_key,
            b.cpu_count,
            b.memory_mb,
            b.disk_size_mb,
            b.reason,
            b.reason_step,
            b.stored_bytes as i64,
            b.created_at,
            b.updated_at,
            b.finished_at,
            b.deleted_at
        ],
    )?;
    Ok(())
}

fn upsert_tag(tx: &dyn Sql, template_id: &str, tag: &str, build_id: &str, now: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO template_tags (template_id, tag, build_id, created_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(template_id, tag) DO UPDATE SET build_id = excluded.build_id,
             created_at = excluded.created_at",
        params![template_id, tag, build_id, now],
    )?;
    Ok(())
}

impl BuildRecord {
    /// A new `waiting` build (the template id and team are filled in by
    /// [`Store::request_build`]).
    pub fn waiting(id: &str, tags: Vec<String>, resources: (u32, u32, u32)) -> BuildRecord {
        let now = now_ms();
        BuildRecord {
            id: id.to_string(),
            template_id: String::new(),
            team_id: String::new(),
            status: BuildStatus::Waiting,
            spec: None,
            tags,
            image_key: None,
            cpu_count: resources.0,
            memory_mb: resources.1,
            disk_size_mb: resources.2,
            reason: None,
            reason_step: None,
            stored_bytes: 0,
            created_at: now,
            updated_at: now,
            finished_at: None,
            deleted_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_team() -> (Store, String) {
        let s = Store::open_in_memory().unwrap();
        let t = s.create_team("t1").unwrap();
        (s, t.id)
    }

    #[test]
    fn status_moves_forward_only() {
        use BuildStatus::*;
        let all = [Waiting, Building, Ready, Error];
        for a in all {
            for b in all {
                let ok = a.can_become(b);
                if a.is_finished() {
                    assert!(!ok, "{a} -> {b}");
                }
                if b == Waiting {
                    assert!(!ok, "{a} -> {b}");
                }
            }
        }
        assert!(Waiting.can_become(Building) && Building.can_become(Ready));
    }

    #[test]
    fn a_second_build_of_a_name_reuses_its_template_and_tags_follow_ready_builds() {
        let (s, team) = store_with_team();
        assert_eq!(s.name_taken(&team, "app").unwrap(), None);
        let r1 = s
            .request_build(
                &team,
                "app",
                "tpl1",
                &BuildRecord::waiting("b1", vec!["v1".into()], (2, 512, 4096)),
            )
            .unwrap();
        assert!(r1.new_template);
        let r2 = s
            .request_build(
                &team,
                "app",
                "tpl2",
                &BuildRecord::waiting("b2", vec!["default".into()], (2, 512, 4096)),
            )
            .unwrap();
        assert!(!r2.new_template);
        assert_eq!(r2.template.id, "tpl1");
        let other = s.create_team("t2").unwrap();
        assert_eq!(
            s.name_taken(&other.id, "app").unwrap(),
            Some(NameOwner::OtherTeam)
        );

        assert!(s.set_build_spec("b1", "{}").unwrap());
        assert!(!s.set_build_spec("b1", "{}").unwrap(), "triggered once");
        s.set_build_status("b1", BuildStatus::Building, None)
            .unwrap();
        s.finish_build("b1", "k1", (2, 512, 4096), 10).unwrap();
        assert_eq!(s.tagged_build("tpl1", "v1").unwrap().as_deref(), Some("b1"));
        assert_eq!(s.resolve_template("app").unwrap().unwrap().build_id, "b1");
        assert!(matches!(
            s.set_build_status("b1", BuildStatus::Error, Some(("x", None))),
            Err(StoreError::BuildTransition { .. })
        ));

        s.set_build_status("b2", BuildStatus::Building, None)
            .unwrap();
        s.finish_build("b2", "k2", (2, 512, 4096), 20).unwrap();
        // b1 is still tagged v1: reachable.
        assert!(s.unreachable_builds().unwrap().is_empty());
        assert!(s.remove_tags("tpl1", &["v1".into()]).unwrap().is_empty());
        let gone: Vec<_> = s
            .unreachable_builds()
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(gone, ["b1"]);
        assert!(!s.mark_build_deleted("b1").unwrap());
        assert_eq!(s.team_template_usage(&team).unwrap(), (1, 20));
    }

    #[test]
    fn logs_page_and_filter() {
        let (s, team) = store_with_team();
        s.request_build(
            &team,
            "app",
            "tpl1",
            &BuildRecord::waiting("b1", vec![], (1, 256, 1024)),
        )
        .unwrap();
        let lines: Vec<(i64, &str, Option<&str>, &str)> = (0..5)
            .map(|i| (i, if i == 3 { "error" } else { "info" }, Some("1"), "x"))
            .collect();
        assert_eq!(s.append_build_logs("b1", &lines).unwrap(), 5);
        assert_eq!(s.build_logs("b1", 2, 100, None).unwrap().len(), 3);
        assert_eq!(s.build_logs("b1", 0, 2, None).unwrap().len(), 2);
        let errs = s.build_logs("b1", 0, 100, Some(&["error"])).unwrap();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].seq, 3);
    }

    #[test]
    fn upload_nonces_are_single_use() {
        let (s, _) = store_with_team();
        let later = now_ms() + 60_000;
        assert!(s.use_upload_nonce("n1", later).unwrap());
        assert!(!s.use_upload_nonce("n1", later).unwrap());
    }
}
