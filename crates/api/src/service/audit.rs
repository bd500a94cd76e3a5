//! Run traces and the audit log (`docs/audit.md`): events are handed to a bounded queue in the
//! request's path (never a database write there) and written in batches by one task, chained by
//! the store (`alcove_store` `audit.rs`). State changes are written by the store itself, in the
//! transaction of the change.

use std::time::Duration;

use alcove_store::{AuditQuery, AuditRecord, NewAuditRecord, now_ms};
use tokio::sync::mpsc;

use super::Service;
use crate::error::{ApiError, chain};
use crate::models::{self, rfc3339};

/// Events queued and not yet written; past this a request waits for room in a task of its own,
/// so nothing is dropped and no request blocks on the queue.
pub(crate) const QUEUE: usize = 65_536;
/// Egress connection records waiting for the audit writer.
pub const EGRESS_EVENT_QUEUE: usize = 16_384;
/// Largest batch one write takes.
const BATCH: usize = 1024;

/// The queue's two ends; the writer takes the receiving one when the server runs.
pub(crate) struct AuditQueue {
    pub tx: mpsc::Sender<NewAuditRecord>,
    pub rx: std::sync::Mutex<Option<mpsc::Receiver<NewAuditRecord>>>,
}

impl AuditQueue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        AuditQueue {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

/// A record as the API shows it (events endpoint, SSE, export).
pub fn record_view(r: AuditRecord) -> models::AuditEventView {
    models::AuditEventView {
        seq: r.seq,
        at: rfc3339(r.event.at),
        at_ms: r.event.at,
        team_id: r.event.team_id,
        actor: r.event.actor,
        sandbox_id: r.event.sandbox_id,
        kind: r.event.kind,
        action: r.event.action,
        target: r.event.target,
        result: r.event.result,
        detail: r.event.detail,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

/// The stored record an exported line stands for (to verify an export's chain).
pub fn record_of(v: &models::AuditEventView) -> AuditRecord {
    AuditRecord {
        seq: v.seq,
        event: NewAuditRecord {
            at: v.at_ms,
            team_id: v.team_id.clone(),
            actor: v.actor.clone(),
            sandbox_id: v.sandbox_id.clone(),
            kind: v.kind.clone(),
            action: v.action.clone(),
            target: v.target.clone(),
            result: v.result.clone(),
            detail: v.detail.clone(),
        },
        prev_hash: v.prev_hash.clone(),
        hash: v.hash.clone(),
    }
}

impl Service {
    /// Queues an audit event. Never blocks: a full queue hands the event to a task that waits.
    pub(crate) fn audit(&self, rec: NewAuditRecord) {
        self.export_span(&rec);
        match self.audit.tx.try_send(rec) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(rec)) => {
                let tx = self.audit.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(rec).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The writer: batches of queued events into the store until the queue closes. Run by the
    /// server beside its other loops; a second call finds the queue taken and returns.
    pub async fn write_audit(&self) {
        let Some(mut rx) = self.audit.rx.lock().expect("audit rx").take() else {
            return;
        };
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let records = std::mem::take(&mut batch);
            let n = records.len();
            if let Err(e) = self.db(move |s| s.append_audit(&records)).await {
                tracing::error!(error = %chain(&e), events = n, "audit: writing events");
            }
        }
    }

    /// Turns the egress proxy's connection records into audit events of their sandboxes' teams,
    /// until the sender goes.
    pub async fn record_egress(&self, mut rx: mpsc::Receiver<alcove_net::EgressEvent>) {
        let mut teams: std::collections::HashMap<String, Option<String>> =
            std::collections::HashMap::new();
        while let Some(e) = rx.recv().await {
            let team = match teams.get(&e.sandbox_id) {
                Some(t) => t.clone(),
                None => {
                    let id = e.sandbox_id.clone();
                    let t = self
                        .db(move |s| s.sandbox(&id))
                        .await
                        .ok()
                        .flatten()
                        .map(|r| r.team_id);
                    if teams.len() > 10_000 {
                        teams.clear();
                    }
                    teams.insert(e.sandbox_id.clone(), t.clone());
                    t
                }
            };
            self.audit(NewAuditRecord {
                at: e.at_ms,
                team_id: team,
                actor: "sandbox".into(),
                sandbox_id: Some(e.sandbox_id),
                kind: "egress".into(),
                action: "connect".into(),
                target: Some(match &e.name {
                    Some(n) => format!("{n}:{}", e.dst.port()),
                    None => e.dst.to_string(),
                }),
                result: if e.allowed { "allowed" } else { "denied" }.into(),
                detail: serde_json::json!({
                    "address": e.dst.to_string(),
                    "name": e.name,
                    "rule": e.verdict,
                    "bytesOut": e.bytes_out,
                    "bytesIn": e.bytes_in,
                    "durationMs": e.duration_ms,
                }),
            });
        }
    }

    /// Waits until every event queued before this call is written (tests, shutdown).
    pub async fn flush_audit(&self) {
        for _ in 0..200 {
            if self.audit.tx.capacity() == self.audit.tx.max_capacity() {
                // The writer may still hold the last batch; one more beat covers it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `GET /alcove/v1/sandboxes/{id}/events`: a sandbox's run trace, oldest first.
    pub async fn sandbox_events(
        &self,
        team_id: &str,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<models::AuditEventView>, ApiError> {
        let r = self.any_record(team_id, id).await?;
        let q = AuditQuery {
            team_id: Some(r.team_id),
            sandbox_id: Some(r.id),
            after,
            limit,
            ..AuditQuery::default()
        };
        let records = self.db(move |s| s.audit_records(&q)).await?;
        Ok(records.into_iter().map(record_view).collect())
    }

    /// Whether a sandbox of the team has ended (killed or lost).
    pub async fn sandbox_ended(&self, team_id: &str, id: &str) -> Result<bool, ApiError> {
        Ok(self.any_record(team_id, id).await?.state.is_terminal())
    }

    /// `GET /alcove/v1/audit`: the team's records (every team's for the admin with `team=*`).
    pub async fn audit_export(
        &self,
        caller: &str,
        team: Option<&str>,
        since: Option<i64>,
        until: Option<i64>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<models::AuditEventView>, ApiError> {
        let scope = self.team_scope(caller, team).await?;
        let q = AuditQuery {
            team_id: scope,
            after,
            since,
            until,
            limit,
            ..AuditQuery::default()
        };
        let records = self.db(move |s| s.audit_records(&q)).await?;
        Ok(records.into_iter().map(record_view).collect())
    }

    /// Deletes audit records older than the retention (`--audit-retention`).
    pub async fn prune_audit(&self) {
        let Some(keep) = self.metering.audit_retention else {
            return;
        };
        let before = now_ms() - keep.as_millis() as i64;
        match self.db(move |s| s.prune_audit(before)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "audit: pruned records past the retention"),
            Err(e) => tracing::error!(error = %chain(&e), "audit: pruning"),
        }
    }
}
