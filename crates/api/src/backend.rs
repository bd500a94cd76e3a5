//! The seam between the control plane and the machines: [`SandboxBackend`].
//!
//! The API owns records, auth, limits and timeouts; a backend owns VMs. The integrator implements
//! this trait over the node library (QEMU microVMs restored from template snapshots); tests use a
//! fake. The trait is object-safe (`Arc<dyn SandboxBackend>`): async methods return boxed futures.
//!
//! Contract, for implementers:
//! - Every method may be called concurrently, for different and for the same sandbox.
//! - `create` returns once the in-guest agent answers; the API applies its own deadline on top.
//! - `kill` of an unknown or already dead sandbox is `Ok` or `Err(SandboxNotFound)`, never a panic;
//!   it must leave nothing behind.
//! - `list` is the source of truth after a restart: sandboxes it does not report are marked `lost`.
//! - `pause` leaves no VM process behind and keeps the sandbox resumable across restarts of the
//!   backend; `resume` of a sandbox whose saved state is damaged fails with `CorruptSnapshot` and
//!   leaves that state as it was.
//! - `snapshot` keeps the sandbox running (same id) and makes `snapshot_id` restorable by
//!   `create` with [`CreateSandbox::snapshot_id`] until `delete_snapshot`.
//! - `forward` carries one HTTP exchange (streaming both ways) to a port inside the sandbox.
//!   Errors before a response exists are `BackendError`s; the proxy turns them into the 502s the
//!   SDKs understand.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

pub use axum::body::Body;

/// A boxed, `Send` future: what every backend method returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The template build contract (`alcove-build-spec`), shared with the node.
pub use alcove_build_spec::{
    BuildFailure, BuildFrom, BuildLog, BuildLogEntry, BuildSpec, BuiltTemplate, ImageRegistry,
    LogLevel as BuildLogLevel, Step, StepKind, StepRef,
};

/// The in-guest agent's port (E2B's envd protocol) and the code interpreter's, from the guest
/// contract.
pub use alcove_guest_contract::{CODE_INTERPRETER_PORT, ENVD_PORT};

/// A command for [`SandboxBackend::exec`]: a program and its arguments, run as `user` with the
/// sandbox's own environment.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExecRequest {
    pub cmd: String,
    pub args: Vec<String>,
    /// `user` (E2B's default user) or `root`.
    pub user: String,
    pub timeout: std::time::Duration,
}

/// A host as [`SandboxBackend::host_info`] describes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostInfo {
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Why that accelerator (what was found on the host).
    pub accel_reason: String,
    /// Whether each VM runs jailed (own uid, namespaces, seccomp).
    pub jailed: bool,
    /// Sandboxes this host runs at most (`--max-sandboxes`).
    pub max_sandboxes: usize,
    /// Sandboxes on it now (running or starting).
    pub sandboxes: usize,
    /// vCPUs those sandboxes were given (placement in a cluster counts against them).
    #[serde(default)]
    pub vcpus_used: u32,
    pub cpus: usize,
    pub memory_mib: u64,
    pub memory_available_mib: u64,
}

/// One node of a cluster as its control plane sees it ([`SandboxBackend::nodes`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    #[serde(rename = "nodeID")]
    pub node_id: String,
    /// Its link listener.
    pub url: String,
    /// Heartbeating in time.
    pub up: bool,
    /// Taking no new sandboxes (`alcove node drain`).
    pub draining: bool,
    pub last_heartbeat_ms_ago: u64,
    pub sandboxes: usize,
    pub memory_available_mib: u64,
    pub templates: usize,
}

/// What a command run by [`SandboxBackend::exec`] left.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ExecOutput {
    /// The exit code; -1 when a signal ended it.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What the backend needs to start a sandbox.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateSandbox {
    /// Chosen by the API; unique, lowercase alphanumeric, safe in a host name.
    pub sandbox_id: String,
    /// A template id from [`SandboxBackend::templates`] (aliases are resolved by the API).
    pub template_id: String,
    /// Environment for every process the agent starts. Values may be secrets: never log them.
    pub env_vars: BTreeMap<String, String>,
    /// Caller-supplied labels, for the backend's own bookkeeping and logs.
    pub metadata: BTreeMap<String, String>,
    /// The token the agent must require in `X-Access-Token` (the proxy checks it too).
    pub envd_access_token: Option<String>,
    /// `Some(false)` asks for no outbound network; `None` is the backend's default.
    pub allow_internet_access: Option<bool>,
    /// Egress rules (already folding in `allow_internet_access`), validated by the API.
    pub network: alcove_net::NetworkConfig,
    /// The template's resources, as the API knows them; the backend may override.
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// Restore this snapshot (memory and disk) instead of the template's own; `template_id` is
    /// the template at the root of its chain. Env vars add to the snapshot's.
    pub snapshot_id: Option<String>,
    /// Volumes to mount in the guest, checked by the API (each a volume of the sandbox's team,
    /// an absolute path of its own outside the guest's system directories). The backend reaches
    /// their files through the registry it shares with the API (`Server::volumes`).
    pub volume_mounts: Vec<alcove_volume::MountSpec>,
}

/// What the backend started.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StartedSandbox {
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    /// Version of the agent's envd protocol; the SDKs refuse anything below `0.1.0`.
    pub envd_version: String,
    pub started_at: SystemTime,
}

/// A sandbox the backend has a VM for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveSandbox {
    pub sandbox_id: String,
    pub paused: bool,
}

/// What became of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SandboxStatus {
    Running,
    Paused,
    /// The VM is gone; `reason` says why (exit status, OOM, killed from outside...).
    Exited {
        reason: String,
    },
    /// The backend never heard of it (or forgot it, e.g. after a host restart).
    Unknown,
}

/// A template the host can create sandboxes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateInfo {
    pub template_id: String,
    /// Names it can be created by, e.g. `base`, `code-interpreter-v1`.
    pub aliases: Vec<String>,
    /// Identifies the build (a UUID when possible: the SDK parses it as one).
    pub build_id: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub envd_version: String,
    /// The host's build key of it, by which it can move between the hosts of a cluster
    /// (through the blob store); none where templates do not move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_key: Option<String>,
}

/// A sandbox's egress proxy counters: `(bytes out, bytes in)` since its VM started.
pub type NetCounters = (u64, u64);

/// One template's warm pool on the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmPool {
    pub template_id: String,
    pub target: usize,
    pub min: usize,
    pub max: usize,
    pub ready: usize,
    pub hits: u64,
    pub misses: u64,
    pub last_error: Option<String>,
}

/// One resource sample of a running sandbox.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResourceUsage {
    pub timestamp: SystemTime,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// One line of a sandbox's own log (guest console, agent), beside the API's lifecycle events.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    pub timestamp: SystemTime,
    pub level: LogLevel,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("sandbox not found")]
    SandboxNotFound,
    #[error("template not found")]
    TemplateNotFound,
    /// The host cannot fit another sandbox now (memory, CPU, slots).
    #[error("no capacity for another sandbox")]
    NoCapacity,
    /// Nothing that could run the sandbox is there at all (a cluster with no node up that has
    /// the template); `reason` says what is missing and what to do.
    #[error("no node can take the sandbox: {reason}")]
    Unavailable { reason: String },
    /// Nothing listens on the port inside the sandbox (or the agent is not up).
    #[error("port is not open in the sandbox")]
    PortNotOpen,
    /// The VM or agent did not answer within the backend's own deadline.
    #[error("the sandbox did not answer in time")]
    Timeout,
    /// The backend does not implement this operation.
    #[error("{op} is not supported by this backend")]
    Unsupported { op: &'static str },
    /// A saved state (pause image, snapshot) failed its integrity check; it was left as it was.
    #[error("the saved state is corrupt: {detail}")]
    CorruptSnapshot { detail: String },
    #[error("snapshot not found")]
    SnapshotNotFound,
    /// The sandbox is not in a state that allows the operation (e.g. pausing a paused one).
    #[error("the sandbox is {state}")]
    WrongState { state: String },
    /// Anything else; `op` names what failed, the cause is in `source`.
    #[error("{op} failed")]
    Failed {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a pause keeps and a resume starts from: E2B's `memory` flag (`true`, the default, is
/// `Memory`; the SDKs' `mode="filesystem"` and `on_resume="reboot"` send `false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Keep {
    /// Memory, processes and disk: the sandbox goes on where it was.
    Memory,
    /// The disk alone: the sandbox cold-boots from it, its processes and memory gone.
    DiskOnly,
}

impl Keep {
    /// From E2B's optional `memory` field.
    pub fn from_memory_flag(memory: Option<bool>) -> Keep {
        if memory == Some(false) {
            Keep::DiskOnly
        } else {
            Keep::Memory
        }
    }
}

/// One kind of backend call, as the API's call path names it in deadlines, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOp {
    Templates,
    Create,
    Kill,
    List,
    Status,
    Metrics,
    Logs,
    Network,
    UpdateNetwork,
    WarmPool,
    Pause,
    Resume,
    Snapshot,
    DeleteSnapshot,
    /// Giving back a built template's files.
    DeleteTemplate,
    /// Bytes stored on the host for paused sandboxes and snapshots (quotas).
    StoredBytes,
    NetCounters,
    /// A command run inside a sandbox for the API ([`SandboxBackend::exec`]).
    Exec,
    /// Draining a cluster node ([`SandboxBackend::drain_node`]).
    Drain,
    /// Moving a paused sandbox's state off its node ([`SandboxBackend::evict`]).
    Evict,
    /// Sandbox traffic to `port` inside the sandbox.
    Forward {
        port: u16,
    },
}

impl BackendOp {
    /// Stable name: the `op` label of the backend metrics and the `op` field of logs.
    pub fn name(self) -> &'static str {
        match self {
            BackendOp::Templates => "templates",
            BackendOp::Create => "create",
            BackendOp::Kill => "kill",
            BackendOp::List => "list",
            BackendOp::Status => "status",
            BackendOp::Metrics => "metrics",
            BackendOp::Logs => "logs",
            BackendOp::Network => "network",
            BackendOp::UpdateNetwork => "update_network",
            BackendOp::WarmPool => "warm_pool",
            BackendOp::Pause => "pause",
            BackendOp::Resume => "resume",
            BackendOp::Snapshot => "snapshot",
            BackendOp::DeleteSnapshot => "delete_snapshot",
            BackendOp::DeleteTemplate => "delete_template",
            BackendOp::StoredBytes => "stored_bytes",
            BackendOp::NetCounters => "net_counters",
            BackendOp::Exec => "exec",
            BackendOp::Drain => "drain",
            BackendOp::Evict => "evict",
            BackendOp::Forward { .. } => "forward",
        }
    }
}

/// What the API needs from the machines. See the module docs for the contract.
pub trait SandboxBackend: Send + Sync + 'static {
    /// Templates this host can create sandboxes from.
    fn templates(&self) -> BoxFuture<'_, Result<Vec<TemplateInfo>, BackendError>>;

    /// Starts a sandbox and returns once its agent answers.
    fn create(&self, req: CreateSandbox) -> BoxFuture<'_, Result<StartedSandbox, BackendError>>;

    /// Stops a sandbox and removes everything it left on the host.
    fn kill<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Every sandbox the backend has a VM for (used to reconcile after a restart and to notice
    /// VMs that died underneath us).
    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveSandbox>, BackendError>>;

    /// Liveness of one sandbox, with the exit reason when it is gone.
    fn status<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<SandboxStatus, BackendError>>;

    /// The latest resource sample, if the backend has one.
    fn metrics<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceUsage>, BackendError>>;

    /// The sandbox's own log lines (console, agent). Defaults to none.
    fn logs<'a>(
        &'a self,
        _sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<LogLine>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Replaces a running sandbox's egress rules. Backends without per-sandbox networks refuse.
    fn update_network<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _network: alcove_net::NetworkConfig,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async {
            Err(BackendError::Unsupported {
                op: "network update",
            })
        })
    }

    /// The host's warm pools: sandboxes restored ahead of demand, per template.
    fn warm_pool(&self) -> BoxFuture<'_, Result<Vec<WarmPool>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// A sandbox's current egress rules, if the backend keeps them.
    fn network<'a>(
        &'a self,
        _sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<alcove_net::NetworkConfig>, BackendError>> {
        Box::pin(async { Ok(None) })
    }

    /// Saves a running sandbox to the host and stops its VM: memory, processes and disk
    /// ([`Keep::Memory`]), or the disk alone ([`Keep::DiskOnly`]).
    fn pause<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Err(BackendError::Unsupported { op: "pause" }) })
    }

    /// Runs a paused sandbox again from what `pause` saved (checked before use): its memory
    /// image when it has one and `from` is [`Keep::Memory`], else a cold boot from its disk.
    fn resume<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _from: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Err(BackendError::Unsupported { op: "resume" }) })
    }

    /// Takes snapshot `snapshot_id` of a running sandbox, which goes on running. With
    /// [`Keep::DiskOnly`], sandboxes made from it cold-boot from its disk.
    fn snapshot<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _snapshot_id: &'a str,
        _keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Err(BackendError::Unsupported { op: "snapshot" }) })
    }

    /// Makes a snapshot unrestorable and frees what no sandbox or other snapshot needs.
    fn delete_snapshot<'a>(
        &'a self,
        _snapshot_id: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async {
            Err(BackendError::Unsupported {
                op: "delete snapshot",
            })
        })
    }

    /// Bytes on the host's disk held by these paused sandboxes and snapshots (their memory
    /// images, disk layers and metadata); what is unknown or gone counts 0. The team quota on
    /// stored bytes ([`crate::Limits::max_stored_bytes`]) is checked against it.
    fn stored_bytes<'a>(
        &'a self,
        sandbox_ids: &'a [String],
        snapshot_ids: &'a [String],
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            Ok(self
                .stored_bytes_each(sandbox_ids, snapshot_ids)
                .await?
                .iter()
                .sum())
        })
    }

    /// Bytes on the host's disk of each of these sandboxes (overlay and, paused, memory image)
    /// and then each of these snapshots, in order: what metering charges as storage. What is
    /// unknown or gone is 0.
    fn stored_bytes_each<'a>(
        &'a self,
        sandbox_ids: &'a [String],
        snapshot_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, BackendError>> {
        Box::pin(async move { Ok(vec![0; sandbox_ids.len() + snapshot_ids.len()]) })
    }

    /// Each running sandbox's egress proxy counters `(bytes out, bytes in)` since its VM
    /// started, in order; `None` for one without them (paused, gone, no proxy).
    fn net_counters<'a>(
        &'a self,
        sandbox_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<NetCounters>>, BackendError>> {
        Box::pin(async move { Ok(vec![None; sandbox_ids.len()]) })
    }

    /// Runs a command to completion inside a running sandbox, for the API's own features that
    /// live in the guest (screen recordings run `alcove-record` there). `req.timeout` bounds the
    /// run; the output kept is bounded by the backend (at least 1 MiB).
    fn exec<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecOutput, BackendError>> {
        Box::pin(async { Err(BackendError::Unsupported { op: "exec" }) })
    }

    /// Runs a template build: every step inside builder microVMs, never on the host (see
    /// `alcove_build_spec`). Answers the new template's key, which [`CreateSandbox::template_id`]
    /// then accepts, or the step that failed. Called from the API's build task under the build's
    /// own deadline ([`BuildSpec::deadline`]), not a per-operation one.
    fn build_template(
        &self,
        _spec: BuildSpec,
        _log: BuildLog,
    ) -> BoxFuture<'_, Result<BuiltTemplate, BuildFailure>> {
        Box::pin(async {
            Err(BuildFailure {
                step: StepRef::Base,
                message: "this server's backend does not build templates".into(),
            })
        })
    }

    /// Keys of the templates [`SandboxBackend::build_template`] made that this backend still
    /// has (a node's heartbeat reports them, so its control plane places sandboxes from them
    /// there).
    fn built_templates(&self) -> BoxFuture<'_, Result<Vec<String>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Gives back a built template (`key` from [`SandboxBackend::build_template`]): no new
    /// sandbox is made from it, and its files go once no sandbox, paused sandbox or snapshot
    /// needs them (running sandboxes keep running).
    fn delete_template<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async {
            Err(BackendError::Unsupported {
                op: "delete_template",
            })
        })
    }

    /// What the host is: accelerator and why, capacity (the dashboard's host page). `None`
    /// when the backend has no host of its own to describe.
    fn host_info(&self) -> Option<HostInfo> {
        None
    }

    /// The nodes of a cluster; `None` for a backend that is one host.
    fn nodes(&self) -> Option<Vec<NodeInfo>> {
        None
    }

    /// Whether this control-plane replica runs the background duties (liveness among them):
    /// a cluster backend tells a node back from being lost to drop its sandboxes only on the
    /// replica that declared them lost.
    fn set_on_duty(&self, _on_duty: bool) {}

    /// Stops placing sandboxes on cluster node `node_id` and answers the sandboxes it holds, for
    /// the API to pause each and [`SandboxBackend::evict`] it.
    fn drain_node<'a>(
        &'a self,
        _node_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<LiveSandbox>, BackendError>> {
        Box::pin(async { Err(BackendError::Unsupported { op: "drain" }) })
    }

    /// Snapshot `snapshot_id` is one to keep (a user's, not a fork's, which goes once its
    /// children exist): a cluster copies it to its blob store, so that sandboxes can be made
    /// from it on any node, whatever becomes of the one that took it. Returns at once; the
    /// copy runs behind.
    fn keep_snapshot(&self, _snapshot_id: &str) {}

    /// Moves paused sandbox `sandbox_id` off its node: its state stays (checked) in the
    /// cluster's blob store, and its next resume runs on another node.
    fn evict<'a>(&'a self, _sandbox_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Err(BackendError::Unsupported { op: "evict" }) })
    }

    /// Sends one HTTP request to `port` inside the sandbox: the agent ([`ENVD_PORT`]), the code
    /// interpreter ([`CODE_INTERPRETER_PORT`]) or any port a process listens on. The request's
    /// URI is origin-form (path and query); bodies stream in both directions.
    fn forward<'a>(
        &'a self,
        sandbox_id: &'a str,
        port: u16,
        req: http::Request<Body>,
    ) -> BoxFuture<'a, Result<http::Response<Body>, BackendError>>;
}
