//! Picking sandboxes up: [`Node::open`] reads every record of a data dir, re-attaches VMs that
//! still run (and serves their egress again), records the ones that vanished meanwhile, and
//! removes warm-pool VMs whose owner is gone; one monitor per running VM records its death.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use alcove_vmm::{Vm, Vmm};

use crate::NodeError;
use crate::host::{HostNetwork, RealNetwork};
use crate::lifecycle::Event;
use crate::live::Live;
use crate::node::{Node, NodeConfig, other_alcove_process_alive, qemu_log_tail};
use crate::record::{self, Record, remove_all_but_record};

/// How long a re-attached VM gets to leave an interrupted pause or snapshot and run again.
const REATTACH_RESUME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often the monitor of a running VM checks whether QEMU stopped it on a failed disk write.
const IO_ERROR_CHECK: std::time::Duration = std::time::Duration::from_secs(3);

impl<V: Vmm> Node<V> {
    /// Opens the node's data dir and picks up the sandboxes recorded there: running VMs are
    /// re-attached, VMs that disappeared meanwhile are marked dead with the reason.
    pub async fn open(cfg: NodeConfig<V>) -> Result<Arc<Node<V>>, NodeError> {
        Self::open_with(cfg, Arc::new(RealNetwork)).await
    }

    /// [`Node::open`] with the host's network side effects done by `net` (tests: a fake).
    pub async fn open_with(
        cfg: NodeConfig<V>,
        net: Arc<dyn HostNetwork>,
    ) -> Result<Arc<Node<V>>, NodeError> {
        let root = cfg.data_dir.join("sandboxes");
        crate::private::create_dir_all(&cfg.data_dir)
            .map_err(|e| NodeError::Io(cfg.data_dir.display().to_string(), e))?;
        crate::private::create_dir_all(&root)
            .map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        let turns = cfg.max_starting_or_default();
        let node = Arc::new(Node {
            cfg,
            starting_turns: Arc::new(tokio::sync::Semaphore::new(turns)),
            sandboxes: Mutex::new(HashMap::new()),
            starting: Mutex::default(),
            templates: Mutex::new(HashMap::new()),
            monitors: Mutex::new(Vec::new()),
            pool: Default::default(),
            net,
            builds: Arc::new(tokio::sync::Semaphore::new(1)),
            oci: Mutex::new(None),
            volumes: Mutex::new(None),
        });
        node.remove_half_built();
        node.remove_stale_scratch();
        let entries =
            std::fs::read_dir(&root).map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let info = match record::read(&dir) {
                Some(i) => i,
                None => {
                    // A create that died before writing its record: nothing to keep.
                    tracing::warn!(dir = %dir.display(), "removing sandbox dir without a valid record");
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
            };
            if info.pooled {
                // Another live process's warm VM (a server, while this is a CLI command) is its
                // business; one of a process that is gone will never be claimed.
                if !info.pool_owner.is_some_and(other_alcove_process_alive) {
                    node.remove_pooled_dir(&dir).await;
                }
                continue;
            }
            let mut vm = None;
            let mut interrupted = None;
            if info.state.is_live() {
                let attached = node.cfg.vmm.attach(&dir).await.ok();
                match attached {
                    Some(v) if v.exit_reason().is_none() => {
                        // A process killed half-way through a pause or a snapshot leaves the
                        // vCPUs stopped (and maybe a save running): the record still says
                        // running, so the VM must run too, or the sandbox hangs for good.
                        match tokio::time::timeout(REATTACH_RESUME_TIMEOUT, v.ensure_running())
                            .await
                        {
                            Ok(Ok(())) => {
                                // The half-written state of the interrupted pause (and the
                                // jailed QEMU's stream before the server moves it into place).
                                let _ = std::fs::remove_file(dir.join("paused.state"));
                                let _ = std::fs::remove_file(dir.join("migration.out"));
                                vm = Some(v)
                            }
                            Ok(Err(e)) => {
                                interrupted = Some(alcove_guest_contract::error_chain(&e));
                                v.kill().await;
                            }
                            Err(_) => {
                                interrupted = Some(format!(
                                    "it did not answer within {REATTACH_RESUME_TIMEOUT:?}"
                                ));
                                v.kill().await;
                            }
                        }
                    }
                    _ => {}
                }
            }
            let live = Live::new(Record::loaded(&dir, info.clone()), vm.clone(), None);
            if info.state.is_live() {
                match vm {
                    Some(vm) => {
                        let pid = vm.pid();
                        let net = node.net.clone();
                        let listeners = tokio::task::spawn_blocking(move || net.of_pid(pid))
                            .await
                            .expect("netns task");
                        match listeners {
                            Ok(l) => {
                                if let Err(e) = node.start_net(&live, l) {
                                    tracing::warn!(sandbox_id = %info.id, error = %e, "could not serve the network of a re-attached sandbox: it has no egress");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(sandbox_id = %info.id, error = %e, "could not enter the network namespace of a re-attached sandbox: it has no egress");
                            }
                        }
                        node.spawn_monitor(live.clone(), vm)
                    }
                    None => {
                        let reason = match &interrupted {
                            Some(why) => format!(
                                "the server stopped during an operation on the VM (pid {}) and the VM could not be made to run again: {why}; it was killed{}",
                                info.pid,
                                qemu_log_tail(&dir)
                            ),
                            None => format!(
                                "the VM process (pid {}) is gone: it was stopped outside Alcove or crashed while no Alcove process was watching{}",
                                info.pid,
                                qemu_log_tail(&dir)
                            ),
                        };
                        live.apply(Event::Vanished { reason })?;
                        remove_all_but_record(&dir);
                    }
                }
            }
            node.sandboxes
                .lock()
                .expect("sandboxes lock")
                .insert(info.id.clone(), live);
        }
        Ok(node)
    }

    pub(crate) fn spawn_monitor(self: &Arc<Self>, live: Arc<Live<V>>, vm: V::Vm) {
        let handle = tokio::spawn(async move {
            // Until the VM exits: a VM that QEMU stopped on a failed disk write (the host's disk
            // was full) is let run again, so it continues once space is back.
            let exit = vm.wait_exit();
            tokio::pin!(exit);
            let mut check = tokio::time::interval(IO_ERROR_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stalled = false;
            let reason = loop {
                tokio::select! {
                    r = &mut exit => break r,
                    _ = check.tick() => {
                        if live.stopping.load(Ordering::SeqCst) {
                            continue;
                        }
                        match tokio::time::timeout(IO_ERROR_CHECK, vm.resume_after_io_error()).await {
                            Ok(Ok(true)) if !stalled => {
                                stalled = true;
                                tracing::warn!(sandbox_id = %live.snapshot().id, "the VM stopped on a failed disk write (is the host's disk full?); letting it run again, and again until the write succeeds");
                            }
                            Ok(Ok(false)) if stalled => {
                                stalled = false;
                                tracing::info!(sandbox_id = %live.snapshot().id, "the VM runs again after a failed disk write");
                            }
                            _ => {}
                        }
                    }
                }
            };
            // Stopped on purpose, or already replaced by a new VM (the restart that ends a
            // snapshot): not a death.
            if live.stopping.load(Ordering::SeqCst) || live.vm().map(|v| v.pid()) != Some(vm.pid())
            {
                return;
            }
            let console = vm.console().tail(6);
            let mut text = reason.to_string();
            if !console.is_empty() {
                text.push_str(&format!("; last console lines:\n{console}"));
            }
            text.push_str(&qemu_log_tail(live.dir()));
            let id = live.snapshot().id;
            tracing::warn!(sandbox_id = %id, reason = %text, "sandbox VM exited on its own");
            live.record_crash(text);
        });
        let mut monitors = self.monitors.lock().expect("monitors lock");
        monitors.retain(|h| !h.is_finished());
        monitors.push(handle.abort_handle());
    }
}
