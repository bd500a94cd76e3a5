//! Ending things: kill (the VM, its network, its dir), removal of unclaimed warm-pool VMs, and
//! collection of deleted snapshots' files once nothing sits on them.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use alcove_vmm::{Vm, Vmm};

use crate::lifecycle::Event;
use crate::node::{Node, error_chain};
use crate::record;
use crate::snapshots;
use crate::{NodeError, SandboxState};

impl<V: Vmm> Node<V> {
    /// Kills the warm-pool VM whose dir this is (if it runs) and removes the dir.
    pub(crate) async fn remove_pooled_dir(&self, dir: &Path) {
        if let Ok(vm) = self.cfg.vmm.attach(dir).await {
            vm.kill().await;
        }
        tracing::info!(dir = %dir.display(), "removed an unclaimed warm-pool VM");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Dirs of warm-pool VMs of process `owner` on disk (whatever the pool holds in memory).
    pub(crate) fn pooled_dirs(&self, owner: u32) -> Vec<PathBuf> {
        let root = self.cfg.data_dir.join("sandboxes");
        std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|dir| {
                record::read(dir).is_some_and(|i| i.pooled && i.pool_owner == Some(owner))
            })
            .collect()
    }

    /// Kills a sandbox and removes every trace of it (process, sockets, overlay, record).
    pub async fn kill(&self, id: &str) -> Result<(), NodeError> {
        let live = self.live(id)?;
        let _op = live.op.lock().await;
        live.stopping.store(true, Ordering::SeqCst);
        if let Some(vm) = live.vm() {
            vm.kill().await;
        }
        live.stop_net();
        if let Err(e) = live.apply(Event::Killed) {
            tracing::warn!(sandbox_id = %id, error = %error_chain(&e), "could not record the kill; removing the sandbox anyway");
        }
        std::fs::remove_dir_all(live.dir())
            .map_err(|e| NodeError::Io(live.dir().display().to_string(), e))?;
        self.sandboxes.lock().expect("sandboxes lock").remove(id);
        tracing::info!(sandbox_id = %id, "sandbox killed");
        // Its overlay may have been the last thing on a deleted snapshot's layer, or on a
        // deleted template.
        self.collect_snapshots();
        self.collect_templates();
        Ok(())
    }

    /// Removes the files of deleted snapshots nothing depends on any more.
    pub fn collect_snapshots(&self) -> Vec<String> {
        let metas = snapshots::all(&self.cfg.data_dir);
        let bases: Vec<String> = self
            .list()
            .into_iter()
            .filter(|i| !matches!(i.state, SandboxState::Dead { .. } | SandboxState::Killed))
            .filter_map(|i| i.base_snapshot)
            .collect();
        let gone = snapshots::collectable(&metas, &bases);
        for id in &gone {
            let dir = snapshots::snapshot_dir(&self.cfg.data_dir, id);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(snapshot_id = %id, error = %e, "removing a collected snapshot");
            } else {
                tracing::info!(snapshot_id = %id, "snapshot files collected");
            }
        }
        gone
    }
}
