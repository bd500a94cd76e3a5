//! What travels on the link: heartbeats (node → control plane), calls and their answers
//! (control plane → node, JSON over HTTP/2), and a backend error's wire form.

use alcove_api::backend::{BackendError, CreateSandbox, ExecRequest, HostInfo, Keep, TemplateInfo};
use serde::{Deserialize, Serialize};

/// Paths on a node's link listener.
pub const CALL_PATH: &str = "/node/v1/call";
/// Sandbox traffic: the original path and query follow this prefix.
pub const FORWARD_PREFIX: &str = "/node/v1/forward";
/// The headers naming a forwarded request's sandbox and port.
pub const SANDBOX_HEADER: &str = "x-alcove-node-sandbox";
pub const PORT_HEADER: &str = "x-alcove-node-port";
/// On a node's answer to a forwarded request: the backend error (JSON [`WireError`]) that
/// stopped it before the sandbox answered.
pub const ERROR_HEADER: &str = "x-alcove-node-error";
/// Unauthenticated probes: the cluster listener's and a node link's.
pub const CLUSTER_HEALTH_PATH: &str = "/cluster/v1/health";
pub const NODE_HEALTH_PATH: &str = "/node/v1/health";
/// The control plane's heartbeat path on its cluster listener.
pub const HEARTBEAT_PATH: &str = "/cluster/v1/heartbeat";

/// The control plane's path for a node's egress proxy to fetch a secret's value (for a network
/// rule of a sandbox on that node), signed both ways like heartbeats.
pub const SECRET_PATH: &str = "/cluster/v1/secret";

/// A node asks for secret `name` of the team of `sandbox_id`, which runs on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretRequest {
    pub node_id: String,
    pub sandbox_id: String,
    pub name: String,
}

/// The control plane's answer to a [`SecretRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SecretAnswer {
    /// The value, hex-encoded.
    Value {
        hex: String,
    },
    NotFound,
    /// Not given: the store cannot answer, or the sandbox is not on the asking node.
    Refused {
        reason: String,
    },
}

/// The control plane's path for a node's egress proxy events (for the audit log and run
/// traces), a signed batch at a time.
pub const EGRESS_PATH: &str = "/cluster/v1/egress";

/// A node's egress events since its last batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EgressBatch {
    pub node_id: String,
    pub events: Vec<alcove_net::EgressEvent>,
}

/// The control plane's signed answer to an [`EgressBatch`]: how many of its events went to the
/// audit log, how many were dropped (its queue full, or no audit log), and how many were of
/// sandboxes not on that node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EgressReceipt {
    pub recorded: usize,
    pub dropped: usize,
    pub foreign: usize,
}

/// What a node reports every heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Stable name of the node (unique in the cluster).
    pub node_id: String,
    /// Where the control plane reaches the node's link listener: `https://host:port`.
    pub url: String,
    /// Hex SHA-256 of the link certificate the listener presents.
    pub cert_sha256: String,
    pub host: HostInfo,
    /// Templates the node can create sandboxes from (their files are on it).
    pub templates: Vec<TemplateInfo>,
    /// Templates with a ready warm VM.
    pub warm: Vec<String>,
    /// Not taking new sandboxes (`alcove node drain`).
    #[serde(default)]
    pub draining: bool,
    /// The sandboxes on the node (running and paused): every control-plane replica learns
    /// where each is within a heartbeat, including those another replica placed.
    #[serde(default)]
    pub sandboxes: Vec<String>,
    /// Keys of the templates built through the API on this node (sandboxes and builds from
    /// them are placed here).
    #[serde(default)]
    pub built: Vec<String>,
}

/// The control plane's answer to a heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// The node was declared lost (no heartbeat in time) and its sandboxes reported so: it must
    /// kill them before it takes new ones.
    pub reset: bool,
    /// When to send the next one.
    pub interval_ms: u64,
}

/// One call of the [`alcove_api::backend::SandboxBackend`] trait, as sent to a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    Templates,
    Create {
        req: Box<CreateSandbox>,
    },
    Kill {
        sandbox_id: String,
    },
    List,
    Status {
        sandbox_id: String,
    },
    Metrics {
        sandbox_id: String,
    },
    Logs {
        sandbox_id: String,
    },
    UpdateNetwork {
        sandbox_id: String,
        network: alcove_net::NetworkConfig,
    },
    WarmPool,
    Network {
        sandbox_id: String,
    },
    Pause {
        sandbox_id: String,
        keep: Keep,
    },
    Resume {
        sandbox_id: String,
        from: Keep,
    },
    Snapshot {
        sandbox_id: String,
        snapshot_id: String,
        keep: Keep,
    },
    DeleteSnapshot {
        snapshot_id: String,
    },
    StoredBytesEach {
        sandbox_ids: Vec<String>,
        snapshot_ids: Vec<String>,
    },
    NetCounters {
        sandbox_ids: Vec<String>,
    },
    Exec {
        sandbox_id: String,
        req: ExecRequest,
    },
    /// Kill every sandbox (after a [`HeartbeatAnswer::reset`]); answers how many.
    KillAll,
    /// Stop taking new sandboxes: the node's heartbeats say it is draining from now on, so
    /// every control-plane replica stops placing there, not only the one that was asked.
    Drain,
    /// Upload a paused sandbox's files to the blob store (checksummed); answers the bytes.
    Export {
        sandbox_id: String,
    },
    /// Download a paused sandbox's files from the blob store, check them, and take it in.
    Import {
        sandbox_id: String,
    },
    /// Upload a snapshot's files (its disk flattened onto the template's) to the blob store;
    /// answers the bytes.
    ExportSnapshot {
        snapshot_id: String,
    },
    /// Download a snapshot from the blob store (unless the node has it), check it, take it in.
    ImportSnapshot {
        snapshot_id: String,
    },
    /// Upload template build `key` (its disk as qcow2) to the blob store; answers the bytes.
    ExportTemplate {
        key: String,
    },
    /// Download template build `key` from the blob store (unless the node has it), check it,
    /// take it in.
    ImportTemplate {
        key: String,
    },
    /// Give back template `key` built through the API (see `SandboxBackend::delete_template`).
    DeleteTemplate {
        key: String,
    },
}

/// A node's path for a template build (`POST`, a [`alcove_build_spec::BuildSpec`] as JSON):
/// the answer streams [`BuildEvent`]s, one JSON object per line, until the build ends. A
/// build whose answer is dropped (the control plane went away) is stopped.
pub const BUILD_PATH: &str = "/node/v1/build";
/// A node's path for an uploaded `COPY` archive a build needs (`PUT`, the archive as the body):
/// `/node/v1/build-files/<build id>/<filesHash>`, removed when that build ends.
pub const BUILD_FILES_PREFIX: &str = "/node/v1/build-files/";

/// Whether `id` can name a build on the link (a UUID's characters: it names a directory).
pub fn valid_build_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// One line of a build's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BuildEvent {
    Log {
        entry: alcove_build_spec::BuildLogEntry,
    },
    Built {
        template: alcove_build_spec::BuiltTemplate,
    },
    Failed {
        failure: alcove_build_spec::BuildFailure,
    },
}

impl Call {
    /// For a call that moves files through the blob store: whether it exports (else imports),
    /// what it moves, and which.
    pub fn movement(&self) -> Option<(bool, crate::blobs::Kind, &str)> {
        use crate::blobs::Kind;
        Some(match self {
            Call::Export { sandbox_id } => (true, Kind::Paused, sandbox_id),
            Call::Import { sandbox_id } => (false, Kind::Paused, sandbox_id),
            Call::ExportSnapshot { snapshot_id } => (true, Kind::Snapshot, snapshot_id),
            Call::ImportSnapshot { snapshot_id } => (false, Kind::Snapshot, snapshot_id),
            Call::ExportTemplate { key } => (true, Kind::Template, key),
            Call::ImportTemplate { key } => (false, Kind::Template, key),
            _ => return None,
        })
    }
}

/// A call's answer: `{"ok": …}` or `{"err": …}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ok(serde_json::Value),
    Err(WireError),
}

/// [`BackendError`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    SandboxNotFound,
    TemplateNotFound,
    NoCapacity,
    Unavailable {
        reason: String,
    },
    PortNotOpen,
    Timeout,
    Unsupported {
        op: String,
    },
    CorruptSnapshot {
        detail: String,
    },
    SnapshotNotFound,
    WrongState {
        state: String,
    },
    /// Anything else: what failed and why, as the node's error chain.
    Failed {
        op: String,
        message: String,
    },
}

impl From<&BackendError> for WireError {
    fn from(e: &BackendError) -> WireError {
        use BackendError as B;
        match e {
            B::SandboxNotFound => WireError::SandboxNotFound,
            B::TemplateNotFound => WireError::TemplateNotFound,
            B::NoCapacity => WireError::NoCapacity,
            B::Unavailable { reason } => WireError::Unavailable {
                reason: reason.clone(),
            },
            B::PortNotOpen => WireError::PortNotOpen,
            B::Timeout => WireError::Timeout,
            B::Unsupported { op } => WireError::Unsupported {
                op: (*op).to_owned(),
            },
            B::CorruptSnapshot { detail } => WireError::CorruptSnapshot {
                detail: detail.clone(),
            },
            B::SnapshotNotFound => WireError::SnapshotNotFound,
            B::WrongState { state } => WireError::WrongState {
                state: state.clone(),
            },
            B::Failed { op, source } => WireError::Failed {
                op: (*op).to_owned(),
                message: alcove_api::error::chain(source.as_ref()),
            },
        }
    }
}

/// A failure a node reported, kept as the cause of [`BackendError::Failed`].
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {op} failed: {message}")]
pub struct NodeFailure {
    pub node: String,
    pub op: String,
    pub message: String,
}

/// The names the API's error messages may show for an unsupported operation (they are
/// `&'static str`); another name from a node reads as a generic one.
fn static_op(op: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "pause",
        "resume",
        "snapshot",
        "delete snapshot",
        "network update",
        "exec",
        "delete_template",
    ];
    KNOWN
        .iter()
        .find(|k| **k == op)
        .copied()
        .unwrap_or("this operation on the node")
}

impl WireError {
    /// Back to the API's error; `node` names where it came from.
    pub fn into_backend(self, node: &str) -> BackendError {
        use BackendError as B;
        match self {
            WireError::SandboxNotFound => B::SandboxNotFound,
            WireError::TemplateNotFound => B::TemplateNotFound,
            WireError::NoCapacity => B::NoCapacity,
            WireError::Unavailable { reason } => B::Unavailable { reason },
            WireError::PortNotOpen => B::PortNotOpen,
            WireError::Timeout => B::Timeout,
            WireError::Unsupported { op } => B::Unsupported { op: static_op(&op) },
            WireError::CorruptSnapshot { detail } => B::CorruptSnapshot { detail },
            WireError::SnapshotNotFound => B::SnapshotNotFound,
            WireError::WrongState { state } => B::WrongState { state },
            WireError::Failed { op, message } => B::Failed {
                op: "a call to a cluster node",
                source: Box::new(NodeFailure {
                    node: node.to_owned(),
                    op,
                    message,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_the_wire_with_their_meaning() {
        let io = std::io::Error::other("disk full");
        let e = BackendError::Failed {
            op: "pause",
            source: Box::new(io),
        };
        let w = WireError::from(&e);
        let back: WireError = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        let b = back.into_backend("n1");
        assert!(matches!(b, BackendError::Failed { .. }));
        let chain = std::error::Error::source(&b).unwrap().to_string();
        assert!(
            chain.contains("n1") && chain.contains("disk full"),
            "{chain}"
        );
        let w = WireError::from(&BackendError::WrongState {
            state: "paused".into(),
        });
        assert!(matches!(
            w.into_backend("n1"),
            BackendError::WrongState { state } if state == "paused"
        ));
        let u = WireError::Unsupported { op: "pause".into() }.into_backend("n");
        assert!(matches!(u, BackendError::Unsupported { op: "pause" }));
    }

    #[test]
    fn calls_are_tagged_json() {
        let c = Call::Pause {
            sandbox_id: "abc".into(),
            keep: Keep::DiskOnly,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains(r#""call":"pause""#), "{s}");
        assert!(matches!(
            serde_json::from_str::<Call>(&s).unwrap(),
            Call::Pause {
                keep: Keep::DiskOnly,
                ..
            }
        ));
    }
}
