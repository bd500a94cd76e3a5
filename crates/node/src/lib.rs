//! Sandbox lifecycle on one host: create (restore a template snapshot, or claim a VM from the
//! warm pool), track, run commands, kill and clean up. Every sandbox has a directory under
//! `<data>/sandboxes/` holding its record (`record.json`, which names the sandbox), its disk
//! overlay and the VM's sockets. The directory is named by the sandbox id, or for a sandbox that
//! came from the warm pool by its VM's own id. The record is the source of truth across
//! processes, so the CLI, a server and a restarted server all see the same sandboxes.
//!
//! Invariants: a killed sandbox leaves nothing behind (no process, socket, overlay or record); a
//! sandbox whose VM dies on its own keeps only its record, with the reason, until it is removed.
//! Called by the `alcove` CLI and by the API server's backend.

pub mod build;
mod cleanup;
mod create;
#[cfg(test)]
mod fake;
pub mod host;
pub mod lifecycle;
mod live;
mod moving;
mod node;
mod persist;
mod pool;
pub mod private;
mod reattach;
mod record;
pub mod snapshots;
#[cfg(test)]
mod tests;
mod volumes;

pub use create::{CreateOptions, CreateTimings};
pub use lifecycle::{Event, SandboxState, TransitionError};
pub use moving::Outgoing;
pub use node::{ADMISSION_WAIT, Node, NodeConfig, default_max_starting, new_sandbox_id};
pub use persist::PauseTimings;
pub use pool::{WarmPoolStatus, parse_warm_pool};
pub use record::SandboxInfo;
pub use snapshots::SnapshotMeta;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "sandbox `{0}` does not exist (it was killed, timed out, or never existed); list sandboxes with `alcove sandbox ls`"
    )]
    NotFound(String),
    #[error("sandbox `{id}` is not running ({state}); create a new sandbox")]
    NotRunning { id: String, state: String },
    #[error("template problem")]
    Image(#[from] alcove_image::ImageError),
    #[error("starting the sandbox VM")]
    Vmm(#[from] alcove_vmm::VmmError),
    #[error("talking to the sandbox agent")]
    Agent(#[from] alcove_agent_client::ClientError),
    #[error("the sandbox agent did not answer within {0:?}")]
    AgentTimeout(std::time::Duration),
    #[error("i/o on {0}")]
    Io(String, #[source] std::io::Error),
    #[error(
        "sandbox `{id}` did not boot from its disk: {detail}; its disk is kept, so resume it again or kill it"
    )]
    BootFromDisk { id: String, detail: String },
    #[error("sandbox `{id}` is not paused ({state}); only a paused sandbox can be resumed")]
    NotPaused { id: String, state: String },
    #[error(
        "the paused state of sandbox `{id}` is corrupt ({detail}); it was left as it is and cannot be resumed"
    )]
    CorruptSnapshot { id: String, detail: String },
    #[error(
        "snapshot `{0}` does not exist (it was deleted, or never existed); list snapshots with GET /snapshots"
    )]
    SnapshotNotFound(String),
    #[error(
        "sandbox limit reached: {0} sandboxes are running on this node and none ended while this one waited; kill some or raise the limit (--max-vms)"
    )]
    Capacity(usize),
    #[error(
        "this node is busy: it starts {at_once} sandboxes at a time and this one waited {waited:?} without getting a turn; retry in a few seconds"
    )]
    Busy {
        waited: std::time::Duration,
        at_once: usize,
    },
    #[error("sandbox `{id}` cannot do this in its current state")]
    Transition {
        id: String,
        #[source]
        source: lifecycle::TransitionError,
    },
    #[error("invalid network rules: {0}")]
    BadNetwork(#[from] alcove_net::RuleError),
    #[error("setting up the sandbox's network: {0}")]
    Network(String),
    #[error("volumes: {0}")]
    Volume(String),
    #[error("sandbox `{id}` cannot move to another node: {why}")]
    Unmovable { id: String, why: String },
}
