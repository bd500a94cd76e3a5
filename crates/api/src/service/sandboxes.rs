//! Sandboxes: create (from a template or a snapshot, with volumes), get, list, kill, timeouts,
//! refreshes, egress rule updates, and what the proxy needs to route traffic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use alcove_store::{
    Claim, ListOrder, NewSandboxRecord, PageCursor, SandboxFilter, SandboxRecord,
    SandboxState as StoreState, StoreError, TemplateRecord, now_ms,
};

use tracing::Instrument;

use super::network::{network_update, parse_network, refuse_placeholders_in_envs};
use super::quota::{Reservation, Want};
use super::{Service, api_error, log_state_change, new_sandbox_id, random_token, wire_state};
use crate::backend::{BackendError, BackendOp, CreateSandbox};
use crate::error::{ApiError, chain};
use crate::metrics::{METRICS, Metrics};
use crate::models::{self, CLIENT_ID, rfc3339, system_time_ms};

/// Envd versions below this make the SDK kill the sandbox; used when the backend reports none.
const FALLBACK_ENVD_VERSION: &str = "0.2.0";

/// What a new sandbox is made from and how, after validation.
pub(super) struct NewSandboxParams {
    pub(super) template: TemplateRecord,
    /// What the backend creates from: a host template's id or a built template's key (ignored
    /// with a snapshot).
    pub(super) backend_template: String,
    pub(super) alias: Option<String>,
    pub(super) snapshot_id: Option<String>,
    pub(super) timeout: Duration,
    pub(super) env_vars: BTreeMap<String, String>,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) allow_internet_access: Option<bool>,
    /// Egress rules, validated.
    pub(super) network: alcove_net::NetworkConfig,
    pub(super) public_traffic: Option<bool>,
    /// `network.maskRequestHost`, checked.
    pub(super) mask_request_host: Option<String>,
    pub(super) auto_pause: bool,
    /// The timeout pause keeps only the disk (`autoPauseMemory: false`).
    pub(super) auto_pause_disk_only: bool,
    pub(super) auto_resume: bool,
    /// A running-sandbox slot reserved up front (a fork's children); `None`: reserve one.
    pub(super) reservation: Option<Reservation>,
    /// Volumes to mount, checked ([`Service::resolve_mounts`]); re-checked against the store
    /// in the transaction that records the sandbox.
    pub(super) volume_mounts: Vec<alcove_store::VolumeMount>,
}

/// Filters of the list endpoints, already parsed.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub states: Vec<StoreState>,
    pub metadata: Vec<(String, String)>,
    pub template: Option<String>,
    pub started_after: Option<i64>,
    pub order: ListOrder,
    pub limit: Option<usize>,
    pub next_token: Option<String>,
}

/// What the proxy needs to route one request.
#[derive(Debug, Clone)]
pub struct ProxyTarget {
    pub state: StoreState,
    pub envd_access_token: Option<String>,
    /// Required in `e2b-traffic-access-token` on ports other than the agent's, when set.
    pub traffic_access_token: Option<String>,
    /// `network.maskRequestHost`: the Host header sent to the sandbox's ports.
    pub mask_request_host: Option<String>,
    /// Whose sandbox it is (its run-trace events are the team's).
    pub team_id: String,
    /// The sandbox opted in (metadata `alcove.capture-output: "true"`) to its processes'
    /// output being kept in their run-trace records (the first 64 KiB of each stream).
    pub capture_output: bool,
}

impl Service {
    /// `POST /sandboxes`: validate, record as `creating`, start it, record as `running`.
    /// `templateID` may name a snapshot of this team (by id or name): the sandbox is then
    /// restored from it, memory and disk.
    pub async fn create(
        self: &Arc<Self>,
        team_id: &str,
        req: models::NewSandbox,
    ) -> Result<models::Sandbox, ApiError> {
        let timeout = match req.timeout {
            Some(t) => self.check_timeout(t)?,
            None => self.limits.default_timeout,
        };
        reject_unsupported(&req)?;
        let auto_resume = auto_resume_enabled(&req.auto_resume)?;
        let auto_pause = req.auto_pause == Some(true);
        let auto_pause_disk_only = auto_pause && req.auto_pause_memory == Some(false);
        let net = parse_network(&req.network, req.allow_internet_access)?;
        if let Some(envs) = &req.env_vars {
            refuse_placeholders_in_envs(envs)?;
        }
        self.check_secret_refs(team_id, &net.egress).await?;
        let mut volume_mounts = self
            .resolve_mounts(team_id, req.volume_mounts.as_deref().unwrap_or_default())
            .await?;
        let (t, name) = (team_id.to_owned(), req.template_id.clone());
        let snapshot = self.db(move |s| s.resolve_snapshot(&t, &name)).await?;
        let (template, alias, snapshot_id, backend_template) = match snapshot {
            Some(snap) => {
                let template = self.resolve_template(&snap.template_id).await?;
                let id = template.id.clone();
                if volume_mounts.is_empty() {
                    // Restored memory may hold the mounts' open files: keep the volumes of the
                    // sandbox the snapshot was taken from (re-checked when recorded).
                    volume_mounts = self
                        .inherited_mounts(team_id, &snap.id, &snap.sandbox_id)
                        .await?;
                }
                (template, None, Some(snap.id), id)
            }
            None => {
                let (template, backend_id) =
                    self.resolve_for_create(team_id, &req.template_id).await?;
                let alias = (template.id != req.template_id).then(|| req.template_id.clone());
                (template, alias, None, backend_id)
            }
        };
        self.create_sandbox(
            team_id,
            NewSandboxParams {
                template,
                backend_template,
                alias,
                snapshot_id,
                timeout,
                env_vars: req.env_vars.unwrap_or_default(),
                metadata: req.metadata.unwrap_or_default(),
                allow_internet_access: req.allow_internet_access,
                network: net.egress,
                public_traffic: net.public,
                mask_request_host: net.mask_request_host,
                auto_pause,
                auto_pause_disk_only,
                auto_resume,
                reservation: None,
                volume_mounts,
            },
        )
        .await
        .inspect(|sbx| {
            // The request's log line names the sandbox it made.
            tracing::Span::current().record("sandbox_id", tracing::field::display(&sbx.sandbox_id));
        })
    }

    /// `POST /sandboxes` with an `Idempotency-Key`: the first request with the key (per team,
    /// for 24 h) creates; a later one with the same body gets the same sandbox (even while the
    /// first is still creating it: it waits), one with another body is refused. A create that
    /// fails frees the key, so a retry can succeed. Without a key, [`Service::create`].
    pub async fn create_idempotent(
        self: &Arc<Self>,
        team_id: &str,
        key: Option<&str>,
        req: models::NewSandbox,
    ) -> Result<models::Sandbox, ApiError> {
        let Some(key) = key else {
            return self.create(team_id, req).await;
        };
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::InvalidIdempotencyKey);
        }
        let body = serde_json::to_vec(&req).map_err(ApiError::internal)?;
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
        let deadline = tokio::time::Instant::now() + self.limits.create_timeout;
        loop {
            let (t, k, h) = (team_id.to_owned(), key.to_owned(), hash.clone());
            let claim = self
                .db(move |s| s.idempotency_claim(&t, &k, &h, now_ms()))
                .await?;
            match claim {
                Claim::Claimed => {
                    let made = self.create(team_id, req).await;
                    let (t, k) = (team_id.to_owned(), key.to_owned());
                    let id = made.as_ref().ok().map(|s| s.sandbox_id.clone());
                    self.db(move |s| match id {
                        Some(id) => s.idempotency_done(&t, &k, &id),
                        None => s.idempotency_release(&t, &k),
                    })
                    .await?;
                    return made;
                }
                Claim::Held { body_hash, .. } if body_hash != hash => {
                    return Err(ApiError::IdempotencyKeyReused);
                }
                Claim::Held {
                    sandbox_id: Some(id),
                    ..
                } => {
                    tracing::info!(sandbox_id = %id, "create answered from its Idempotency-Key");
                    return match self.live_record(team_id, &id).await {
                        Ok(r) => Ok(self.sandbox_view(r)),
                        Err(ApiError::SandboxNotFound { .. }) => {
                            Err(ApiError::IdempotentSandboxEnded { sandbox_id: id })
                        }
                        Err(e) => Err(e),
                    };
                }
                Claim::Held {
                    sandbox_id: None, ..
                } => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ApiError::IdempotencyInProgress);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    pub(super) async fn create_sandbox(
        self: &Arc<Self>,
        team_id: &str,
        p: NewSandboxParams,
    ) -> Result<models::Sandbox, ApiError> {
        let NewSandboxParams {
            template,
            backend_template,
            alias,
            snapshot_id,
            timeout,
            env_vars,
            metadata,
            allow_internet_access,
            network,
            public_traffic,
            mask_request_host,
            auto_pause,
            auto_pause_disk_only,
            auto_resume,
            reservation,
            volume_mounts,
        } = p;
        let traffic_token = (public_traffic == Some(false)).then(random_token);
        let sandbox_id = new_sandbox_id();
        let token = random_token();
        let now = now_ms();
        let record = NewSandboxRecord {
            id: sandbox_id.clone(),
            team_id: team_id.to_owned(),
            template_id: template.id.clone(),
            alias: alias.clone(),
            started_at: now,
            end_at: now + timeout.as_millis() as i64,
            cpu_count: template.cpu_count,
            memory_mb: template.memory_mb,
            disk_size_mb: template.disk_size_mb,
            envd_version: template.envd_version.clone(),
            envd_access_token: Some(token.clone()),
            auto_pause,
            auto_pause_disk_only,
            allow_internet_access,
            traffic_access_token: traffic_token.clone(),
            metadata: metadata.clone(),
            env_names: env_vars.keys().cloned().collect(),
            auto_resume,
            timeout_ms: timeout.as_millis() as i64,
            snapshot_id: snapshot_id.clone(),
            mask_request_host,
        };
        let reservation = match reservation {
            Some(r) => r,
            None => self.reserve(team_id, Want::running()).await?,
        };
        let mounts = volume_mounts.clone();
        // From here the `creating` row counts against the team's running quota.
        self.settle(
            reservation,
            self.db(move |s| s.insert_sandbox_with_mounts(&record, &mounts)),
        )
        .await
        .map_err(|e| match e {
            StoreError::MountedVolumeMissing { name } => ApiError::MountedVolumeNotFound {
                name,
                snapshot: None,
            },
            e => e.into(),
        })?;
        tracing::info!(
            sandbox_id = %sandbox_id, template_id = %template.id, snapshot_id = ?snapshot_id, team_id,
            env_var_names = ?env_vars.keys().collect::<Vec<_>>(),
            volumes = ?volume_mounts.iter().map(|m| (&m.volume_id, &m.path)).collect::<Vec<_>>(),
            "creating sandbox"
        );

        // The start runs in its own task: a client that hangs up mid-create must not leave a
        // VM the store never hears about.
        let this = self.clone();
        let backend_req = CreateSandbox {
            sandbox_id: sandbox_id.clone(),
            template_id: backend_template,
            env_vars,
            metadata,
            envd_access_token: Some(token.clone()),
            allow_internet_access,
            network,
            cpu_count: template.cpu_count,
            memory_mb: template.memory_mb,
            snapshot_id,
            volume_mounts: volume_mounts
                .iter()
                .map(super::volumes::mount_spec)
                .collect(),
        };
        let task = tokio::spawn(
            async move { this.start(backend_req, timeout).await }
                .instrument(tracing::Span::current()),
        );
        let started = match task.await {
            Ok(r) => r?,
            Err(join) => return Err(ApiError::internal(join)),
        };
        Ok(models::Sandbox {
            template_id: template.id,
            sandbox_id,
            client_id: CLIENT_ID.into(),
            envd_version: started.envd_version,
            alias,
            envd_access_token: Some(token),
            traffic_access_token: traffic_token,
            domain: Some(self.domain.clone()),
        })
    }

    async fn start(
        &self,
        req: CreateSandbox,
        timeout: Duration,
    ) -> Result<SandboxRecord, ApiError> {
        let id = req.sandbox_id.clone();
        let template_id = req.template_id.clone();
        let result = self
            .call(BackendOp::Create, &id, self.backend.create(req))
            .await;
        let failure = match result {
            Ok(started) => {
                let started_at = system_time_ms(started.started_at);
                let end_at = now_ms() + timeout.as_millis() as i64;
                let envd = if started.envd_version.is_empty() {
                    FALLBACK_ENVD_VERSION.to_owned()
                } else {
                    started.envd_version.clone()
                };
                let id2 = id.clone();
                let marked = self
                    .db(move |s| {
                        s.mark_running(
                            &id2,
                            started.cpu_count,
                            started.memory_mb,
                            started.disk_size_mb,
                            &envd,
                            started_at,
                            end_at,
                        )
                    })
                    .await;
                match marked {
                    Ok(rec) => {
                        Metrics::inc(&METRICS.sandboxes_created);
                        log_state_change(&id, StoreState::Running, "started");
                        return Ok(rec);
                    }
                    Err(e) => {
                        // Killed or lost while starting (e.g. the reaper): do not leak the VM.
                        tracing::warn!(sandbox_id = %id, error = %chain(&e), "sandbox ended while starting");
                        let _ = self
                            .call(BackendOp::Kill, &id, self.backend.kill(&id))
                            .await;
                        return Err(ApiError::CreateFailed);
                    }
                }
            }
            Err(e) => e,
        };
        Metrics::inc(&METRICS.sandbox_create_failures);
        if matches!(failure, BackendError::Timeout) {
            // The backend may still finish; make sure nothing stays behind.
            let _ = self
                .call(BackendOp::Kill, &id, self.backend.kill(&id))
                .await;
        }
        let reason = format!("create failed: {failure}");
        if let Err(e) = self.transition(&id, StoreState::Killed, &reason).await {
            tracing::error!(sandbox_id = %id, error = %chain(&e), "recording failed create");
        }
        Err(api_error(BackendOp::Create, &template_id, failure))
    }

    pub async fn get(&self, team_id: &str, id: &str) -> Result<models::SandboxDetail, ApiError> {
        let r = self.live_record(team_id, id).await?;
        // A kill in progress is a kill, as for the proxy: the caller sees it gone at once.
        if self.is_ending(&r.id) {
            return Err(ApiError::SandboxNotFound {
                sandbox_id: id.to_owned(),
            });
        }
        // The rules as they are now; a backend that keeps none has only the record's switch.
        let live = self
            .call(BackendOp::Network, &r.id, self.backend.network(&r.id))
            .await
            .ok()
            .flatten();
        let internet = match &live {
            Some(n) => Some(n.allow_internet_access),
            None => r.allow_internet_access,
        };
        let (allow_out, mut deny_out, rules) = live
            .map(|n| (n.allow_out, n.deny_out, n.rules))
            .unwrap_or_default();
        if internet == Some(false) && !deny_out.iter().any(|d| d == "0.0.0.0/0") {
            deny_out.push("0.0.0.0/0".into());
        }
        let network = models::SandboxNetwork {
            allow_out,
            deny_out,
            allow_public_traffic: r.traffic_access_token.is_none(),
            rules: serde_json::to_value(&rules)
                .ok()
                .filter(|_| !rules.is_empty()),
        };
        Ok(models::SandboxDetail {
            template_id: r.template_id.clone(),
            sandbox_id: r.id.clone(),
            client_id: CLIENT_ID.into(),
            started_at: rfc3339(r.started_at),
            end_at: rfc3339(r.end_at),
            envd_version: r.envd_version.clone(),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            state: wire_state(r.state),
            alias: r.alias.clone(),
            envd_access_token: r.envd_access_token.clone(),
            domain: Some(self.domain.clone()),
            metadata: r.metadata.clone(),
            lifecycle: models::SandboxLifecycle {
                auto_resume: r.auto_resume,
                on_timeout: if r.auto_pause { "pause" } else { "kill" }.into(),
            },
            allow_internet_access: internet,
            network,
            volume_mounts: r
                .volume_mounts
                .iter()
                .map(super::volumes::mount_view)
                .collect(),
        })
    }

    /// Extension: the full record with history, for any sandbox of the team.
    pub async fn record(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<models::SandboxRecordView, ApiError> {
        let r = self.any_record(team_id, id).await?;
        let id2 = id.to_owned();
        let events = self.db(move |s| s.sandbox_events(&id2)).await?;
        Ok(models::SandboxRecordView {
            sandbox_id: r.id,
            template_id: r.template_id,
            alias: r.alias,
            state: r.state.to_string(),
            created_at: rfc3339(r.created_at),
            started_at: rfc3339(r.started_at),
            end_at: rfc3339(r.end_at),
            ended_at: r.ended_at.map(rfc3339),
            end_reason: r.end_reason,
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            metadata: r.metadata,
            env_var_names: r.env_names,
            history: events
                .into_iter()
                .map(|e| models::SandboxEventView {
                    at: rfc3339(e.at),
                    from: e.from.map(|s| s.to_string()),
                    to: e.to.to_string(),
                    reason: e.reason,
                })
                .collect(),
        })
    }

    /// One page of the team's sandboxes and the token of the next page.
    pub async fn list(
        &self,
        team_id: &str,
        q: ListQuery,
    ) -> Result<(Vec<models::ListedSandbox>, Option<String>), ApiError> {
        let after = match &q.next_token {
            Some(t) => {
                Some(
                    decode_page_token(t).ok_or_else(|| ApiError::InvalidQuery {
                        detail:
                            "nextToken is not a token this server issued; start again without it"
                                .into(),
                    })?,
                )
            }
            None => None,
        };
        let states = if q.states.is_empty() {
            vec![StoreState::Running, StoreState::Paused]
        } else {
            q.states
        };
        let filter = SandboxFilter {
            team_id: Some(team_id.to_owned()),
            states,
            metadata: q.metadata,
            template: q.template,
            started_after: q.started_after,
            order: q.order,
            limit: q.limit,
            after,
        };
        let page = self.db(move |s| s.list_sandboxes(&filter)).await?;
        let items = page
            .items
            .into_iter()
            .map(|r| models::ListedSandbox {
                template_id: r.template_id,
                sandbox_id: r.id,
                client_id: CLIENT_ID.into(),
                started_at: rfc3339(r.started_at),
                end_at: rfc3339(r.end_at),
                cpu_count: r.cpu_count,
                memory_mb: r.memory_mb,
                disk_size_mb: r.disk_size_mb,
                state: wire_state(r.state),
                envd_version: r.envd_version,
                alias: r.alias,
                metadata: r.metadata,
                volume_mounts: r
                    .volume_mounts
                    .iter()
                    .map(super::volumes::mount_view)
                    .collect(),
            })
            .collect();
        Ok((items, page.next.map(|c| encode_page_token(&c))))
    }

    /// Kills a sandbox: the VM first, then the record.
    pub async fn kill(&self, team_id: &str, id: &str, reason: &str) -> Result<(), ApiError> {
        let r = self.live_record(team_id, id).await?;
        self.kill_record(&r.id, reason).await?;
        Metrics::inc(&METRICS.sandboxes_killed);
        Ok(())
    }

    pub(super) async fn kill_record(&self, id: &str, reason: &str) -> Result<(), ApiError> {
        let _ending = Ending::mark(self, id);
        self.meter_network_of(id).await;
        match self.call(BackendOp::Kill, id, self.backend.kill(id)).await {
            Ok(()) | Err(BackendError::SandboxNotFound) => {}
            Err(e) => return Err(api_error(BackendOp::Kill, id, e)),
        }
        match self.transition(id, StoreState::Killed, reason).await {
            // Already ended by a racing kill or the reaper: the outcome the caller wanted.
            Ok(_) | Err(StoreError::Transition { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox ends `secs` from now (shorter or longer).
    /// `0` ends the lifetime now, as in E2B: the end-of-life work (pause with `autoPause`, else
    /// kill) starts at once in the background, as the reaper would do it.
    pub async fn set_timeout(
        self: &Arc<Self>,
        team_id: &str,
        id: &str,
        secs: i64,
    ) -> Result<(), ApiError> {
        let d = if secs == 0 {
            Duration::ZERO
        } else {
            self.check_timeout(secs)?
        };
        let r = self.live_record(team_id, id).await?;
        let end_at = now_ms() + d.as_millis() as i64;
        let running = r.state == StoreState::Running;
        self.db(move |s| s.set_end_at(&r.id, end_at)).await?;
        if secs == 0 && running {
            tracing::info!(sandbox_id = %id, "timeout set to 0: ending the sandbox now");
            self.reap_expired().await;
        }
        Ok(())
    }

    /// `PUT /sandboxes/{id}/network`: replaces the egress rules of a running or paused sandbox;
    /// they apply to new connections at once and close open ones they refuse.
    pub async fn update_network(
        &self,
        team_id: &str,
        id: &str,
        body: serde_json::Value,
    ) -> Result<(), ApiError> {
        let cfg = network_update(&body)?;
        self.check_secret_refs(team_id, &cfg).await?;
        let r = self.live_record(team_id, id).await?;
        self.call(
            BackendOp::UpdateNetwork,
            &r.id,
            self.backend.update_network(&r.id, cfg),
        )
        .await
        .map_err(|e| api_error(BackendOp::UpdateNetwork, &r.id, e))
    }

    /// `POST /sandboxes/{id}/refreshes`: keep alive at least `secs` more; never shortens.
    pub async fn refresh(
        &self,
        team_id: &str,
        id: &str,
        secs: Option<i64>,
    ) -> Result<(), ApiError> {
        let d = match secs {
            Some(s) => self.check_timeout(s)?,
            None => self.limits.default_timeout,
        };
        let r = self.live_record(team_id, id).await?;
        let end_at = (now_ms() + d.as_millis() as i64).max(r.end_at);
        self.db(move |s| s.set_end_at(&r.id, end_at)).await?;
        Ok(())
    }

    /// What the proxy needs for a sandbox, whatever team it belongs to (the proxy
    /// authenticates with the sandbox's access token, not an API key).
    pub async fn proxy_target(&self, id: &str) -> Result<Option<ProxyTarget>, ApiError> {
        let ending = self.is_ending(id);
        let id = id.to_owned();
        Ok(self
            .db(move |s| s.sandbox(&id))
            .await?
            .map(|r| ProxyTarget {
                // Being killed is as good as killed for traffic.
                state: if ending { StoreState::Killed } else { r.state },
                envd_access_token: r.envd_access_token,
                traffic_access_token: r.traffic_access_token,
                mask_request_host: r.mask_request_host,
                capture_output: r
                    .metadata
                    .get(crate::trace::CAPTURE_OUTPUT_KEY)
                    .is_some_and(|v| v == "true"),
                team_id: r.team_id,
            }))
    }
}

impl Service {
    /// Whether a kill of this sandbox is in progress.
    fn is_ending(&self, id: &str) -> bool {
        self.ending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

/// A sandbox in [`Service`]'s `ending` set for as long as this lives (a kill in progress).
struct Ending<'a> {
    svc: &'a Service,
    id: String,
}

impl<'a> Ending<'a> {
    fn mark(svc: &'a Service, id: &str) -> Self {
        svc.ending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned());
        Ending {
            svc,
            id: id.to_owned(),
        }
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.svc
            .ending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn reject_unsupported(req: &models::NewSandbox) -> Result<(), ApiError> {
    fn empty(v: &Option<serde_json::Value>) -> bool {
        match v {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Object(m)) => m.is_empty(),
            Some(serde_json::Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        }
    }
    if req.auto_pause_memory == Some(false)
        && req
            .auto_resume
            .as_ref()
            .is_some_and(|v| v.get("enabled") == Some(&serde_json::Value::Bool(true)))
    {
        return Err(ApiError::InvalidBody {
            detail: "autoPauseMemory: false cannot go with autoResume: a sandbox paused with its disk alone cold-boots on resume, so traffic cannot wake it transparently; resume it with connect".into(),
        });
    }
    check_mcp(&req.mcp)?;
    if !empty(&req.iam) {
        return Err(ApiError::Unsupported { feature: "iam" });
    }
    Ok(())
}

/// Largest `mcp` object accepted, as JSON: the gateway takes the same on its command line.
pub const MAX_MCP_BYTES: usize = 64 * 1024;
/// Longest MCP server name accepted.
const MAX_MCP_NAME: usize = 128;

/// `mcp`: absent, null, or an object of MCP server name to that server's settings (an object).
/// Only the shape is checked here: the SDK starts the gateway in the sandbox after create
/// (`mcp-gateway --config ...`), and the gateway refuses names it cannot run, naming them.
fn check_mcp(v: &Option<serde_json::Value>) -> Result<(), ApiError> {
    let bad = |detail: String| ApiError::InvalidBody { detail };
    let map = match v {
        None | Some(serde_json::Value::Null) => return Ok(()),
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return Err(bad(
                "mcp must be an object of MCP server name to settings, e.g. {\"time\": {}}".into(),
            ));
        }
    };
    let size = serde_json::to_vec(map)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > MAX_MCP_BYTES {
        return Err(bad(format!(
            "mcp is {size} bytes as JSON, more than the {MAX_MCP_BYTES} allowed"
        )));
    }
    for (name, settings) in map {
        if name.is_empty() || name.len() > MAX_MCP_NAME || name.chars().any(char::is_control) {
            return Err(bad(format!(
                "mcp server names must be 1 to {MAX_MCP_NAME} printable characters, like \"filesystem\""
            )));
        }
        if !(settings.is_object() || settings.is_null()) {
            return Err(bad(format!(
                "mcp.{name} must be an object of that server's settings (e.g. {{}})"
            )));
        }
    }
    Ok(())
}

/// `autoResume: {"enabled": bool}` (absent or null: off).
fn auto_resume_enabled(v: &Option<serde_json::Value>) -> Result<bool, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Object(m)) => match m.get("enabled") {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::InvalidBody {
                detail: "autoResume.enabled must be a boolean".into(),
            }),
        },
        Some(_) => Err(ApiError::InvalidBody {
            detail: "autoResume must be an object like {\"enabled\": true}".into(),
        }),
    }
}

fn encode_page_token(c: &PageCursor) -> String {
    format!("{}.{}", c.started_at, c.id)
}

fn decode_page_token(t: &str) -> Option<PageCursor> {
    let (ms, id) = t.split_once('.')?;
    let started_at = ms.parse().ok()?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(PageCursor {
        started_at,
        id: id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let c = PageCursor {
            started_at: 42,
            id: "abc".into(),
        };
        assert_eq!(decode_page_token(&encode_page_token(&c)), Some(c));
        for bad in ["", "x.abc", "42.", "42.a'b", "42"] {
            assert_eq!(decode_page_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn mcp_takes_an_object_of_names_to_settings() {
        use serde_json::json;
        for ok in [
            None,
            Some(json!(null)),
            Some(json!({})),
            Some(json!({"time": {}, "filesystem": {"paths": ["/home/user"]}, "memory": null})),
            // Names the gateway will refuse still pass here: it names them to the caller.
            Some(json!({"github": {"personalAccessToken": "x"}})),
        ] {
            check_mcp(&ok).unwrap();
        }
        let msg = |v| match check_mcp(&Some(v)) {
            Err(ApiError::InvalidBody { detail }) => detail,
            other => panic!("{other:?}"),
        };
        assert!(msg(json!(["time"])).contains("must be an object"));
        assert!(msg(json!({"time": 3})).contains("mcp.time must be an object"));
        assert!(msg(json!({"": {}})).contains("names must be"));
        assert!(msg(json!({"a\nb": {}})).contains("names must be"));
        let big = json!({"filesystem": {"paths": ["/".repeat(MAX_MCP_BYTES)]}});
        assert!(msg(big).contains("more than the"));
    }
}
