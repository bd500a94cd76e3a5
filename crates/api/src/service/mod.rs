//! The control plane's logic, callable without HTTP: sandboxes (create, get, list, kill,
//! timeouts, connect, metrics, logs), templates, auth, and the background duties (reaper,
//! liveness, reconcile at startup).
//!
//! Handlers extract and validate, call one method here, and map the result. Every store call
//! runs on the blocking pool ([`Service::db`]); every backend call that could hang has a
//! deadline. A sandbox's secret env var values pass through to the backend and nowhere else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use alcove_store::{
    ListOrder, NewSandboxRecord, PageCursor, SandboxFilter, SandboxRecord,
    SandboxState as StoreState, SnapshotRecord, Store, StoreError, TemplateRecord, now_ms,
};

use tracing::Instrument;

use crate::backend::{
    BackendError, BackendOp, CreateSandbox, LogLevel, ResourceUsage, SandboxBackend, SandboxStatus,
};
use crate::config::Limits;
use crate::error::{ApiError, chain};
use crate::metrics::{METRICS, Metrics};
use crate::models::{self, CLIENT_ID, rfc3339, system_time_ms};

/// Envd versions below this make the SDK kill the sandbox; used when the backend reports none.
const FALLBACK_ENVD_VERSION: &str = "0.2.0";

pub struct Service {
    store: Arc<Store>,
    backend: Arc<dyn SandboxBackend>,
    limits: Limits,
    domain: String,
    /// Serialises the concurrency check with the insert, so N racing creates cannot all pass.
    create_lock: tokio::sync::Mutex<()>,
    /// One lock per sandbox serialising pause, resume, snapshot and the reaper's actions on it.
    ops: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sandboxes the reaper is working on: each gets its own task, so one hung backend call
    /// delays that sandbox alone.
    reaping: std::sync::Mutex<HashSet<String>>,
}

/// Children one fork may ask for.
pub const MAX_FORK_COUNT: i64 = 100;

/// What a new sandbox is made from and how, after validation.
struct NewSandboxParams {
    template: TemplateRecord,
    alias: Option<String>,
    snapshot_id: Option<String>,
    timeout: Duration,
    env_vars: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
    allow_internet_access: Option<bool>,
    /// Egress rules, validated.
    network: alcove_net::NetworkConfig,
    public_traffic: Option<bool>,
    auto_pause: bool,
    auto_resume: bool,
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
}

impl Service {
    pub fn new(
        store: Arc<Store>,
        backend: Arc<dyn SandboxBackend>,
        limits: Limits,
        domain: String,
    ) -> Self {
        Service {
            store,
            backend,
            limits,
            domain,
            create_lock: tokio::sync::Mutex::new(()),
            ops: std::sync::Mutex::new(HashMap::new()),
            reaping: std::sync::Mutex::new(HashSet::new()),
        }
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops
            .lock()
            .expect("ops lock")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The domain sandbox traffic is routed by (`<port>-<id>.<domain>`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn backend(&self) -> &Arc<dyn SandboxBackend> {
        &self.backend
    }

    /// The one path every backend call takes: the operation's deadline (from [`Limits`]), the
    /// call, error and timeout counters, and one log line for a failure, inside the caller's
    /// span (request id, sandbox id). A call past its deadline is [`BackendError::Timeout`]; the
    /// future is dropped. `id` is the sandbox the call is about (the snapshot for
    /// `DeleteSnapshot`), `""` for none. Map a failure for a caller with [`api_error`].
    pub(crate) async fn call<T>(
        &self,
        op: BackendOp,
        id: &str,
        fut: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let res = match self.limits.backend_deadline(op) {
            Some(deadline) => match tokio::time::timeout(deadline, fut).await {
                Ok(r) => r,
                Err(_) => {
                    METRICS.backend_call(op.name(), Err(true));
                    tracing::warn!(
                        op = op.name(),
                        id,
                        deadline_ms = deadline.as_millis() as u64,
                        "backend call did not answer within its deadline"
                    );
                    return Err(BackendError::Timeout);
                }
            },
            None => fut.await,
        };
        match &res {
            Ok(_) => METRICS.backend_call(op.name(), Ok(())),
            Err(e) => {
                METRICS.backend_call(op.name(), Err(matches!(e, BackendError::Timeout)));
                if is_outcome(e) {
                    // An answer about the sandbox (gone, port closed...), not a failure.
                    tracing::debug!(op = op.name(), id, error = %e, "backend call refused");
                } else {
                    tracing::error!(op = op.name(), id, error = %chain(e), "backend call failed");
                }
            }
        }
        res
    }

    /// Records a sandbox's state change in the store and logs it (with its reason) once it is
    /// recorded. A move the store's lifecycle refuses is an error and is not logged.
    pub(crate) async fn transition(
        &self,
        id: &str,
        to: StoreState,
        reason: &str,
    ) -> Result<SandboxRecord, StoreError> {
        let (id2, reason2) = (id.to_owned(), reason.to_owned());
        let rec = self.db(move |s| s.transition(&id2, to, &reason2)).await?;
        log_state_change(id, to, reason);
        Ok(rec)
    }

    /// Runs a store call on the blocking pool.
    pub async fn db<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// The team a presented API key belongs to.
    pub async fn authenticate(&self, key: &str) -> Result<String, ApiError> {
        let key = key.to_owned();
        match self.db(move |s| s.authenticate(&key)).await? {
            Some(a) => Ok(a.team_id),
            None => {
                Metrics::inc(&METRICS.auth_failures);
                Err(ApiError::InvalidApiKey)
            }
        }
    }

    // ---- templates -------------------------------------------------------------------------

    /// Copies the backend's templates into the store. Returns how many it has.
    pub async fn sync_templates(&self) -> Result<usize, BackendError> {
        let templates = self
            .call(BackendOp::Templates, "", self.backend.templates())
            .await?;
        let n = templates.len();
        let now = now_ms();
        let records: Vec<TemplateRecord> = templates
            .into_iter()
            .map(|t| TemplateRecord {
                id: t.template_id,
                team_id: None,
                build_id: t.build_id,
                cpu_count: t.cpu_count,
                memory_mb: t.memory_mb,
                disk_size_mb: t.disk_size_mb,
                envd_version: t.envd_version,
                public: true,
                aliases: t.aliases,
                created_at: now,
                updated_at: now,
            })
            .collect();
        let res = self
            .db(move |s| {
                for r in &records {
                    s.upsert_template(r)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %chain(&e), "storing templates failed");
        }
        Ok(n)
    }

    /// Resolves a template by id or alias, asking the backend once more if the store does not
    /// know it (a template built since the last sync).
    async fn resolve_template(&self, name: &str) -> Result<TemplateRecord, ApiError> {
        let n = name.to_owned();
        if let Some(t) = self.db(move |s| s.resolve_template(&n)).await? {
            return Ok(t);
        }
        if let Err(e) = self.sync_templates().await {
            tracing::warn!(error = %chain(&e), "template sync failed");
        }
        let n = name.to_owned();
        self.db(move |s| s.resolve_template(&n))
            .await?
            .ok_or_else(|| ApiError::TemplateNotFound {
                template: name.to_owned(),
            })
    }

    pub async fn templates(&self, team_id: &str) -> Result<Vec<models::Template>, ApiError> {
        let team = team_id.to_owned();
        let list = self.db(move |s| s.templates(Some(&team))).await?;
        Ok(list.iter().map(template_view).collect())
    }

    pub async fn template(&self, id: &str) -> Result<models::TemplateWithBuilds, ApiError> {
        let t = self.resolve_template(id).await?;
        let view = template_view(&t);
        let build = models::TemplateBuild {
            build_id: view.build_id.clone(),
            status: "ready".into(),
            created_at: view.created_at.clone(),
            updated_at: view.updated_at.clone(),
            cpu_count: t.cpu_count,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            envd_version: t.envd_version.clone(),
        };
        Ok(models::TemplateWithBuilds {
            template: view,
            builds: vec![build],
        })
    }

    pub async fn template_alias(
        &self,
        alias: &str,
    ) -> Result<models::TemplateAliasResponse, ApiError> {
        let t = self.resolve_template(alias).await?;
        Ok(models::TemplateAliasResponse {
            template_id: t.id,
            public: t.public,
        })
    }

    // ---- sandboxes -------------------------------------------------------------------------

    fn check_timeout(&self, secs: i64) -> Result<Duration, ApiError> {
        let max = self.limits.max_timeout.as_secs();
        if secs <= 0 || secs as u64 > max {
            return Err(ApiError::TimeoutOutOfRange {
                requested: secs.max(0) as u64,
                max,
            });
        }
        Ok(Duration::from_secs(secs as u64))
    }

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
        let (public_traffic, network) = parse_network(&req.network, req.allow_internet_access)?;
        let (t, name) = (team_id.to_owned(), req.template_id.clone());
        let snapshot = self.db(move |s| s.resolve_snapshot(&t, &name)).await?;
        let (template, alias, snapshot_id) = match snapshot {
            Some(snap) => (
                self.resolve_template(&snap.template_id).await?,
                None,
                Some(snap.id),
            ),
            None => {
                let template = self.resolve_template(&req.template_id).await?;
                let alias = (template.id != req.template_id).then(|| req.template_id.clone());
                (template, alias, None)
            }
        };
        self.create_sandbox(
            team_id,
            NewSandboxParams {
                template,
                alias,
                snapshot_id,
                timeout,
                env_vars: req.env_vars.unwrap_or_default(),
                metadata: req.metadata.unwrap_or_default(),
                allow_internet_access: req.allow_internet_access,
                network,
                public_traffic,
                auto_pause,
                auto_resume,
            },
        )
        .await
    }

    async fn create_sandbox(
        self: &Arc<Self>,
        team_id: &str,
        p: NewSandboxParams,
    ) -> Result<models::Sandbox, ApiError> {
        let NewSandboxParams {
            template,
            alias,
            snapshot_id,
            timeout,
            env_vars,
            metadata,
            allow_internet_access,
            network,
            public_traffic,
            auto_pause,
            auto_resume,
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
            allow_internet_access,
            traffic_access_token: traffic_token.clone(),
            metadata: metadata.clone(),
            env_names: env_vars.keys().cloned().collect(),
            auto_resume,
            timeout_ms: timeout.as_millis() as i64,
            snapshot_id: snapshot_id.clone(),
        };
        {
            let _guard = self.create_lock.lock().await;
            let team = team_id.to_owned();
            let limit = self.limits.max_concurrent_sandboxes;
            let active = self.db(move |s| s.count_active(&team)).await?;
            if active >= limit {
                return Err(ApiError::SandboxLimit { limit });
            }
            self.db(move |s| s.insert_sandbox(&record)).await?;
        }
        tracing::info!(
            sandbox_id = %sandbox_id, template_id = %template.id, snapshot_id = ?snapshot_id, team_id,
            env_var_names = ?env_vars.keys().collect::<Vec<_>>(), "creating sandbox"
        );

        // The start runs in its own task: a client that hangs up mid-create must not leave a
        // VM the store never hears about.
        let this = self.clone();
        let backend_req = CreateSandbox {
            sandbox_id: sandbox_id.clone(),
            template_id: template.id.clone(),
            env_vars,
            metadata,
            envd_access_token: Some(token.clone()),
            allow_internet_access,
            network,
            cpu_count: template.cpu_count,
            memory_mb: template.memory_mb,
            snapshot_id,
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

    /// The record of a sandbox this team can act on: `running` or `paused`.
    async fn live_record(&self, team_id: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let id2 = id.to_owned();
        let rec = self.db(move |s| s.sandbox(&id2)).await?;
        match rec {
            Some(r)
                if r.team_id == team_id
                    && matches!(r.state, StoreState::Running | StoreState::Paused) =>
            {
                Ok(r)
            }
            _ => Err(ApiError::SandboxNotFound {
                sandbox_id: id.to_owned(),
            }),
        }
    }

    /// Any record of this team, whatever its state.
    async fn any_record(&self, team_id: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        let id2 = id.to_owned();
        match self.db(move |s| s.sandbox(&id2)).await? {
            Some(r) if r.team_id == team_id => Ok(r),
            _ => Err(ApiError::SandboxNotFound {
                sandbox_id: id.to_owned(),
            }),
        }
    }

    pub async fn get(&self, team_id: &str, id: &str) -> Result<models::SandboxDetail, ApiError> {
        let r = self.live_record(team_id, id).await?;
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
            allow_internet_access: r.allow_internet_access,
            domain: Some(self.domain.clone()),
            metadata: r.metadata.clone(),
            lifecycle: models::SandboxLifecycle {
                auto_resume: r.auto_resume,
                on_timeout: if r.auto_pause { "pause" } else { "kill" }.into(),
            },
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

    async fn kill_record(&self, id: &str, reason: &str) -> Result<(), ApiError> {
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
    pub async fn set_timeout(&self, team_id: &str, id: &str, secs: i64) -> Result<(), ApiError> {
        let d = self.check_timeout(secs)?;
        let r = self.live_record(team_id, id).await?;
        let end_at = now_ms() + d.as_millis() as i64;
        self.db(move |s| s.set_end_at(&r.id, end_at)).await?;
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
        if memory == Some(false) {
            return Err(ApiError::Unsupported {
                feature: "resuming from the disk alone (memory: false / on_resume=reboot)",
            });
        }
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
        let r = self.resume_record(r, d, "resumed by API request").await?;
        Ok((self.sandbox_view(r), true))
    }

    /// The lifetime a resume without its own timeout restarts: the one asked for at create.
    fn restart_timeout(&self, r: &SandboxRecord) -> Duration {
        r.timeout_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64))
            .unwrap_or(self.limits.default_timeout)
    }

    /// Resumes a paused sandbox (the caller holds its op lock) and records it running until
    /// `lifetime` from now: paused time does not count against the lifetime.
    async fn resume_record(
        &self,
        r: SandboxRecord,
        lifetime: Duration,
        reason: &str,
    ) -> Result<SandboxRecord, ApiError> {
        let team = r.team_id.clone();
        let limit = self.limits.max_concurrent_sandboxes;
        if self.db(move |s| s.count_active(&team)).await? >= limit {
            return Err(ApiError::SandboxLimit { limit });
        }
        let id = r.id.clone();
        if let Err(e) = self
            .call(BackendOp::Resume, &id, self.backend.resume(&id))
            .await
        {
            Metrics::inc(&METRICS.persistence_failures);
            return Err(api_error(BackendOp::Resume, &id, e));
        }
        let end_at = now_ms() + lifetime.as_millis() as i64;
        let (id2, reason2) = (id.clone(), reason.to_owned());
        let rec = self
            .db(move |s| s.mark_resumed(&id2, end_at, &reason2))
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
                self.resume_record(r, d, "resumed by traffic (autoResume)")
                    .await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// `POST /sandboxes/{id}/pause`: memory, processes and disk go to the host's disk and the
    /// VM stops.
    pub async fn pause(
        &self,
        team_id: &str,
        id: &str,
        memory: Option<bool>,
    ) -> Result<(), ApiError> {
        if memory == Some(false) {
            return Err(ApiError::Unsupported {
                feature: "filesystem-only pause (memory: false); memory is always kept",
            });
        }
        let r = self.live_record(team_id, id).await?;
        self.pause_record(&r.id, "paused by API request").await
    }

    async fn pause_record(&self, id: &str, reason: &str) -> Result<(), ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let id2 = id.to_owned();
        let r = self.db(move |s| s.sandbox(&id2)).await?;
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
        if let Err(e) = self
            .call(BackendOp::Pause, id, self.backend.pause(id))
            .await
        {
            Metrics::inc(&METRICS.persistence_failures);
            return Err(api_error(BackendOp::Pause, id, e));
        }
        self.transition(id, StoreState::Paused, reason).await?;
        Metrics::inc(&METRICS.sandboxes_paused);
        Ok(())
    }

    fn sandbox_view(&self, r: SandboxRecord) -> models::Sandbox {
        models::Sandbox {
            template_id: r.template_id,
            sandbox_id: r.id,
            client_id: CLIENT_ID.into(),
            envd_version: r.envd_version,
            alias: r.alias,
            envd_access_token: r.envd_access_token,
            traffic_access_token: r.traffic_access_token,
            domain: Some(self.domain.clone()),
        }
    }

    // ---- snapshots and forks ---------------------------------------------------------------

    /// Takes a snapshot of a running sandbox, which goes on running; records it in the tree
    /// under the sandbox's previous checkpoint.
    async fn take_snapshot(
        &self,
        r: &SandboxRecord,
        name: Option<String>,
        kind: &str,
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
        let snapshot_id = new_sandbox_id();
        if let Err(e) = self
            .call(
                BackendOp::Snapshot,
                &r.id,
                self.backend.snapshot(&r.id, &snapshot_id),
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
        self.db(move |s| {
            s.insert_snapshot(&rec2)?;
            s.set_sandbox_snapshot(&rec2.sandbox_id, &rec2.id)
        })
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
        if memory == Some(false) {
            return Err(ApiError::Unsupported {
                feature: "filesystem-only snapshots (memory: false); snapshots always keep memory",
            });
        }
        if let Some(n) = &name
            && (n.is_empty() || n.len() > 128 || n.chars().any(char::is_control))
        {
            return Err(ApiError::InvalidBody {
                detail: "name must be 1-128 printable characters".into(),
            });
        }
        let r = self.live_record(team_id, id).await?;
        let snap = self.take_snapshot(&r, name, "snapshot").await?;
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
        let mut all: Vec<SnapshotRecord> = self
            .db(move |s| s.snapshots_of_team(&team))
            .await?
            .into_iter()
            .filter(|s| s.deleted_at.is_none() && s.kind == "snapshot")
            .filter(|s| sandbox_id.as_deref().is_none_or(|id| s.sandbox_id == id))
            .filter(|s| {
                name.as_deref()
                    .is_none_or(|n| s.id == n || s.name.as_deref() == Some(n))
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
        let snap = self.take_snapshot(&r, None, "fork").await?;
        let template = self.resolve_template(&r.template_id).await?;
        let lifetime = requested.unwrap_or_else(|| self.restart_timeout(&r));
        // Children keep the parent's egress rules.
        let network = match self
            .call(BackendOp::Network, &r.id, self.backend.network(&r.id))
            .await
        {
            Ok(Some(n)) => n,
            _ => alcove_net::NetworkConfig {
                allow_internet_access: r.allow_internet_access != Some(false),
                ..Default::default()
            },
        };
        let children = (0..count).map(|_| {
            let this = self.clone();
            let params = NewSandboxParams {
                template: template.clone(),
                alias: r.alias.clone(),
                snapshot_id: Some(snap.id.clone()),
                timeout: lifetime,
                env_vars: BTreeMap::new(),
                metadata: r.metadata.clone(),
                allow_internet_access: r.allow_internet_access,
                network: network.clone(),
                public_traffic: r.traffic_access_token.is_some().then_some(false),
                auto_pause: r.auto_pause,
                auto_resume: r.auto_resume,
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

    /// `GET /alcove/v1/warm-pool`.
    pub async fn warm_pool(&self) -> Result<Vec<models::WarmPoolView>, ApiError> {
        let pools = self
            .call(BackendOp::WarmPool, "", self.backend.warm_pool())
            .await
            .map_err(|e| api_error(BackendOp::WarmPool, "", e))?;
        Ok(pools
            .into_iter()
            .map(|p| models::WarmPoolView {
                template_id: p.template_id,
                target: p.target,
                ready: p.ready,
                hits: p.hits,
                misses: p.misses,
                last_error: p.last_error,
            })
            .collect())
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

    async fn sample(&self, id: &str) -> Result<Option<models::SandboxMetric>, ApiError> {
        match self
            .call(BackendOp::Metrics, id, self.backend.metrics(id))
            .await
        {
            Ok(m) => Ok(m.map(metric_view)),
            Err(e @ BackendError::Timeout) => Err(api_error(BackendOp::Metrics, id, e)),
            // No sample is an answer too: the series is empty.
            Err(_) => Ok(None),
        }
    }

    /// `GET /sandboxes/{id}/metrics`: the latest sample (a series of one, or none yet).
    pub async fn metrics(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Vec<models::SandboxMetric>, ApiError> {
        let r = self.live_record(team_id, id).await?;
        Ok(self.sample(&r.id).await?.into_iter().collect())
    }

    /// `GET /sandboxes/metrics?sandbox_ids=a,b`.
    pub async fn metrics_many(
        &self,
        team_id: &str,
        ids: &[String],
    ) -> Result<models::SandboxesWithMetrics, ApiError> {
        let mut out = BTreeMap::new();
        for id in ids {
            let Ok(r) = self.live_record(team_id, id).await else {
                continue;
            };
            if let Some(m) = self.sample(&r.id).await? {
                out.insert(r.id, m);
            }
        }
        Ok(models::SandboxesWithMetrics { sandboxes: out })
    }

    /// Log entries of any sandbox of the team: its lifecycle events merged with the backend's
    /// own lines, oldest first.
    pub async fn logs(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Vec<(i64, models::SandboxLogEntry)>, ApiError> {
        let r = self.any_record(team_id, id).await?;
        let id2 = r.id.clone();
        let events = self.db(move |s| s.sandbox_events(&id2)).await?;
        let mut out: Vec<(i64, models::SandboxLogEntry)> = events
            .into_iter()
            .map(|e| {
                let message = match e.from {
                    Some(from) => format!("sandbox {from} -> {}: {}", e.to, e.reason),
                    None => format!("sandbox {}: {}", e.to, e.reason),
                };
                let level = if e.to == StoreState::Lost {
                    "warn"
                } else {
                    "info"
                };
                (
                    e.at,
                    models::SandboxLogEntry {
                        timestamp: rfc3339(e.at),
                        message,
                        level: level.into(),
                        fields: BTreeMap::from([("source".to_string(), "alcove".to_string())]),
                    },
                )
            })
            .collect();
        if !r.state.is_terminal()
            && let Ok(lines) = self
                .call(BackendOp::Logs, &r.id, self.backend.logs(&r.id))
                .await
        {
            out.extend(lines.into_iter().map(|l| {
                let at = system_time_ms(l.timestamp);
                let level = match l.level {
                    LogLevel::Debug => "debug",
                    LogLevel::Info => "info",
                    LogLevel::Warn => "warn",
                    LogLevel::Error => "error",
                };
                (
                    at,
                    models::SandboxLogEntry {
                        timestamp: rfc3339(at),
                        message: l.message,
                        level: level.into(),
                        fields: BTreeMap::from([("source".to_string(), "sandbox".to_string())]),
                    },
                )
            }));
        }
        out.sort_by_key(|(at, _)| *at);
        Ok(out)
    }

    /// What the proxy needs for a sandbox, whatever team it belongs to (the proxy
    /// authenticates with the sandbox's access token, not an API key).
    pub async fn proxy_target(&self, id: &str) -> Result<Option<ProxyTarget>, ApiError> {
        let id = id.to_owned();
        Ok(self
            .db(move |s| s.sandbox(&id))
            .await?
            .map(|r| ProxyTarget {
                state: r.state,
                envd_access_token: r.envd_access_token,
                traffic_access_token: r.traffic_access_token,
            }))
    }

    pub async fn active_sandboxes(&self) -> usize {
        self.db(|s| s.live_sandboxes())
            .await
            .map(|v| v.iter().filter(|r| r.state == StoreState::Running).count())
            .unwrap_or(0)
    }

    // ---- background duties -----------------------------------------------------------------

    /// Starts the end-of-life work (pause with `autoPause`, else kill) of every running sandbox
    /// past its end time, each in its own task: a backend call that hangs on one sandbox holds
    /// up that sandbox alone, until its deadline, and the next tick retries it. A sandbox
    /// already being worked on is skipped. Returns how many it started on.
    pub async fn reap_expired(self: &Arc<Self>) -> usize {
        let now = now_ms();
        let ids = match self.db(move |s| s.expired_sandboxes(now)).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %chain(&e), "reaper: listing expired sandboxes");
                return 0;
            }
        };
        let mut started = 0;
        for (id, auto_pause) in ids {
            let Some(guard) = ReapGuard::claim(self, &id) else {
                continue;
            };
            started += 1;
            let span = tracing::info_span!("reap", sandbox_id = %id);
            tokio::spawn(
                async move {
                    guard.svc.reap_one(&guard.id, auto_pause).await;
                }
                .instrument(span),
            );
        }
        started
    }

    async fn reap_one(&self, id: &str, auto_pause: bool) {
        if auto_pause {
            match self
                .pause_record(id, "timeout: paused at its end time (autoPause)")
                .await
            {
                Ok(()) => {
                    tracing::info!("reaper: paused at timeout");
                    return;
                }
                Err(ApiError::AlreadyPaused { .. } | ApiError::SandboxNotFound { .. }) => return,
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
        match self
            .kill_record(id, "timeout: the sandbox reached its end time")
            .await
        {
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

/// A sandbox the reaper works on; dropping it (the work done, or its task gone) frees it for
/// the next tick.
struct ReapGuard {
    svc: Arc<Service>,
    id: String,
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

/// The log line of a state change the store recorded: info, warn for a lost sandbox.
fn log_state_change(id: &str, to: StoreState, reason: &str) {
    if to == StoreState::Lost {
        tracing::warn!(sandbox_id = %id, state = %to, reason, "sandbox state changed");
    } else {
        tracing::info!(sandbox_id = %id, state = %to, reason, "sandbox state changed");
    }
}

/// Errors that answer a question about the sandbox rather than report a broken backend.
fn is_outcome(e: &BackendError) -> bool {
    use BackendError as B;
    matches!(
        e,
        B::SandboxNotFound
            | B::TemplateNotFound
            | B::NoCapacity
            | B::PortNotOpen
            | B::Unsupported { .. }
            | B::SnapshotNotFound
            | B::WrongState { .. }
    )
}

/// What a failed backend call means for the API's caller: the one mapping from
/// [`BackendError`] to [`ApiError`], per operation. `id` is the name the caller used: the
/// sandbox id, the template id for `Create`, the snapshot id for `DeleteSnapshot`. The cause was
/// logged by [`Service::call`]; an internal error carries only which call failed.
pub(crate) fn api_error(op: BackendOp, id: &str, e: BackendError) -> ApiError {
    use BackendError as B;
    use BackendOp as O;
    let sandbox_id = id.to_owned();
    match (op, e) {
        (O::Create, B::TemplateNotFound) => ApiError::TemplateNotFound {
            template: sandbox_id,
        },
        (O::Create, B::CorruptSnapshot { .. }) => ApiError::SnapshotCorrupt {
            what: "the snapshot this sandbox was to be made from".into(),
        },
        (O::Create, B::SnapshotNotFound) => ApiError::SnapshotNotFound {
            snapshot_id: sandbox_id,
        },
        (O::Create, B::NoCapacity) => ApiError::NoCapacity,
        (O::Create, B::Timeout) => ApiError::CreateTimeout,
        (O::Create, _) => ApiError::CreateFailed,
        // Sandbox traffic: the 502s and 504 the SDKs turn into their exceptions.
        (O::Forward { .. }, B::SandboxNotFound) => ApiError::SandboxGone { sandbox_id },
        (O::Forward { port }, B::PortNotOpen) => ApiError::PortNotOpen { sandbox_id, port },
        (O::Forward { .. }, B::Timeout) => ApiError::SandboxTimeout { sandbox_id },
        (O::Forward { .. }, _) => ApiError::SandboxUnreachable { sandbox_id },
        (O::Metrics | O::Status | O::Logs | O::Network, B::Timeout) => {
            ApiError::SandboxTimeout { sandbox_id }
        }
        (O::DeleteSnapshot, B::SnapshotNotFound) => ApiError::SnapshotNotFound {
            snapshot_id: sandbox_id,
        },
        (O::DeleteSnapshot, B::Timeout) => ApiError::BackendTimeout {
            op: op.name(),
            sandbox_id: None,
        },
        (_, B::SandboxNotFound) if !id.is_empty() => ApiError::SandboxNotFound { sandbox_id },
        (O::Resume, B::CorruptSnapshot { .. }) => ApiError::SnapshotCorrupt {
            what: format!("paused sandbox {id}"),
        },
        (O::Resume, B::NoCapacity) => ApiError::NoCapacity,
        (O::Pause | O::Resume | O::Snapshot, B::Unsupported { op }) => {
            ApiError::Unsupported { feature: op }
        }
        // A pause, resume or snapshot past its deadline may still finish: the caller is told
        // to check the sandbox, as for any other failure of these.
        (O::Pause, _) => ApiError::PauseFailed { sandbox_id },
        (O::Resume, _) => ApiError::ResumeFailed { sandbox_id },
        (O::Snapshot, _) => ApiError::SnapshotFailed { sandbox_id },
        (_, B::Timeout) => ApiError::BackendTimeout {
            op: op.name(),
            sandbox_id: (!id.is_empty()).then_some(sandbox_id),
        },
        (_, _) => ApiError::internal(BackendCallFailed { op: op.name() }),
    }
}

/// The cause an internal error keeps when a backend call failed. The backend's own error chain
/// was logged once by [`Service::call`], with the request's span.
#[derive(Debug, thiserror::Error)]
#[error("the backend's {op} call failed")]
pub struct BackendCallFailed {
    pub op: &'static str,
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
    if req.auto_pause_memory == Some(false) {
        return Err(ApiError::Unsupported {
            feature: "autoPauseMemory: false (filesystem-only pause); memory is always kept",
        });
    }
    if !empty(&req.mcp) {
        return Err(ApiError::Unsupported { feature: "mcp" });
    }
    if !empty(&req.iam) {
        return Err(ApiError::Unsupported { feature: "iam" });
    }
    if !empty(&req.volume_mounts) {
        return Err(ApiError::Unsupported {
            feature: "volumeMounts",
        });
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

/// The create body's `network` (and top-level `allowInternetAccess`): `allowPublicTraffic` and the
/// egress rules (`allowOut`, `denyOut`); `maskRequestHost` and `dnsServers` are accepted and have
/// nothing to do here (every DNS packet goes to the sandbox's own resolver). Other non-empty
/// fields (transform rules, egress proxies) are refused rather than silently ignored.
fn parse_network(
    network: &Option<serde_json::Value>,
    allow_internet_access: Option<bool>,
) -> Result<(Option<bool>, alcove_net::NetworkConfig), ApiError> {
    let mut public = None;
    let internet = allow_internet_access.unwrap_or(true);
    let map = match network {
        None | Some(serde_json::Value::Null) => {
            let cfg = alcove_net::NetworkConfig {
                allow_internet_access: internet,
                ..Default::default()
            };
            return Ok((None, cfg));
        }
        Some(serde_json::Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::InvalidBody {
                detail: "network must be an object".into(),
            });
        }
    };
    for (k, v) in map {
        match (k.as_str(), v) {
            ("allowPublicTraffic", serde_json::Value::Bool(b)) => public = Some(*b),
            ("allowPublicTraffic", serde_json::Value::Null) => {}
            ("allowPublicTraffic", _) => {
                return Err(ApiError::InvalidBody {
                    detail: "network.allowPublicTraffic must be a boolean".into(),
                });
            }
            (_, serde_json::Value::Null) => {}
            (
                "allowOut" | "denyOut" | "allowInternetAccess" | "dnsServers" | "maskRequestHost",
                _,
            ) => {}
            (_, serde_json::Value::Array(a)) if a.is_empty() => {}
            (_, serde_json::Value::Object(o)) if o.is_empty() => {}
            _ => {
                return Err(ApiError::Unsupported {
                    feature: "network transform rules and egress proxies (network.allowOut, denyOut and allowPublicTraffic are supported)",
                });
            }
        }
    }
    Ok((public, egress_config(map, internet)?))
}

/// The egress rules of a create or `PUT .../network` body, checked. Internet access is on when
/// `internet` is and the body does not turn it off.
fn egress_config(
    map: &serde_json::Map<String, serde_json::Value>,
    internet: bool,
) -> Result<alcove_net::NetworkConfig, ApiError> {
    fn list(
        map: &serde_json::Map<String, serde_json::Value>,
        k: &str,
    ) -> Result<Vec<String>, ApiError> {
        match map.get(k) {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::InvalidBody {
                            detail: format!(
                                "network.{k} must be a list of strings (CIDRs, IPs or domains)"
                            ),
                        })
                })
                .collect(),
            Some(_) => Err(ApiError::InvalidBody {
                detail: format!("network.{k} must be a list of strings (CIDRs, IPs or domains)"),
            }),
        }
    }
    let allow_internet_access = match map.get("allowInternetAccess") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::InvalidBody {
                detail: "allowInternetAccess must be a boolean".into(),
            });
        }
    };
    let cfg = alcove_net::NetworkConfig {
        allow_internet_access: internet && allow_internet_access != Some(false),
        allow_out: list(map, "allowOut")?,
        deny_out: list(map, "denyOut")?,
    };
    alcove_net::Rules::from_config(&cfg).map_err(|e| ApiError::InvalidBody {
        detail: format!("network: {e}"),
    })?;
    Ok(cfg)
}

/// `PUT /sandboxes/{id}/network`: the new rules, replacing the old ones whole (omitted fields are
/// cleared, as in E2B).
pub fn network_update(body: &serde_json::Value) -> Result<alcove_net::NetworkConfig, ApiError> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::InvalidBody {
            detail: "the body must be a JSON object like {\"allowOut\": [...], \"denyOut\": [...]}"
                .into(),
        });
    };
    for (k, v) in map {
        let empty = v.is_null()
            || v.as_array().is_some_and(|a| a.is_empty())
            || v.as_object().is_some_and(|o| o.is_empty());
        if !matches!(
            k.as_str(),
            "allowOut" | "denyOut" | "allowInternetAccess" | "dnsServers"
        ) && !empty
        {
            return Err(ApiError::Unsupported {
                feature: "network transform rules and egress proxies (allowOut, denyOut and allowInternetAccess are supported)",
            });
        }
    }
    egress_config(map, true)
}

fn wire_state(s: StoreState) -> models::SandboxState {
    match s {
        StoreState::Paused => models::SandboxState::Paused,
        _ => models::SandboxState::Running,
    }
}

fn metric_view(m: ResourceUsage) -> models::SandboxMetric {
    let ms = system_time_ms(m.timestamp);
    models::SandboxMetric {
        timestamp: rfc3339(ms),
        timestamp_unix: ms / 1000,
        cpu_count: m.cpu_count,
        cpu_used_pct: m.cpu_used_pct,
        mem_used: m.mem_used,
        mem_total: m.mem_total,
        mem_cache: m.mem_cache,
        disk_used: m.disk_used,
        disk_total: m.disk_total,
    }
}

fn template_view(t: &TemplateRecord) -> models::Template {
    models::Template {
        template_id: t.id.clone(),
        build_id: build_uuid(&t.build_id),
        cpu_count: t.cpu_count,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        public: t.public,
        aliases: t.aliases.clone(),
        names: t.aliases.clone(),
        created_at: rfc3339(t.created_at),
        updated_at: rfc3339(t.updated_at),
        created_by: None,
        last_spawned_at: None,
        spawn_count: 0,
        build_count: 1,
        envd_version: t.envd_version.clone(),
        build_status: "ready".into(),
    }
}

/// The SDK parses build ids as UUIDs; a backend build id that is not one (e.g. a content hash)
/// is mapped to a stable UUID derived from it.
fn build_uuid(build_id: &str) -> String {
    if let Ok(u) = uuid::Uuid::parse_str(build_id) {
        return u.to_string();
    }
    use sha2::Digest;
    let d = sha2::Sha256::digest(build_id.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

/// 20 lowercase alphanumerics: valid in a DNS label, like E2B's ids.
fn new_sandbox_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let bytes: [u8; 20] = rand::random();
    // The first character is a letter so the id never looks like a port number.
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let n = if i == 0 { 26 } else { ALPHABET.len() };
            ALPHABET[*b as usize % n] as char
        })
        .collect()
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 24]>())
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
    fn sandbox_ids_are_host_label_safe_and_distinct() {
        let a = new_sandbox_id();
        assert_eq!(a.len(), 20);
        assert!(a.chars().next().unwrap().is_ascii_lowercase());
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_ne!(a, new_sandbox_id());
    }

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
    fn build_ids_become_uuids() {
        let u = "0b6f3a1e-1111-4222-8333-444455556666";
        assert_eq!(build_uuid(u), u);
        let h = build_uuid("sha256-abc");
        assert!(uuid::Uuid::parse_str(&h).is_ok());
        assert_eq!(h, build_uuid("sha256-abc"));
    }
}
