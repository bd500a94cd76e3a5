//! A sandbox this process tracks: its record (changed only through [`Live::apply`]), its VM
//! while one runs, the agent connection, and the egress service of its namespace. Lifecycle
//! operations on one sandbox (pause, resume, snapshot, kill) hold its `op` lock.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use alcove_agent_client::AgentClient;
use alcove_vmm::Vmm;

use crate::host::Egress;
use crate::lifecycle::Event;
use crate::node::error_chain;
use crate::record::{Record, SandboxInfo, remove_all_but_record};
use crate::{NodeError, SandboxState};

pub(crate) struct Live<V: Vmm> {
    /// The sandbox's record; changed only through [`Live::apply`].
    pub(crate) record: Record,
    /// The running VM; `None` while paused or dead.
    pub(crate) vm: Mutex<Option<V::Vm>>,
    pub(crate) agent: tokio::sync::Mutex<Option<AgentClient>>,
    /// Set while this process stops the VM on purpose (kill, pause), so the exit monitor does not
    /// report the exit as a death.
    pub(crate) stopping: AtomicBool,
    /// Serialises lifecycle operations (pause, resume, kill) on one sandbox.
    pub(crate) op: tokio::sync::Mutex<()>,
    /// The egress proxy and resolver of the running VM's namespace.
    pub(crate) net: Mutex<Option<Arc<dyn Egress>>>,
}

impl<V: Vmm> Live<V> {
    pub(crate) fn snapshot(&self) -> SandboxInfo {
        self.record.info()
    }

    pub(crate) fn vm(&self) -> Option<V::Vm> {
        self.vm.lock().expect("vm lock").clone()
    }

    pub(crate) fn new(
        record: Record,
        vm: Option<V::Vm>,
        agent: Option<AgentClient>,
    ) -> Arc<Live<V>> {
        Arc::new(Live {
            record,
            vm: Mutex::new(vm),
            agent: tokio::sync::Mutex::new(agent),
            stopping: AtomicBool::new(false),
            op: tokio::sync::Mutex::new(()),
            net: Mutex::new(None),
        })
    }

    /// The record and VM of a running sandbox, or why it is not running.
    pub(crate) fn running_vm(&self, id: &str) -> Result<(SandboxInfo, V::Vm), NodeError> {
        let info = self.snapshot();
        if info.state != SandboxState::Running {
            return Err(NodeError::NotRunning {
                id: id.to_string(),
                state: info.state.to_string(),
            });
        }
        let vm = self.vm().ok_or_else(|| NodeError::NotRunning {
            id: id.to_string(),
            state: "no VM".into(),
        })?;
        Ok((info, vm))
    }

    /// Stops the sandbox's network service (the VM is gone or going).
    pub(crate) fn stop_net(&self) {
        if let Some(n) = self.net.lock().expect("net lock").take() {
            n.stop();
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        self.record.dir()
    }

    /// The one way a sandbox's state and record change (see `lifecycle.rs`).
    pub(crate) fn apply(&self, event: Event) -> Result<SandboxInfo, NodeError> {
        self.record.apply(event)
    }

    /// Records that the sandbox's VM ended on its own (`reason` says how), stops its network and
    /// leaves only its record in its dir. Used by the exit monitor and after a failed save.
    pub(crate) fn record_crash(&self, reason: String) {
        if let Err(e) = self.apply(Event::Crashed { reason }) {
            tracing::warn!(sandbox_id = %self.snapshot().id, error = %error_chain(&e), "could not record the VM's exit");
        }
        self.stop_net();
        remove_all_but_record(self.dir());
    }
}
