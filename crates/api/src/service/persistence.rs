//! Pause and resume: on request, on connect, at the end time with `autoPause` (from the
//! reaper), and for traffic to a paused sandbox created with `autoResume`. Each runs under the
//! sandbox's op lock.

use std::time::Duration;

use alcove_store::{SandboxRecord, SandboxState as StoreState, now_ms};

use super::quota::Want;
use super::{Service, api_error, log_state_change};
use crate::backend::{BackendOp, Keep};
use crate::error::ApiError;
use crate::metrics::{METRICS, Metrics};
use crate::models;

impl Service {
    /// `POST /v2/sandboxes/{id}/connect`: a running sandbox gets its end time extended (never
    /// shortened) and its connection details back; a paused one is resumed first. The flag
    /// says whether it was resumed (E2B answers 201 then, 200 otherwise).
    pub async fn connect(
        &self,
        team_id: &str,
        id: &str,
        timeout: Option<i64>,
        memory: Option<bool>,
    ) -> Result<(models::Sandbox, bool), ApiError> {
        self.resume(team_id, id, timeout, memory, false).await
    }

    /// `POST /sandboxes/{id}/resume` (`require_paused`: 409 for a running sandbox) and connect.
    pub async fn resume(
        &self,
        team_id: &str,
        id: &str,
        timeout: Option<i64>,
        memory: Option<bool>,
        require_paused: bool,
    ) -> Result<(models::Sandbox, bool), ApiError> {
        let from = Keep::from_memory_flag(memory);
        let requested = timeout.map(|t| self.check_timeout(t)).transpose()?;
        let r = self.live_record(team_id, id).await?;
        let lock = self.op_lock(&r.id);
        let _guard = lock.lock().await;
        let r = self.live_record(team_id, id).await?;
        if r.state == StoreState::Running {
            if require_paused {
                return Err(ApiError::AlreadyRunning { sandbox_id: r.id });
            }
            let d = requested.unwrap_or(self.limits.default_timeout);
            let end_at = (now_ms() + d.as_millis() as i64).max(r.end_at);
            let id2 = r.id.clone();
            self.db(move |s| s.set_end_at(&id2, end_at)).await?;
            return Ok((self.sandbox_view(r), false));
        }
        let d = requested.unwrap_or_else(|| self.restart_timeout(&r));
        let reason = match from {
            Keep::Memory => "resumed by API request",
            Keep::DiskOnly => "rebooted from its disk by API request (memory: false)",
        };
        let r = self.resume_record(r, d, from, reason).await?;
        Ok((self.sandbox_view(r), true))
    }

    /// Resumes a paused sandbox (the caller holds its op lock) and records it running until
    /// `lifetime` from now: paused time does not count against the lifetime.
    async fn resume_record(
        &self,
        r: SandboxRecord,
        lifetime: Duration,
        from: Keep,
        reason: &str,
    ) -> Result<SandboxRecord, ApiError> {
        // The slot stays reserved while the backend resumes (up to its deadline) and becomes
        // the `running` row in the same step.
        let reservation = self.reserve(&r.team_id, Want::running()).await?;
        let id = r.id.clone();
        if let Err(e) = self
            .call(BackendOp::Resume, &id, self.backend.resume(&id, from))
            .await
        {
            Metrics::inc(&METRICS.persistence_failures);
            return Err(api_error(BackendOp::Resume, &id, e));
        }
        let end_at = now_ms() + lifetime.as_millis() as i64;
        let (id2, reason2) = (id.clone(), reason.to_owned());
        let rec = self
            .settle(
                reservation,
                self.db(move |s| s.mark_resumed(&id2, end_at, &reason2)),
            )
            .await?;
        Metrics::inc(&METRICS.sandboxes_resumed);
        log_state_change(&id, StoreState::Running, reason);
        Ok(rec)
    }

    /// The proxy found sandbox traffic for a paused sandbox: resume it when it was created with
    /// `autoResume`. `Ok(false)`: it stays paused.
    pub async fn resume_for_traffic(&self, id: &str) -> Result<bool, ApiError> {
        let id2 = id.to_owned();
        let Some(r) = self.db(move |s| s.sandbox(&id2)).await? else {
            return Ok(false);
        };
        if !r.auto_resume {
            return Ok(false);
        }
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let id2 = id.to_owned();
        let Some(r) = self.db(move |s| s.sandbox(&id2)).await? else {
            return Ok(false);
        };
        match r.state {
            StoreState::Running => Ok(true),
            StoreState::Paused => {
                let d = self.restart_timeout(&r);
                self.resume_record(r, d, Keep::Memory, "resumed by traffic (autoResume)")
                    .await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// `POST /sandboxes/{id}/pause`: memory, processes and disk go to the host's disk and the
    /// VM stops; with `memory: false` (the SDKs' `mode="filesystem"`) only the disk is kept.
    pub async fn pause(
        &self,
        team_id: &str,
        id: &str,
        memory: Option<bool>,
    ) -> Result<(), ApiError> {
        let r = self.live_record(team_id, id).await?;
        let keep = Keep::from_memory_flag(memory);
        let reason = match keep {
            Keep::Memory => "paused by API request",
            Keep::DiskOnly => "paused by API request (filesystem only)",
        };
        self.pause_record(&r.id, keep, reason).await
    }

    pub(super) async fn pause_record(
        &self,
        id: &str,
        keep: Keep,
        reason: &str,
    ) -> Result<(), ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let id2 = id.to_owned();
        let r = self.db(move |s| s.sandbox(&id2)).await?;
        let team = r.as_ref().map(|r| r.team_id.clone()).unwrap_or_default();
        match r.map(|r| r.state) {
            Some(StoreState::Running) => {}
            Some(StoreState::Paused) => {
                return Err(ApiError::AlreadyPaused {
                    sandbox_id: id.to_owned(),
                });
            }
            _ => {
                return Err(ApiError::SandboxNotFound {
                    sandbox_id: id.to_owned(),
                });
            }
        }
        let want = Want {
            paused: 1,
            stores: true,
            ..Want::default()
        };
        let reservation = self.reserve(&team, want).await?;
        self.meter_network_of(id).await;
        if let Err(e) = self
            .call(BackendOp::Pause, id, self.backend.pause(id, keep))
            .await
        {
            Metrics::inc(&METRICS.persistence_failures);
            return Err(api_error(BackendOp::Pause, id, e));
        }
        self.settle(reservation, self.transition(id, StoreState::Paused, reason))
            .await?;
        Metrics::inc(&METRICS.sandboxes_paused);
        Ok(())
    }
}
