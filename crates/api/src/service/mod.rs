//! The control plane's logic, callable without HTTP, split by resource:
//!
//! - `mod.rs`: the [`Service`] and its shared state, the backend call path ([`Service::call`]
//!   and [`api_error`], the one `BackendError` → `ApiError` mapping), store access
//!   ([`Service::db`], [`Service::transition`]), auth, and what every resource shares (record
//!   lookups, the wire state, ids and tokens);
//! - `sandboxes` (create, get, list, kill, timeouts, refreshes, network) and `network` (egress
//!   rule parsing), `persistence` (pause, resume, connect, auto-resume for traffic),
//!   `snapshots` (snapshots, forks, the tree), `observability` (metrics, logs, warm pools),
//!   `templates`, `builds` (template builds, uploads, tags), `secrets` (E2B's secrets API),
//!   `volumes` (E2B's volumes: the registry, the content API, mount checks), `recordings`
//!   (screen recordings, run in the guest by the backend's `exec`), and `background`
//!   (reaper, liveness, reconcile at startup).
//!
//! Handlers extract and validate, call one method here, and map the result. Every store call
//! runs on the blocking pool; every backend call goes through [`Service::call`], which applies
//! the operation's deadline from [`Limits`]. A sandbox's secret env var values pass through to
//! the backend and nowhere else.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use alcove_store::{SandboxRecord, SandboxState as StoreState, Store, StoreError};

use crate::backend::{BackendError, BackendOp, SandboxBackend};
use crate::config::Limits;
use crate::error::{ApiError, chain};
use crate::metrics::{METRICS, Metrics};
use crate::models::{self, CLIENT_ID};

mod audit;
mod background;
mod builds;
mod cluster;
mod metering;
mod network;
mod observability;
mod otlp;
mod persistence;
mod quota;
mod recordings;
mod sandboxes;
mod secrets;
mod snapshots;
mod templates;
mod volumes;

pub use audit::{EGRESS_EVENT_QUEUE, record_of, record_view};
pub use builds::TemplateFiles;
pub use metering::{MAX_EVENTS_PAGE, month_start, parse_group, sign as sign_webhook};
pub use network::network_update;
pub use observability::LogQuery;
pub use quota::Quota;
pub use sandboxes::{ListQuery, ProxyTarget};
pub use secrets::{
    MAX_METADATA_BYTES, MAX_METADATA_ENTRIES, MAX_METADATA_KEY_BYTES, MAX_METADATA_VALUE_BYTES,
    MAX_NAME_BYTES, MAX_SECRETS_PER_TEAM, MAX_VALUE_BYTES,
};
pub use snapshots::MAX_FORK_COUNT;
pub use volumes::{
    CreateOptions as VolumeCreateOptions, MAX_LIST_DEPTH, MAX_LIST_ENTRIES, MAX_MOUNTS,
    MAX_VOLUME_NAME, MAX_VOLUMES_PER_TEAM, RESERVED_MOUNT_PATHS,
};

pub struct Service {
    store: Arc<Store>,
    backend: Arc<dyn SandboxBackend>,
    /// Whether this replica ran the background duties at the last ask ([`Service::on_duty`]).
    on_duty: std::sync::atomic::AtomicBool,
    limits: Limits,
    domain: String,
    /// Serialises quota checks with reservations and with the store writes that settle them
    /// (`quota.rs`), so N racing creates or resumes cannot all pass.
    quota_lock: tokio::sync::Mutex<()>,
    /// Quota use reserved by operations in flight, per team.
    pending: Arc<quota::Pending>,
    /// One lock per sandbox serialising pause, resume, snapshot and the reaper's actions on it.
    ops: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sandboxes the reaper is working on: each gets its own task, so one hung backend call
    /// delays that sandbox alone.
    /// Sandboxes being killed: the proxy reports them gone at once (a request cut by the kill
    /// and the SDK's health probe after it must not see a running sandbox that cannot answer).
    ending: std::sync::Mutex<HashSet<String>>,
    reaping: std::sync::Mutex<HashSet<String>>,
    /// Template uploads and their URL key; `None` (no data directory) refuses builds.
    template_files: Option<TemplateFiles>,
    /// One lock per template: its builds run one at a time, in order.
    build_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Prices, tick and webhook (`metering.rs`).
    metering: crate::config::MeteringConfig,
    /// Capped teams' spend this month, as of the last check: creates read it, never the store.
    standing: std::sync::Mutex<HashMap<String, metering::Standing>>,
    /// Audit events on their way to the store (`audit.rs`).
    audit: audit::AuditQueue,
    /// Spans on their way to the OTLP collector (`otlp.rs`).
    spans: otlp::SpanQueue,
    /// The secrets key (`secrets.rs`); `None` (no data directory) refuses the secrets API.
    secrets: Option<Arc<crate::secrets::SecretKey>>,
    /// The volumes' registry (`volumes.rs`); `None` (no data directory) refuses the volumes API.
    volumes: Option<Arc<alcove_volume::Volumes>>,
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
            on_duty: false.into(),
            limits,
            domain,
            quota_lock: tokio::sync::Mutex::new(()),
            pending: Arc::default(),
            ops: std::sync::Mutex::new(HashMap::new()),
            reaping: std::sync::Mutex::new(HashSet::new()),
            ending: std::sync::Mutex::new(HashSet::new()),
            template_files: None,
            build_locks: std::sync::Mutex::new(HashMap::new()),
            metering: crate::config::MeteringConfig::default(),
            standing: std::sync::Mutex::new(HashMap::new()),
            audit: audit::AuditQueue::new(),
            spans: otlp::SpanQueue::new(),
            secrets: None,
            volumes: None,
        }
    }

    /// Sets prices, the metering tick and the spend-warning webhook.
    pub fn with_metering(mut self, metering: crate::config::MeteringConfig) -> Self {
        self.metering = metering;
        self
    }

    /// Enables template builds: uploads under `files.dir`.
    pub fn with_template_files(mut self, files: TemplateFiles) -> Self {
        self.template_files = Some(files);
        self
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

    /// Whether this replica runs the background duties now ([`Store::hold_duties`]: always on
    /// SQLite; one replica at a time on Postgres, the next taking over when it dies). Asked by
    /// each background loop at each tick; a store error counts as not on duty.
    pub async fn on_duty(&self) -> bool {
        use std::sync::atomic::Ordering;
        let held = match self.db(|s| s.hold_duties()).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "duties: asking the store for the duty lock failed");
                false
            }
        };
        self.backend.set_on_duty(held);
        let was = self.on_duty.swap(held, Ordering::Relaxed);
        if held && !was {
            tracing::info!(
                "this replica now runs the background duties (reaper, liveness, metering)"
            );
        } else if was && !held {
            tracing::warn!(
                "this replica no longer runs the background duties (another one took the duty lock)"
            );
        }
        held
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

    /// The team (and key id) a presented API key belongs to.
    pub async fn authenticate(&self, key: &str) -> Result<alcove_store::Authenticated, ApiError> {
        let key = key.to_owned();
        match self.db(move |s| s.authenticate(&key)).await? {
            Some(a) => Ok(a),
            None => {
                Metrics::inc(&METRICS.auth_failures);
                Err(ApiError::InvalidApiKey)
            }
        }
    }

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

    /// The lifetime a resume without its own timeout restarts: the one asked for at create.
    fn restart_timeout(&self, r: &SandboxRecord) -> Duration {
        r.timeout_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64))
            .unwrap_or(self.limits.default_timeout)
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
            | B::Unavailable { .. }
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
        (O::Create | O::Resume, B::Unavailable { reason }) => ApiError::NoNode { reason },
        (O::Create, B::Unsupported { op }) => ApiError::Unsupported { feature: op },
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
        (O::Pause | O::Resume | O::Snapshot | O::Exec, B::Unsupported { op }) => {
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
        (_, e) => ApiError::internal(BackendCallFailed {
            op: op.name(),
            // A failure's chain was logged by the call path; an answer (e.g. unsupported) was
            // not, and rides along to be logged with the request.
            source: is_outcome(&e).then_some(e),
        }),
    }
}

/// The cause an internal error keeps when a backend call failed. [`Service::call`] logged the
/// chain of a real failure already, so only an answer the API could not use is kept as the
/// source: each cause is logged once.
#[derive(Debug, thiserror::Error)]
#[error("the backend's {op} call failed")]
pub struct BackendCallFailed {
    pub op: &'static str,
    #[source]
    pub source: Option<BackendError>,
}

/// The one mapping from the store's lifecycle to E2B's two wire states, used by get and list
/// alike. E2B has no word for the others: `creating` sandboxes are listed only when asked for,
/// and ended ones (`killed`, `lost`) only through Alcove's `state=` extension, whose callers read
/// the real state from `/alcove/v1/sandboxes/{id}`.
fn wire_state(s: StoreState) -> models::SandboxState {
    match s {
        StoreState::Paused => models::SandboxState::Paused,
        StoreState::Creating | StoreState::Running | StoreState::Killed | StoreState::Lost => {
            models::SandboxState::Running
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_map_to_what_the_caller_can_act_on() {
        let status = |op, e| api_error(op, "sbx", e).parts();
        let (st, code, msg) = status(BackendOp::Kill, BackendError::Timeout);
        assert_eq!((st.as_u16(), code), (504, "backend_timeout"));
        assert!(msg.contains("sbx") && msg.contains("Retry"), "{msg}");
        let (st, code, _) = status(BackendOp::Create, BackendError::Timeout);
        assert_eq!((st.as_u16(), code), (504, "sandbox_create_timeout"));
        let (st, code, _) = status(BackendOp::Forward { port: 1 }, BackendError::PortNotOpen);
        assert_eq!((st.as_u16(), code), (502, "port_not_open"));
        let (st, code, _) = status(BackendOp::Pause, BackendError::Timeout);
        assert_eq!((st.as_u16(), code), (500, "sandbox_pause_failed"));
        let (st, code, _) = status(BackendOp::Metrics, BackendError::Timeout);
        assert_eq!((st.as_u16(), code), (504, "sandbox_timeout"));
        let failed = BackendError::Failed {
            op: "kill",
            source: "qemu: secret detail".into(),
        };
        let e = api_error(BackendOp::Kill, "sbx", failed);
        let (st, code, msg) = e.parts();
        assert_eq!((st.as_u16(), code), (500, "internal_server_error"));
        assert!(!msg.contains("secret detail"));
        // The failure's chain was logged by the call path; the error keeps which call failed.
        assert_eq!(chain(&e), "internal error: the backend's kill call failed");
    }

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
}
