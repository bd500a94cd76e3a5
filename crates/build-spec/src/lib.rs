//! The contract of template builds between the control plane (`alcove-api`, which validates E2B's
//! build requests and keeps build records, logs, uploads and tags) and a node (`alcove-node`,
//! which runs the steps in builder microVMs and keeps the layer cache and template files): what
//! a build is asked to do and what it answers. Plain data, no behaviour; both sides depend on it
//! so neither depends on the other.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One build, as the API validated it. Serializable: on a cluster it travels over the node link
/// (TLS, the control key), registry credentials included.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildSpec {
    /// The API's build id (a UUID); names the build in logs and in the builder VM's metadata.
    pub build_id: String,
    /// The template's display name (e.g. `my-app`); goes into the manifest.
    pub name: String,
    pub from: BuildFrom,
    pub steps: Vec<Step>,
    /// Started by the agent at boot, before the template snapshot (a server to keep warm).
    pub start_cmd: Option<String>,
    /// Polled until it exits 0 before the template is snapshotted.
    pub ready_cmd: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Bypass the layer cache for every step (`force` / `skip_cache`).
    pub force: bool,
    /// Where uploaded `COPY` archives are: `<files_dir>/<filesHash>` (a tar, gzipped or not).
    pub files_dir: PathBuf,
    /// The builder VM's egress rules (the operator's policy for builds).
    pub network: alcove_net::NetworkConfig,
    /// The whole build's deadline; a step that runs past it fails with `StepRef` of that step.
    pub deadline: Duration,
}

/// What the build starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildFrom {
    /// A built template: a host template's name (`base`) or a built template's key.
    Template(String),
    /// An OCI image reference (`registry/repo:tag` or `@sha256:`), pulled by the node.
    Image {
        reference: String,
        registry: Option<ImageRegistry>,
    },
}

/// Credentials for a private registry (`fromImageRegistry`). Never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRegistry {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for ImageRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageRegistry")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// One step, in E2B's terms. `force` reruns it (and everything after it) without the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub kind: StepKind,
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepKind {
    /// A shell command (`/bin/sh -c`), as `user` (default: the current `USER`, initially `user`),
    /// in the current `WORKDIR` with the `ENV` so far.
    Run { cmd: String, user: Option<String> },
    /// Extract the uploaded archive `files_hash` at `dest` (a directory when it ends in `/`),
    /// owned by `owner` (`user[:group]`, default: the current user) with `mode` when given.
    Copy {
        files_hash: String,
        src: String,
        dest: String,
        owner: Option<String>,
        mode: Option<u32>,
    },
    /// Adds to the environment of later steps and of the template's processes.
    Env { vars: Vec<(String, String)> },
    /// The working directory of later steps and of the template's processes (created if missing).
    Workdir { path: String },
    /// The user of later steps and of the template's processes.
    User { user: String },
}

/// Where in a build something happened: E2B's `reason.step` (`base`, a 1-based step index, or
/// `finalize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepRef {
    Base,
    Step(u32),
    Finalize,
}

impl std::fmt::Display for StepRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepRef::Base => f.write_str("base"),
            StepRef::Step(i) => write!(f, "{i}"),
            StepRef::Finalize => f.write_str("finalize"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// One build log line (a step's output line, or the builder's own message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogEntry {
    pub level: LogLevel,
    pub step: StepRef,
    pub message: String,
}

/// Where the build's log lines go (the API stores them). Called from any task; must not block.
pub type BuildLog = Arc<dyn Fn(BuildLogEntry) + Send + Sync>;

/// A finished build: a template this node can create sandboxes from by `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltTemplate {
    /// The template's build key (hex): `CreateOptions::template` accepts it.
    pub key: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    /// Steps served from the layer cache.
    pub cached_steps: u32,
    /// Bytes the template's files take on the host (quotas).
    pub stored_bytes: u64,
}

/// A failed build: which step, and a message for the user (the last log lines are in the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildFailure {
    pub step: StepRef,
    pub message: String,
}

impl std::fmt::Display for BuildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}: {}", self.step, self.message)
    }
}

impl std::error::Error for BuildFailure {}
