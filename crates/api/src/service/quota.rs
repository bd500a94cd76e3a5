//! Team quotas: running sandboxes, paused sandboxes, snapshots and bytes stored, each a
//! [`Limits`](crate::config::Limits) field and a server flag.
//!
//! Check and reservation are one step: [`Service::reserve`] takes the service's quota lock,
//! reads the team's use from the store, adds what other operations have reserved and not yet
//! recorded, and on success reserves what the caller asked for. The caller holds the
//! [`Reservation`] while it works (a create, a resume that can take a minute) and hands it to
//! [`Service::settle`] with the store write that makes the new state count; that write runs
//! under the same lock and the reservation ends with it, so a sandbox is never counted twice
//! nor missed, and N racing requests cannot pass a limit. Dropping a reservation (a failure,
//! a client gone) releases it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Service;
use crate::backend::BackendOp;
use crate::error::ApiError;

/// A team quota other than running sandboxes (which keeps its own error, `SandboxLimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Paused,
    Snapshots,
    StoredBytes,
    /// Templates a team owns (checked when a build of a new name is requested).
    Templates,
    /// Bytes a team's built templates take (checked when a build starts).
    TemplateBytes,
}

impl Quota {
    /// The stable `error_code` of its 429.
    pub fn code(self) -> &'static str {
        match self {
            Quota::Paused => "paused_sandbox_quota_exceeded",
            Quota::Snapshots => "snapshot_quota_exceeded",
            Quota::StoredBytes => "storage_quota_exceeded",
            Quota::Templates => "template_quota_exceeded",
            Quota::TemplateBytes => "template_storage_quota_exceeded",
        }
    }

    /// What the caller reads: the limit, its use, and what to do.
    pub fn message(self, used: u64, limit: u64) -> String {
        match self {
            Quota::Paused => format!(
                "This team has {used} paused sandboxes; the limit is {limit}. Kill paused \
                 sandboxes you no longer need (DELETE /sandboxes/{{id}}) or resume one, then \
                 retry; or ask the operator to raise --team-max-paused."
            ),
            Quota::Snapshots => format!(
                "This team has {used} snapshots; the limit is {limit}. Delete snapshots you no \
                 longer need (DELETE /templates/{{snapshotID}}), then retry; or ask the operator \
                 to raise --team-max-snapshots."
            ),
            Quota::StoredBytes => format!(
                "This team's storage (its paused sandboxes, snapshots and volumes) holds \
                 {used} bytes; the limit is {limit}. Kill paused sandboxes, delete snapshots or \
                 volumes, or remove files from volumes you no longer need, then retry; or ask \
                 the operator to raise --team-max-stored."
            ),
            Quota::Templates => format!(
                "This team has {used} templates; the limit is {limit}. Delete templates you no \
                 longer need (DELETE /templates/{{templateID}}), or build under an existing name; \
                 or ask the operator to raise --team-max-templates."
            ),
            Quota::TemplateBytes => format!(
                "This team's templates hold {used} bytes on disk; the limit is {limit}. Delete \
                 templates or tags you no longer need, then retry; or ask the operator to raise \
                 --team-max-template-storage."
            ),
        }
    }
}

/// What one operation adds to its team's use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Want {
    pub running: usize,
    pub paused: usize,
    pub snapshots: usize,
    /// Whether it stores more on disk (pause, snapshot, fork): the bytes quota is checked.
    pub stores: bool,
}

impl Want {
    pub fn running() -> Want {
        Want {
            running: 1,
            ..Want::default()
        }
    }
}

/// Reserved and not yet recorded in the store, per team.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    by_team: Mutex<HashMap<String, Want>>,
}

impl Pending {
    fn get(&self, team: &str) -> Want {
        self.by_team
            .lock()
            .expect("pending lock")
            .get(team)
            .copied()
            .unwrap_or_default()
    }

    fn add(&self, team: &str, w: Want, sign: isize) {
        let mut map = self.by_team.lock().expect("pending lock");
        let e = map.entry(team.to_owned()).or_default();
        let f = |a: usize, b: usize| a.saturating_add_signed(sign * b as isize);
        e.running = f(e.running, w.running);
        e.paused = f(e.paused, w.paused);
        e.snapshots = f(e.snapshots, w.snapshots);
        if *e == Want::default() {
            map.remove(team);
        }
    }
}

/// Use reserved by one operation; released when settled or dropped.
#[must_use = "a reservation counts until it is settled or dropped"]
pub(crate) struct Reservation {
    pending: Arc<Pending>,
    team: String,
    want: Want,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending.add(&self.team, self.want, -1);
    }
}

/// The pure check: the first quota that `want` on top of `used` (store + pending) would pass.
pub(crate) fn first_exceeded(
    limits: &crate::config::Limits,
    used: Want,
    want: Want,
) -> Option<ApiError> {
    if want.running > 0 && used.running + want.running > limits.max_concurrent_sandboxes {
        return Some(ApiError::SandboxLimit {
            limit: limits.max_concurrent_sandboxes,
        });
    }
    let over = |quota, used: usize, want: usize, limit: usize| {
        (want > 0 && used + want > limit).then_some(ApiError::QuotaExceeded {
            quota,
            used: used as u64,
            limit: limit as u64,
        })
    };
    over(
        Quota::Paused,
        used.paused,
        want.paused,
        limits.max_paused_sandboxes,
    )
    .or_else(|| {
        over(
            Quota::Snapshots,
            used.snapshots,
            want.snapshots,
            limits.max_snapshots,
        )
    })
}

impl Service {
    /// What the team's storage quota counts: the disks and memory images of its paused
    /// sandboxes and snapshots (measured on the backend) and the files in its volumes.
    pub(crate) async fn team_stored_bytes(&self, team: &str) -> Result<u64, ApiError> {
        let t = team.to_owned();
        let (usage, volumes) = self
            .db(move |s| Ok((s.team_usage(&t)?, s.volumes_of_team(&t)?)))
            .await?;
        let on_backend = self
            .call(
                BackendOp::StoredBytes,
                "",
                self.backend
                    .stored_bytes(&usage.paused_ids, &usage.snapshot_ids),
            )
            .await
            .map_err(|e| super::api_error(BackendOp::StoredBytes, "", e))?;
        let ids: Vec<String> = volumes.into_iter().map(|v| v.id).collect();
        Ok(on_backend + self.volume_bytes(&ids).await.iter().sum::<u64>())
    }

    /// A 429 when the team's stored bytes are at or over `limit`.
    pub(crate) async fn check_stored_bytes(&self, team: &str, limit: u64) -> Result<(), ApiError> {
        let used = self.team_stored_bytes(team).await?;
        if used >= limit {
            return Err(ApiError::QuotaExceeded {
                quota: Quota::StoredBytes,
                used,
                limit,
            });
        }
        Ok(())
    }

    /// Checks `want` against the team's quotas and reserves it; see the module docs.
    pub(crate) async fn reserve(&self, team: &str, want: Want) -> Result<Reservation, ApiError> {
        Ok(self
            .reserve_each(team, want, 1)
            .await?
            .pop()
            .expect("one asked for"))
    }

    /// `n` reservations of `want` each, checked together (a fork's children).
    pub(crate) async fn reserve_each(
        &self,
        team: &str,
        want: Want,
        n: usize,
    ) -> Result<Vec<Reservation>, ApiError> {
        let team_id = team.to_owned();
        if want.running > 0 {
            self.check_spend_cap(team)?;
        }
        // The team's own limits where the admin set them, else the server's.
        let limits = self.effective_limits(team).await?;
        if want.stores {
            // Measured outside the lock: it walks directories, and the quota is soft by the
            // size of one operation anyway.
            self.check_stored_bytes(team, limits.max_stored_bytes)
                .await?;
        }
        let _guard = self.quota_lock.lock().await;
        let t = team_id.clone();
        let usage = self.db(move |s| s.team_usage(&t)).await?;
        let pending = self.pending.get(team);
        let used = Want {
            running: usage.running + pending.running,
            paused: usage.paused() + pending.paused,
            snapshots: usage.snapshots() + pending.snapshots,
            stores: false,
        };
        let total = Want {
            running: want.running * n,
            paused: want.paused * n,
            snapshots: want.snapshots * n,
            stores: want.stores,
        };
        if let Some(e) = first_exceeded(&limits, used, total) {
            crate::metrics::Metrics::inc(&crate::metrics::METRICS.quota_refusals);
            tracing::info!(team_id = %team, error_code = e.parts().1, "quota refused an operation");
            return Err(e);
        }
        Ok((0..n)
            .map(|_| {
                self.pending.add(team, want, 1);
                Reservation {
                    pending: self.pending.clone(),
                    team: team_id.clone(),
                    want,
                }
            })
            .collect())
    }

    /// Runs the store write that makes a reservation's use count, under the quota lock, and
    /// ends the reservation with it.
    pub(crate) async fn settle<T>(
        &self,
        reservation: Reservation,
        write: impl std::future::Future<Output = T>,
    ) -> T {
        let _guard = self.quota_lock.lock().await;
        let out = write.await;
        drop(reservation);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn limits() -> Limits {
        Limits {
            max_concurrent_sandboxes: 2,
            max_paused_sandboxes: 1,
            max_snapshots: 3,
            ..Limits::default()
        }
    }

    #[test]
    fn each_quota_refuses_only_past_its_own_limit() {
        let l = limits();
        let used = |running, paused, snapshots| Want {
            running,
            paused,
            snapshots,
            stores: false,
        };
        assert!(first_exceeded(&l, used(1, 0, 0), Want::running()).is_none());
        assert!(matches!(
            first_exceeded(&l, used(2, 0, 0), Want::running()),
            Some(ApiError::SandboxLimit { limit: 2 })
        ));
        // A fork of three children when one slot is free.
        assert!(first_exceeded(&l, used(1, 0, 0), used(3, 0, 0)).is_some());
        // Quotas not asked for are not checked: a pause at the running limit is fine.
        let pause = used(0, 1, 0);
        assert!(first_exceeded(&l, used(2, 0, 3), pause).is_none());
        assert!(matches!(
            first_exceeded(&l, used(0, 1, 0), pause),
            Some(ApiError::QuotaExceeded {
                quota: Quota::Paused,
                used: 1,
                limit: 1
            })
        ));
        assert!(matches!(
            first_exceeded(&l, used(0, 0, 3), used(0, 0, 1)),
            Some(ApiError::QuotaExceeded {
                quota: Quota::Snapshots,
                used: 3,
                limit: 3
            })
        ));
    }

    #[test]
    fn a_dropped_reservation_releases_what_it_held() {
        let pending = Arc::new(Pending::default());
        let w = Want {
            running: 1,
            paused: 1,
            ..Want::default()
        };
        pending.add("t", w, 1);
        let r = Reservation {
            pending: pending.clone(),
            team: "t".into(),
            want: w,
        };
        assert_eq!(pending.get("t").running, 1);
        drop(r);
        assert_eq!(pending.get("t"), Want::default());
        assert!(pending.by_team.lock().unwrap().is_empty());
    }
}
