//! The background duties: the reaper (end times), the liveness check (VMs that vanished) and
//! the reconcile at startup. Every backend call has its deadline and each sandbox's work is
//! independent of the others', so one hung call delays only its own sandbox.

use std::collections::HashSet;
use std::sync::Arc;

use alcove_store::{SandboxRecord, SandboxState as StoreState, now_ms};

use tracing::Instrument;

use super::{Service, api_error};
use crate::backend::{BackendError, BackendOp, Keep, SandboxStatus};
use crate::error::{ApiError, chain};
use crate::metrics::{METRICS, Metrics};

/// A sandbox the reaper works on; dropping it (the work done, or its task gone) frees it for
/// the next tick.
struct ReapGuard {
    svc: Arc<Service>,
    id: String,
}

impl Service {
    /// Starts the end-of-life work (pause with `autoPause`, else kill) of every running sandbox
    /// past its end time, each in its own task: a backend call that hangs on one sandbox holds
    /// up that sandbox alone, until its deadline, and the next tick retries it. A sandbox
    /// already being worked on is skipped. Then the same for paused sandboxes past their
    /// retention ([`Service::reap_paused`]). Returns how many it started on.
    pub async fn reap_expired(self: &Arc<Self>) -> usize {
        self.reap_ended().await + self.reap_paused().await
    }

    async fn reap_ended(self: &Arc<Self>) -> usize {
        let now = now_ms();
        let ids = match self.db(move |s| s.expired_sandboxes(now)).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %chain(&e), "reaper: listing expired sandboxes");
                return 0;
            }
        };
        let ids = ids.into_iter().map(|(id, auto_pause, disk_only)| {
            let pause = auto_pause.then_some(if disk_only {
                Keep::DiskOnly
            } else {
                Keep::Memory
            });
            (id, pause)
        });
        self.spawn_reaps(ids, |svc, id, pause| async move {
            svc.reap_one(&id, pause).await;
        })
    }

    /// Deletes (kills, with their saved state) paused sandboxes paused longer ago than
    /// [`Limits::paused_retention`](crate::config::Limits::paused_retention), each in its own
    /// task like the end-time work. Returns how many it started on.
    pub async fn reap_paused(self: &Arc<Self>) -> usize {
        let Some(retention) = self.limits.paused_retention else {
            return 0;
        };
        let cutoff = now_ms() - retention.as_millis() as i64;
        let ids = match self.db(move |s| s.paused_before(cutoff)).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %chain(&e), "reaper: listing expired paused sandboxes");
                return 0;
            }
        };
        let ids = ids.into_iter().map(|id| (id, ()));
        self.spawn_reaps(ids, |svc, id, ()| async move {
            let reason = "retention: paused longer than the server's paused-sandbox \
                          retention (--paused-retention); its saved state was deleted";
            match svc.kill_paused(&id, reason).await {
                Ok(true) => {
                    Metrics::inc(&METRICS.paused_expired);
                    tracing::info!("reaper: deleted a paused sandbox past its retention");
                }
                Ok(false) => {}
                Err(e) => {
                    let code = e.parts().1;
                    tracing::warn!(
                        error_code = code,
                        "reaper: deleting an expired paused sandbox failed, will retry"
                    );
                }
            }
        })
    }

    /// Starts `work` on every sandbox of `items` that no other reap holds, each in its own task
    /// under a `reap` span, the claim held until the work ends. Returns how many it started on.
    fn spawn_reaps<T, F, Fut>(
        self: &Arc<Self>,
        items: impl IntoIterator<Item = (String, T)>,
        work: F,
    ) -> usize
    where
        F: Fn(Arc<Service>, String, T) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut started = 0;
        for (id, extra) in items {
            let Some(guard) = ReapGuard::claim(self, &id) else {
                continue;
            };
            started += 1;
            let span = tracing::info_span!("reap", sandbox_id = %id);
            let task = work(guard.svc.clone(), guard.id.clone(), extra);
            tokio::spawn(
                async move {
                    task.await;
                    drop(guard);
                }
                .instrument(span),
            );
        }
        started
    }

    /// Kills a sandbox if it is still paused (a resume may have won the race); under its op
    /// lock. `Ok(false)`: it was not paused any more.
    async fn kill_paused(&self, id: &str, reason: &str) -> Result<bool, ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let id2 = id.to_owned();
        match self.db(move |s| s.sandbox(&id2)).await? {
            Some(r) if r.state == StoreState::Paused => {}
            _ => return Ok(false),
        }
        self.kill_record(id, reason).await?;
        Ok(true)
    }

    async fn reap_one(&self, id: &str, pause: Option<Keep>) {
        let mut reason = "timeout: the sandbox reached its end time";
        if let Some(keep) = pause {
            let why = match keep {
                Keep::Memory => "timeout: paused at its end time (autoPause)",
                Keep::DiskOnly => {
                    "timeout: paused at its end time, filesystem only (autoPause, autoPauseMemory: false)"
                }
            };
            match self.pause_record(id, keep, why).await {
                Ok(()) => {
                    tracing::info!("reaper: paused at timeout");
                    return;
                }
                Err(ApiError::AlreadyPaused { .. } | ApiError::SandboxNotFound { .. }) => return,
                Err(e @ ApiError::QuotaExceeded { .. }) => {
                    reason = "timeout: autoPause refused by the team's paused-sandbox or \
                              storage quota, so the sandbox was killed at its end time";
                    tracing::warn!(
                        error_code = e.parts().1,
                        "reaper: pause at timeout refused by a quota, killing"
                    );
                }
                Err(e) => {
                    // A sandbox that cannot be saved is killed rather than left running
                    // forever past its end.
                    let code = e.parts().1;
                    tracing::warn!(
                        error_code = code,
                        "reaper: pause at timeout failed, killing"
                    );
                }
            }
        }
        match self.kill_record(id, reason).await {
            Ok(()) => {
                Metrics::inc(&METRICS.sandboxes_timed_out);
                tracing::info!("reaper: killed at timeout");
            }
            Err(e) => {
                let code = e.parts().1;
                tracing::warn!(error_code = code, "reaper: kill failed, will retry");
            }
        }
    }

    /// Marks `lost` every running or paused sandbox whose VM the backend no longer has.
    /// `creating` ones are left alone: their create call owns them. Each suspect's status is
    /// asked for concurrently, every call under its deadline.
    pub async fn check_liveness(&self, context: &str) -> usize {
        let records = match self.db(|s| s.live_sandboxes()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %chain(&e), "liveness: listing sandboxes");
                return 0;
            }
        };
        // A failed or hung list was logged by the call path; the next round tries again.
        let Ok(live) = self.call(BackendOp::List, "", self.backend.list()).await else {
            return 0;
        };
        let live: HashSet<String> = live.into_iter().map(|l| l.sandbox_id).collect();
        // Metering charges a sandbox found dead up to the last time its VM was seen.
        let seen: Vec<String> = live.iter().cloned().collect();
        let now = alcove_store::now_ms();
        if let Err(e) = self.db(move |s| s.mark_alive(&seen, now)).await {
            tracing::error!(error = %chain(&e), "liveness: recording the VMs seen");
        }
        let suspects: Vec<SandboxRecord> = records
            .into_iter()
            .filter(|r| r.state != StoreState::Creating && !live.contains(&r.id))
            .collect();
        // Each suspect on its own: one status call that hangs (until its deadline) must not
        // hold up the others.
        let marked = futures::future::join_all(suspects.iter().map(|r| async move {
            let why = match self
                .call(BackendOp::Status, &r.id, self.backend.status(&r.id))
                .await
            {
                Ok(SandboxStatus::Running | SandboxStatus::Paused) => return false,
                Ok(SandboxStatus::Exited { reason }) => reason,
                Ok(SandboxStatus::Unknown) | Err(BackendError::SandboxNotFound) => {
                    "the backend has no VM for it".to_owned()
                }
                Err(e) => format!("the backend could not report on it ({e})"),
            };
            let reason = format!("lost {context}: {why}");
            let lost = self
                .transition(&r.id, StoreState::Lost, &reason)
                .await
                .is_ok();
            if lost {
                Metrics::inc(&METRICS.sandboxes_lost);
            }
            lost
        }))
        .await;
        marked.into_iter().filter(|m| *m).count()
    }

    /// At startup: sandboxes left `creating` by a previous process are lost (their create call
    /// died with it); running ones the backend still has are reattached, the others are lost;
    /// VMs the store does not know are killed. Every backend call has its deadline; the kills
    /// run concurrently.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        // The egress proxies (and their byte counters) start again from zero.
        self.db(|s| s.reset_net_counters()).await?;
        let records = self.db(|s| s.live_sandboxes()).await?;
        let live = self
            .call(BackendOp::List, "", self.backend.list())
            .await
            .map_err(|e| api_error(BackendOp::List, "", e))?;
        let live_ids: HashSet<&str> = live.iter().map(|l| l.sandbox_id.as_str()).collect();
        let known: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let mut to_kill: Vec<&str> = Vec::new();
        for r in &records {
            if r.state == StoreState::Creating {
                if live_ids.contains(r.id.as_str()) {
                    to_kill.push(&r.id);
                }
                let _ = self
                    .transition(
                        &r.id,
                        StoreState::Lost,
                        "lost at server restart: the server stopped while the sandbox was being created",
                    )
                    .await;
                Metrics::inc(&METRICS.sandboxes_lost);
            } else if let Some(l) = live.iter().find(|l| l.sandbox_id == r.id) {
                // A crash between the backend's pause (or resume) and the store's record of it
                // leaves the two disagreeing: the backend's VM state is the truth.
                let fix = match (r.state, l.paused) {
                    (StoreState::Running, true) => Some((
                        StoreState::Paused,
                        "found paused at server restart (the pause finished as the server stopped)",
                    )),
                    (StoreState::Paused, false) => Some((
                        StoreState::Running,
                        "found running at server restart (the resume finished as the server stopped)",
                    )),
                    _ => None,
                };
                if let Some((to, reason)) = fix {
                    let _ = self.transition(&r.id, to, reason).await;
                }
                tracing::info!(sandbox_id = %r.id, paused = l.paused, "reattached after restart");
            }
        }
        self.check_liveness("at server restart").await;
        for l in &live {
            if !known.contains(l.sandbox_id.as_str()) {
                tracing::warn!(sandbox_id = %l.sandbox_id, "killing a VM the store does not know");
                to_kill.push(&l.sandbox_id);
            }
        }
        futures::future::join_all(
            to_kill
                .into_iter()
                .map(|id| self.call(BackendOp::Kill, id, self.backend.kill(id))),
        )
        .await;
        Ok(())
    }
}

impl ReapGuard {
    fn claim(svc: &Arc<Service>, id: &str) -> Option<ReapGuard> {
        let fresh = svc
            .reaping
            .lock()
            .expect("reaping lock")
            .insert(id.to_owned());
        fresh.then(|| ReapGuard {
            svc: svc.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for ReapGuard {
    fn drop(&mut self) {
        self.svc
            .reaping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}
