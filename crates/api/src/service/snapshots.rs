//! Snapshots of running sandboxes, forks (a snapshot and its children), deleting snapshots,
//! and the checkpoint tree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use alcove_store::{
    SandboxFilter, SandboxRecord, SandboxState as StoreState, SnapshotRecord, StoreError, now_ms,
};

use super::quota::Want;
use super::sandboxes::NewSandboxParams;
use super::{Service, api_error, new_sandbox_id};
use crate::backend::{BackendError, BackendOp, Keep};
use crate::error::{ApiError, chain};
use crate::metrics::{METRICS, Metrics};
use crate::models::{self, rfc3339};

/// Children one fork may ask for.
pub const MAX_FORK_COUNT: i64 = 100;

impl Service {
    /// Takes a snapshot of a running sandbox, which goes on running; records it in the tree
    /// under the sandbox's previous checkpoint.
    async fn take_snapshot(
        &self,
        r: &SandboxRecord,
        name: Option<String>,
        kind: &str,
        keep: Keep,
    ) -> Result<SnapshotRecord, ApiError> {
        let lock = self.op_lock(&r.id);
        let _guard = lock.lock().await;
        let id2 = r.id.clone();
        let r = match self.db(move |s| s.sandbox(&id2)).await? {
            Some(r) if r.state == StoreState::Running => r,
            Some(r) if r.state == StoreState::Paused => {
                return Err(ApiError::SandboxPaused { sandbox_id: r.id });
            }
            _ => {
                return Err(ApiError::SandboxNotFound {
                    sandbox_id: r.id.clone(),
                });
            }
        };
        // A fork's implicit snapshot is deleted once its children exist: only the bytes count.
        let want = Want {
            snapshots: usize::from(kind == "snapshot"),
            stores: true,
            ..Want::default()
        };
        let reservation = self.reserve(&r.team_id, want).await?;
        let snapshot_id = new_sandbox_id();
        if let Err(e) = self
            .call(
                BackendOp::Snapshot,
                &r.id,
                self.backend.snapshot(&r.id, &snapshot_id, keep),
            )
            .await
        {
            Metrics::inc(&METRICS.persistence_failures);
            return Err(api_error(BackendOp::Snapshot, &r.id, e));
        }
        let rec = SnapshotRecord {
            id: snapshot_id,
            team_id: r.team_id.clone(),
            sandbox_id: r.id.clone(),
            parent_id: r.snapshot_id.clone(),
            name,
            kind: kind.to_owned(),
            template_id: r.template_id.clone(),
            created_at: now_ms(),
            deleted_at: None,
        };
        let rec2 = rec.clone();
        self.settle(
            reservation,
            self.db(move |s| {
                s.insert_snapshot(&rec2)?;
                s.set_sandbox_snapshot(&rec2.sandbox_id, &rec2.id)
            }),
        )
        .await?;
        Metrics::inc(&METRICS.snapshots_created);
        tracing::info!(sandbox_id = %r.id, snapshot_id = %rec.id, kind, "snapshot taken");
        Ok(rec)
    }

    /// `POST /sandboxes/{id}/snapshots`.
    pub async fn create_snapshot(
        &self,
        team_id: &str,
        id: &str,
        name: Option<String>,
        memory: Option<bool>,
    ) -> Result<models::SnapshotInfo, ApiError> {
        if let Some(n) = &name
            && (n.is_empty() || n.len() > 128 || n.chars().any(char::is_control))
        {
            return Err(ApiError::InvalidBody {
                detail: "name must be 1-128 printable characters".into(),
            });
        }
        let r = self.live_record(team_id, id).await?;
        let keep = Keep::from_memory_flag(memory);
        let snap = self.take_snapshot(&r, name, "snapshot", keep).await?;
        self.backend.keep_snapshot(&snap.id);
        Ok(snapshot_info(&snap))
    }

    /// `GET /snapshots`: the team's live snapshots (not forks' implicit ones), newest first.
    pub async fn list_snapshots(
        &self,
        team_id: &str,
        sandbox_id: Option<String>,
        name: Option<String>,
        limit: Option<usize>,
        next_token: Option<String>,
    ) -> Result<(Vec<models::SnapshotInfo>, Option<String>), ApiError> {
        let team = team_id.to_owned();
        let (snaps, team_name) = self
            .db(move |s| {
                let name = s.team(&team)?.map(|t| t.name).unwrap_or_default();
                Ok((s.snapshots_of_team(&team)?, name))
            })
            .await?;
        let mut all: Vec<SnapshotRecord> = snaps
            .into_iter()
            .filter(|s| s.deleted_at.is_none() && s.kind == "snapshot")
            .filter(|s| sandbox_id.as_deref().is_none_or(|id| s.sandbox_id == id))
            .filter(|s| {
                name.as_deref()
                    .is_none_or(|n| name_matches(n, &s.id, s.name.as_deref(), &team_name))
            })
            .collect();
        all.reverse();
        let start = match next_token {
            Some(t) => t.parse::<usize>().map_err(|_| ApiError::InvalidQuery {
                detail: "nextToken is not a token this server issued; start again without it"
                    .into(),
            })?,
            None => 0,
        };
        let limit = limit.unwrap_or(100);
        let page: Vec<_> = all
            .iter()
            .skip(start)
            .take(limit)
            .map(snapshot_info)
            .collect();
        let next = (start + limit < all.len()).then(|| (start + limit).to_string());
        Ok((page, next))
    }

    /// `DELETE /templates/{id}` for a snapshot id or name: it cannot be restored any more; the
    /// backend frees what no sandbox or other snapshot needs.
    pub async fn delete_snapshot(&self, team_id: &str, id: &str) -> Result<(), ApiError> {
        let (team, name) = (team_id.to_owned(), id.to_owned());
        let snap = self
            .db(move |s| s.resolve_snapshot(&team, &name))
            .await?
            .ok_or_else(|| ApiError::SnapshotNotFound {
                snapshot_id: id.to_owned(),
            })?;
        self.forget_snapshot(&snap.id).await
    }

    async fn forget_snapshot(&self, snapshot_id: &str) -> Result<(), ApiError> {
        match self
            .call(
                BackendOp::DeleteSnapshot,
                snapshot_id,
                self.backend.delete_snapshot(snapshot_id),
            )
            .await
        {
            Ok(()) | Err(BackendError::SnapshotNotFound) => {}
            Err(e) => return Err(api_error(BackendOp::DeleteSnapshot, snapshot_id, e)),
        }
        let id = snapshot_id.to_owned();
        match self.db(move |s| s.delete_snapshot(&id)).await {
            Ok(_) | Err(StoreError::SnapshotNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `POST /sandboxes/{id}/fork`: one snapshot of the running sandbox, then `count` children
    /// restored from it concurrently, each with its own id, token and entropy. Each child
    /// succeeds or fails on its own. The snapshot itself is deleted once the children exist (its
    /// disk layer stays while they need it).
    pub async fn fork(
        self: &Arc<Self>,
        team_id: &str,
        id: &str,
        timeout: Option<i64>,
        count: Option<i64>,
    ) -> Result<models::AlcoveForkResponse, ApiError> {
        let count = count.unwrap_or(1);
        if !(1..=MAX_FORK_COUNT).contains(&count) {
            return Err(ApiError::InvalidBody {
                detail: format!("count must be between 1 and {MAX_FORK_COUNT}"),
            });
        }
        let requested = timeout.map(|t| self.check_timeout(t)).transpose()?;
        let r = self.live_record(team_id, id).await?;
        // Every child's slot is reserved before anything is saved: a fork the quota cannot
        // hold is refused whole, up front.
        let mut slots = self
            .reserve_each(team_id, Want::running(), count as usize)
            .await?;
        // Children keep the parent's egress rules. Read them before the snapshot: a fork that
        // cannot learn them fails (fail closed) instead of starting children with open egress.
        let network = match self
            .call(BackendOp::Network, &r.id, self.backend.network(&r.id))
            .await
        {
            Ok(Some(n)) => n,
            // A backend that keeps no per-sandbox rules enforces none but the record's switch.
            Ok(None) => alcove_net::NetworkConfig {
                allow_internet_access: r.allow_internet_access != Some(false),
                ..Default::default()
            },
            // `call` logged the cause.
            Err(_) => {
                return Err(ApiError::ForkRulesUnknown {
                    sandbox_id: r.id.clone(),
                });
            }
        };
        let snap = self.take_snapshot(&r, None, "fork", Keep::Memory).await?;
        let template = self.resolve_template(&r.template_id).await?;
        let lifetime = requested.unwrap_or_else(|| self.restart_timeout(&r));
        let children = (0..count).map(|_| {
            let this = self.clone();
            let params = NewSandboxParams {
                template: template.clone(),
                backend_template: template.id.clone(),
                alias: r.alias.clone(),
                snapshot_id: Some(snap.id.clone()),
                timeout: lifetime,
                env_vars: BTreeMap::new(),
                metadata: r.metadata.clone(),
                allow_internet_access: r.allow_internet_access,
                network: network.clone(),
                public_traffic: r.traffic_access_token.is_some().then_some(false),
                mask_request_host: r.mask_request_host.clone(),
                auto_pause: r.auto_pause,
                auto_pause_disk_only: r.auto_pause_disk_only,
                auto_resume: r.auto_resume,
                reservation: slots.pop(),
                // Children mount what the parent mounts.
                volume_mounts: r.volume_mounts.clone(),
            };
            let team = team_id.to_owned();
            async move { this.create_sandbox(&team, params).await }
        });
        let results = futures::future::join_all(children).await;
        if let Err(e) = self.forget_snapshot(&snap.id).await {
            tracing::warn!(snapshot_id = %snap.id, error = %e, "could not release a fork's snapshot");
        }
        Ok(models::AlcoveForkResponse {
            snapshot_id: snap.id,
            children: results
                .into_iter()
                .map(|r| match r {
                    Ok(sbx) => models::ForkResult {
                        sandbox: Some(sbx),
                        error: None,
                    },
                    Err(e) => {
                        let (status, code, message) = e.parts();
                        // The child's error goes into the body, not through the response
                        // middleware: its cause is logged here, once.
                        tracing::warn!(error_code = code, cause = %chain(&e), "fork child failed");
                        models::ForkResult {
                            sandbox: None,
                            error: Some(crate::error::ErrorBody {
                                code: status.as_u16(),
                                message,
                                error_code: code.into(),
                            }),
                        }
                    }
                })
                .collect(),
        })
    }

    /// `GET /alcove/v1/snapshots/tree`: every snapshot of the team (deleted ones that still have
    /// descendants included) nested under its parent, with the live sandboxes on each.
    pub async fn snapshot_tree(&self, team_id: &str) -> Result<models::SnapshotTree, ApiError> {
        let team = team_id.to_owned();
        let snaps = self.db(move |s| s.snapshots_of_team(&team)).await?;
        let team = team_id.to_owned();
        let live = self
            .db(move |s| {
                s.list_sandboxes(&SandboxFilter {
                    team_id: Some(team),
                    states: vec![StoreState::Running, StoreState::Paused],
                    ..Default::default()
                })
            })
            .await?
            .items;
        Ok(build_tree(&snaps, &live))
    }
}

/// Whether `GET /snapshots?name=FILTER` (the SDKs' `list_snapshots(name=...)`) selects a
/// snapshot: by its id, or by its name, where the filter may be tag-qualified and namespaced as
/// the SDKs document ("my-snapshot", "my-team/my-snapshot", "my-snapshot:v1"). A filter without
/// a tag matches every tag of the name; a name stored without one has the tag `default`; a
/// namespace must be the caller's team (each team sees only its own snapshots anyway).
pub(crate) fn name_matches(filter: &str, id: &str, name: Option<&str>, team: &str) -> bool {
    if filter == id {
        return true;
    }
    let Some(name) = name else {
        return false;
    };
    if filter == name {
        return true;
    }
    /// `(namespace, base, tag)` of `[ns/]base[:tag]`.
    fn split(s: &str) -> (Option<&str>, &str, Option<&str>) {
        let (ns, rest) = match s.split_once('/') {
            Some((ns, rest)) => (Some(ns), rest),
            None => (None, s),
        };
        match rest.rsplit_once(':') {
            Some((base, tag)) => (ns, base, Some(tag)),
            None => (ns, rest, None),
        }
    }
    let (f_ns, f_base, f_tag) = split(filter);
    let (n_ns, n_base, n_tag) = split(name);
    let ns_ok = |ns: Option<&str>| ns.is_none_or(|ns| ns == team);
    ns_ok(f_ns)
        && ns_ok(n_ns)
        && f_base == n_base
        && f_tag.is_none_or(|t| t == n_tag.unwrap_or("default"))
}

fn snapshot_info(s: &SnapshotRecord) -> models::SnapshotInfo {
    models::SnapshotInfo {
        snapshot_id: s.id.clone(),
        names: vec![s.name.clone().unwrap_or_else(|| s.id.clone())],
    }
}

/// Nests snapshots under their parents; roots are snapshots of template-fresh sandboxes (or
/// whose parent is unknown). `live` are the team's running and paused sandboxes.
fn build_tree(snaps: &[SnapshotRecord], live: &[SandboxRecord]) -> models::SnapshotTree {
    let known: HashSet<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&SnapshotRecord>> = HashMap::new();
    for s in snaps {
        let parent = s.parent_id.as_deref().filter(|p| known.contains(p));
        children.entry(parent).or_default().push(s);
    }
    fn node(
        s: &SnapshotRecord,
        children: &HashMap<Option<&str>, Vec<&SnapshotRecord>>,
        live: &[SandboxRecord],
    ) -> models::SnapshotNode {
        models::SnapshotNode {
            snapshot_id: s.id.clone(),
            name: s.name.clone(),
            kind: s.kind.clone(),
            sandbox_id: s.sandbox_id.clone(),
            template_id: s.template_id.clone(),
            created_at: rfc3339(s.created_at),
            deleted: s.deleted_at.is_some(),
            sandboxes: live
                .iter()
                .filter(|r| r.snapshot_id.as_deref() == Some(s.id.as_str()))
                .map(|r| r.id.clone())
                .collect(),
            children: children
                .get(&Some(s.id.as_str()))
                .map(|c| c.iter().map(|c| node(c, children, live)).collect())
                .unwrap_or_default(),
        }
    }
    models::SnapshotTree {
        roots: children
            .get(&None)
            .map(|c| c.iter().map(|s| node(s, &children, live)).collect())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod name_tests {
    use super::name_matches;

    #[test]
    fn names_match_with_tags_and_the_teams_namespace() {
        let m = |f, n| name_matches(f, "snap_1", n, "research");
        assert!(m("snap_1", None));
        assert!(m("my-snapshot", Some("my-snapshot")));
        assert!(m("my-snapshot", Some("my-snapshot:v1")));
        assert!(m("my-snapshot:v1", Some("my-snapshot:v1")));
        assert!(!m("my-snapshot:v2", Some("my-snapshot:v1")));
        assert!(m("my-snapshot:default", Some("my-snapshot")));
        assert!(!m("my-snapshot:v1", Some("my-snapshot")));
        assert!(m("research/my-snapshot", Some("my-snapshot:v1")));
        assert!(m(
            "research/my-snapshot:v1",
            Some("research/my-snapshot:v1")
        ));
        assert!(!m("other/my-snapshot", Some("my-snapshot")));
        assert!(!m("my-snap", Some("my-snapshot")));
        assert!(!m("my-snapshot", None));
    }
}
