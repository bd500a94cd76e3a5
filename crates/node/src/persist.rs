//! Persistence of running sandboxes: pause to a checksummed memory image and resume from it,
//! snapshots (memory image plus the disk frozen as a read-only layer) and the restart that ends
//! one, re-homing a snapshot's memory into a shared RAM file, and deleting snapshots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alcove_vmm::{Disk, DiskFormat, Vm, Vmm};

use crate::create::{connect_and_init, make_overlay, sandbox_spec};
use crate::lifecycle::Event;
use crate::live::Live;
use crate::node::{Node, error_chain, now_ms, qemu_log_tail, valid_id};
use crate::record::remove_all_but_record;
use crate::snapshots::{self, SnapshotMeta};
use crate::{NodeError, SandboxState};

/// Where a paused sandbox's memory and device state live, inside its dir.
pub(crate) const PAUSED_STATE: &str = "paused.state";
/// The zero-filled RAM file a cold boot maps privately (sparse; removed once the VM runs).
const BOOT_RAM: &str = "boot.mem";
/// How long a cold boot may take to its ready line: the kernel, the agent, and the template's
/// start and ready commands (the code interpreter imports pandas under TCG); under the API's
/// resume deadline (120 s).
const BOOT_READY_TIMEOUT: Duration = Duration::from_secs(100);
/// Bound on the guest's flush before a filesystem-only pause.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy)]
pub struct PauseTimings {
    /// Until the state file was complete (the VM was stopped at the start of it).
    pub saved: Duration,
    pub total: Duration,
    pub state_bytes: u64,
}

impl<V: Vmm> Node<V> {
    /// Pauses a running sandbox to disk: device state and memory go to `paused.state` (checksummed),
    /// the disk overlay stays, and the VM process exits, so a paused sandbox uses no CPU or RAM.
    pub async fn pause(&self, id: &str) -> Result<PauseTimings, NodeError> {
        let live = self.live(id)?;
        let _op = live.op.lock().await;
        let t0 = Instant::now();
        let (_, vm) = live.running_vm(id)?;
        let state_file = live.dir().join(PAUSED_STATE);
        let tmp = live.dir().join(format!("{PAUSED_STATE}.tmp"));
        live.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = vm.snapshot(&tmp).await {
            // The VM is stopped but intact: let it run on rather than lose it.
            let _ = std::fs::remove_file(&tmp);
            let _ = vm.resume().await;
            live.stopping.store(false, Ordering::SeqCst);
            self.record_death_during(&live, &vm, "pause");
            return Err(e.into());
        }
        let saved = t0.elapsed();
        end_vm_for_pause(&live, &vm).await;
        let sha = crate::node::sha256_blocking(&tmp).await?;
        std::fs::rename(&tmp, &state_file)
            .map_err(|e| NodeError::Io(state_file.display().to_string(), e))?;
        let size = std::fs::metadata(&state_file).map(|m| m.len()).unwrap_or(0);
        record_paused(&live, sha, false)?;
        tracing::info!(sandbox_id = %id, ms = t0.elapsed().as_millis() as u64, bytes = size, "sandbox paused");
        Ok(PauseTimings {
            saved,
            total: t0.elapsed(),
            state_bytes: size,
        })
    }

    /// Pauses a running sandbox keeping only its disk: the guest saves its environment variables
    /// to the disk ([`alcove_guest_contract::PERSISTED_ENV_FILE`]) and flushes it, then the VM
    /// ends. Nothing of its memory is kept; the resume cold-boots from the disk. The record keeps
    /// the disk's checksum, checked before the resume.
    pub async fn pause_disk_only(&self, id: &str) -> Result<PauseTimings, NodeError> {
        let live = self.live(id)?;
        let _op = live.op.lock().await;
        let t0 = Instant::now();
        let (_, vm) = live.running_vm(id)?;
        keep_env_and_sync(&live, &vm, id).await?;
        let saved = t0.elapsed();
        live.stopping.store(true, Ordering::SeqCst);
        end_vm_for_pause(&live, &vm).await;
        let disk = live.dir().join("disk.qcow2");
        let sha = crate::node::sha256_blocking(&disk).await?;
        // A full pause's image left from before (a reboot that failed) is not this state.
        let _ = std::fs::remove_file(live.dir().join(PAUSED_STATE));
        record_paused(&live, sha, true)?;
        tracing::info!(sandbox_id = %id, ms = t0.elapsed().as_millis() as u64, "sandbox paused (filesystem only)");
        Ok(PauseTimings {
            saved,
            total: t0.elapsed(),
            state_bytes: 0,
        })
    }

    /// After a failed save: a VM that died meanwhile was not seen by its monitor (this process
    /// was stopping it), so its death is recorded here.
    fn record_death_during(&self, live: &Live<V>, vm: &V::Vm, what: &str) {
        let Some(reason) = vm.exit_reason() else {
            return;
        };
        let reason = format!(
            "the VM exited during a {what}: {reason}{}",
            qemu_log_tail(live.dir())
        );
        *live.vm.lock().expect("vm lock") = None;
        live.record_crash(reason);
    }

    /// Resumes a paused sandbox: verifies the snapshot's checksum, restores the VM and sets the
    /// guest clock. A failed resume leaves the sandbox paused and its snapshot untouched.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<Duration, NodeError> {
        self.resume_with(id, false).await
    }

    /// [`Node::resume`], or with `reboot` a cold boot from the disk alone, the memory image (if
    /// any) dropped: E2B's `on_resume="reboot"`, the way out of a memory image that wedges the
    /// guest. A sandbox paused filesystem-only always cold-boots (after its disk's checksum is
    /// checked).
    pub async fn resume_with(
        self: &Arc<Self>,
        id: &str,
        reboot: bool,
    ) -> Result<Duration, NodeError> {
        let live = self.live(id)?;
        let _op = live.op.lock().await;
        let t0 = Instant::now();
        let info = live.snapshot();
        let deadline = tokio::time::Instant::now() + self.cfg.admission_wait;
        let _slot = match &info.state {
            SandboxState::Paused { .. } => Some(self.admit(id, deadline).await?),
            _ => None,
        };
        let SandboxState::Paused {
            state_sha256,
            disk_only,
            ..
        } = &info.state
        else {
            return Err(NodeError::NotPaused {
                id: id.to_string(),
                state: info.state.to_string(),
            });
        };
        let _turn = self.starting_turn(deadline).await?;
        let state_file = live.dir().join(PAUSED_STATE);
        if *disk_only || reboot {
            if *disk_only {
                verify_checksum(id, &live.dir().join("disk.qcow2"), state_sha256).await?;
            }
            self.boot_from_disk(&live, t0).await?;
            let _ = std::fs::remove_file(&state_file);
            tracing::info!(sandbox_id = %id, ms = t0.elapsed().as_millis() as u64, "sandbox booted from its disk");
            return Ok(t0.elapsed());
        }
        verify_checksum(id, &state_file, state_sha256).await?;
        self.run_from_state(&live, &state_file, None, false, t0)
            .await?;
        let _ = std::fs::remove_file(&state_file);
        tracing::info!(sandbox_id = %id, ms = t0.elapsed().as_millis() as u64, "sandbox resumed");
        Ok(t0.elapsed())
    }

    /// Starts a sandbox's VM again from a memory image of itself (a resume, or the restart that
    /// ends a snapshot): same identity, only its clock is set and entropy added.
    pub(crate) async fn run_from_state(
        self: &Arc<Self>,
        live: &Arc<Live<V>>,
        state_file: &Path,
        ram_file: Option<&Path>,
        full_image: bool,
        t0: Instant,
    ) -> Result<(), NodeError> {
        let info = live.snapshot();
        let template = self.template_by_key(&info.template_key)?;
        let mut spec = sandbox_spec(&template, live.dir());
        let listeners = self.new_netns(&mut spec).await?;
        if let Some(ram) = ram_file {
            // A private mapping of the snapshot's RAM file. A later pause writes every page,
            // so its resume can map the template's RAM file as usual.
            spec.ram_file = ram.to_path_buf();
        }
        let (vm, _) = if full_image {
            self.cfg.vmm.restore_full(&spec, state_file).await?
        } else {
            self.cfg.vmm.restore(&spec, state_file).await?
        };
        drop(spec);
        self.adopt_vm(live, vm, listeners, false, t0).await
    }

    /// Cold-boots a paused sandbox's VM from its disk overlay, with fresh zeroed RAM: the kernel,
    /// the agent and the template's start command run again, and `/init` gives it its identity
    /// as at a create (the agent has taken back its environment variables from the disk).
    async fn boot_from_disk(
        self: &Arc<Self>,
        live: &Arc<Live<V>>,
        t0: Instant,
    ) -> Result<(), NodeError> {
        let info = live.snapshot();
        let template = self.template_by_key(&info.template_key)?;
        let (vm, listeners) = self.boot_vm(&template, live.dir(), &info.id).await?;
        self.adopt_vm(live, vm, listeners, true, t0).await
    }

    /// Boots `template`'s kernel over the overlay `dir/disk.qcow2` with fresh zeroed RAM, in a
    /// new network namespace, and waits for the agent's ready line (its start command done).
    pub(crate) async fn boot_vm(
        &self,
        template: &alcove_image::Template,
        dir: &Path,
        id: &str,
    ) -> Result<(V::Vm, crate::host::EgressSockets), NodeError> {
        let mut spec = sandbox_spec(template, dir);
        let ram = dir.join(BOOT_RAM);
        let make_ram = || -> std::io::Result<()> {
            let f = crate::private::create_file(&ram)?;
            f.set_len(u64::from(spec.mem_mib) << 20)
        };
        make_ram().map_err(|e| NodeError::Io(ram.display().to_string(), e))?;
        spec.ram_file = ram.clone();
        spec.ram_shared = false;
        let listeners = self.new_netns(&mut spec).await?;
        let booted = self.cfg.vmm.boot(&spec).await;
        drop(spec);
        let vm = match booted {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_file(&ram);
                return Err(e.into());
            }
        };
        let ready = tokio::select! {
            r = tokio::time::timeout(
                BOOT_READY_TIMEOUT,
                vm.console().wait_for(alcove_guest_contract::READY_LINE),
            ) => r.is_ok(),
            _ = vm.wait_exit() => false,
        };
        let _ = std::fs::remove_file(&ram);
        if !ready {
            let tail = vm.console().tail(20);
            vm.kill().await;
            return Err(NodeError::BootFromDisk {
                id: id.to_string(),
                detail: format!(
                    "no ready line within {} s; console tail:\n{tail}",
                    BOOT_READY_TIMEOUT.as_secs()
                ),
            });
        }
        Ok((vm, listeners))
    }

    /// Gives a just-started VM its sandbox's `/init` (`fresh`: identity and env as at a create)
    /// and makes it the sandbox's running VM.
    async fn adopt_vm(
        self: &Arc<Self>,
        live: &Arc<Live<V>>,
        vm: V::Vm,
        listeners: crate::host::EgressSockets,
        fresh: bool,
        t0: Instant,
    ) -> Result<(), NodeError> {
        let info = live.snapshot();
        let token = info.access_token.clone();
        let (agent, _) =
            match connect_and_init(&vm, &info, fresh, token.as_deref(), t0, Some(live.dir())).await
            {
                Ok(x) => x,
                Err(e) => {
                    vm.kill().await;
                    return Err(e);
                }
            };
        if let Err(e) = self.attach_volumes(&info, &agent).await {
            vm.kill().await;
            return Err(e);
        }
        let pid = vm.pid();
        let event = match info.state {
            SandboxState::Paused { .. } => Event::Resumed { pid },
            _ => Event::Restarted { pid },
        };
        if let Err(e) = live.apply(event) {
            vm.kill().await;
            return Err(e);
        }
        *live.vm.lock().expect("vm lock") = Some(vm.clone());
        *live.agent.lock().await = Some(agent);
        self.start_net(live, listeners)?;
        live.stopping.store(false, Ordering::SeqCst);
        self.spawn_monitor(live.clone(), vm);
        Ok(())
    }

    /// Takes snapshot `snapshot_id` of a running sandbox: its memory image, and its disk frozen
    /// as a read-only layer. The sandbox is stopped while the image is written, then goes on
    /// from that image on a new overlay over the layer, with the same id and identity.
    pub async fn snapshot(
        self: &Arc<Self>,
        id: &str,
        snapshot_id: &str,
    ) -> Result<(SnapshotMeta, PauseTimings), NodeError> {
        self.snapshot_with(id, snapshot_id, false).await
    }

    /// [`Node::snapshot`]; with `disk_only` a filesystem-only snapshot: the guest saves its env
    /// vars to its disk and flushes it first, the layer's checksum is recorded, and sandboxes
    /// made from the snapshot cold-boot from the layer instead of restoring the memory image
    /// (which stays only for the sandbox the snapshot was taken of).
    pub async fn snapshot_with(
        self: &Arc<Self>,
        id: &str,
        snapshot_id: &str,
        disk_only: bool,
    ) -> Result<(SnapshotMeta, PauseTimings), NodeError> {
        if !valid_id(snapshot_id) {
            return Err(NodeError::Io(
                snapshot_id.to_string(),
                std::io::Error::other("invalid snapshot id"),
            ));
        }
        let live = self.live(id)?;
        let _op = live.op.lock().await;
        let t0 = Instant::now();
        let (info, vm) = live.running_vm(id)?;
        if disk_only {
            keep_env_and_sync(&live, &vm, id).await?;
        }
        let root = snapshots::snapshots_root(&self.cfg.data_dir);
        crate::private::create_dir_all(&root)
            .map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        let sdir = snapshots::snapshot_dir(&self.cfg.data_dir, snapshot_id);
        crate::private::create_dir(&sdir)
            .map_err(|e| NodeError::Io(sdir.display().to_string(), e))?;
        let tmp = sdir.join("memory.state.tmp");
        live.stopping.store(true, Ordering::SeqCst);
        // Every page, in the stream format without `x-ignore-shared`: what a VM whose RAM is a
        // shared file can load (see `share_memory`).
        if let Err(e) = vm.save(&tmp, false).await {
            let _ = std::fs::remove_dir_all(&sdir);
            let _ = vm.resume().await;
            live.stopping.store(false, Ordering::SeqCst);
            self.record_death_during(&live, &vm, "snapshot");
            return Err(e.into());
        }
        let saved = t0.elapsed();
        vm.kill().await;
        *live.agent.lock().await = None;
        *live.vm.lock().expect("vm lock") = None;

        let disk = live.dir().join("disk.qcow2");
        let layer = sdir.join(snapshots::DISK);
        let frozen = async {
            std::fs::rename(&disk, &layer)
                .map_err(|e| NodeError::Io(layer.display().to_string(), e))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&layer, std::fs::Permissions::from_mode(0o400))
                    .map_err(|e| NodeError::Io(layer.display().to_string(), e))?;
            }
            make_overlay(&layer, &disk).await?;
            let sha = crate::node::sha256_blocking(&tmp).await?;
            let memory = sdir.join(snapshots::MEMORY);
            std::fs::rename(&tmp, &memory)
                .map_err(|e| NodeError::Io(memory.display().to_string(), e))?;
            let meta = SnapshotMeta {
                id: snapshot_id.to_string(),
                sandbox_id: id.to_string(),
                parent: info.base_snapshot.clone(),
                template: info.template.clone(),
                template_key: info.template_key.clone(),
                state_sha256: sha,
                state_bytes: std::fs::metadata(&memory).map(|m| m.len()).unwrap_or(0),
                access_token: info.access_token.clone(),
                created_at_unix_ms: now_ms(),
                deleted: false,
                shared_ram: false,
                disk_only,
                disk_sha256: if disk_only {
                    Some(crate::node::sha256_blocking(&layer).await?)
                } else {
                    None
                },
            };
            snapshots::write_meta(&sdir, &meta)?;
            // The overlay sits on the layer from now on: recorded before anything can collect it.
            live.apply(Event::Snapshotted {
                snapshot_id: snapshot_id.to_string(),
            })?;
            Ok::<_, NodeError>(meta)
        }
        .await;
        let (mut meta, state_file) = match frozen {
            Ok(meta) => (meta, sdir.join(snapshots::MEMORY)),
            Err(e) => {
                // Put the disk back and let the sandbox go on from the image; no snapshot.
                if layer.exists() {
                    let _ = std::fs::remove_file(&disk);
                    let _ = std::fs::rename(&layer, &disk);
                }
                let kept = live.dir().join("snapshot-failed.state");
                let _ = std::fs::rename(&tmp, &kept);
                let _ = std::fs::remove_dir_all(&sdir);
                let restarted = self.run_from_state(&live, &kept, None, true, t0).await;
                let _ = std::fs::remove_file(&kept);
                if let Err(re) = restarted {
                    let _ = live.apply(Event::Crashed {
                        reason: format!("a failed snapshot could not restart it: {re}"),
                    });
                }
                return Err(e);
            }
        };
        // Re-home the image into a shared RAM file, so the sandbox and everything restored from
        // the snapshot share its pages; on failure the full image serves, as it is.
        let mut state_file = state_file;
        match self.share_memory(&info.template_key, &sdir).await {
            Ok(sha) => {
                meta.shared_ram = true;
                meta.state_sha256 = sha;
                meta.state_bytes = std::fs::metadata(sdir.join(snapshots::RAM_STATE))
                    .map(|m| m.len())
                    .unwrap_or(0)
                    + snapshots::allocated_bytes(&sdir.join(snapshots::RAM));
                snapshots::write_meta(&sdir, &meta)?;
                let _ = std::fs::remove_file(sdir.join(snapshots::MEMORY));
                state_file = sdir.join(snapshots::RAM_STATE);
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %id, snapshot_id, error = %error_chain(&e), "could not re-home the snapshot's memory into a shared RAM file; restores load the whole image");
                let _ = std::fs::remove_file(sdir.join(snapshots::RAM));
            }
        }
        let ram = meta.shared_ram.then(|| sdir.join(snapshots::RAM));
        if let Err(e) = self
            .run_from_state(&live, &state_file, ram.as_deref(), !meta.shared_ram, t0)
            .await
        {
            let _ = live.apply(Event::Crashed {
                reason: format!(
                    "it did not come back after snapshot {snapshot_id} was taken (the snapshot is intact): {e}"
                ),
            });
            remove_all_but_record(live.dir());
            return Err(e);
        }
        tracing::info!(sandbox_id = %id, snapshot_id, ms = t0.elapsed().as_millis() as u64, bytes = meta.state_bytes, "snapshot taken");
        Ok((
            meta.clone(),
            PauseTimings {
                saved,
                total: t0.elapsed(),
                state_bytes: meta.state_bytes,
            },
        ))
    }

    /// Loads a snapshot's full memory image into a stopped VM whose RAM is a new shared file in
    /// the snapshot dir, then snapshots that VM again: RAM stays in the file (`x-ignore-shared`),
    /// the state file keeps only devices. No guest code runs. Returns the new state's SHA-256.
    pub(crate) async fn share_memory(
        &self,
        template_key: &str,
        sdir: &Path,
    ) -> Result<String, NodeError> {
        let template = self.template_by_key(template_key)?;
        let run = sdir.join("load");
        crate::private::create_dir_all(&run)
            .map_err(|e| NodeError::Io(run.display().to_string(), e))?;
        let mut spec = alcove_image::build::spec_for(&template.recipe, &run, &template.kernel);
        spec.ram_file = sdir.join(snapshots::RAM);
        spec.ram_shared = true;
        spec.disk = Disk {
            path: sdir.join(snapshots::DISK),
            format: DiskFormat::Qcow2,
            read_only: true,
        };
        // The NIC needs its tap, though this VM never runs.
        let net = self.net.clone();
        let (ns, _) = tokio::task::spawn_blocking(move || net.create(false))
            .await
            .expect("netns task")
            .map_err(|e| NodeError::Network(e.to_string()))?;
        spec.netns = ns;
        let result = async {
            let vm = self
                .cfg
                .vmm
                .restore_stopped(&spec, &sdir.join(snapshots::MEMORY))
                .await?;
            let snap = vm.save(&sdir.join(snapshots::RAM_STATE), true).await;
            vm.kill().await;
            snap?;
            Ok::<_, NodeError>(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&run);
        result?;
        {
            use std::os::unix::fs::PermissionsExt;
            let ram = sdir.join(snapshots::RAM);
            std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o400))
                .map_err(|e| NodeError::Io(ram.display().to_string(), e))?;
        }
        Ok(crate::node::sha256_blocking(&sdir.join(snapshots::RAM_STATE)).await?)
    }

    /// Every snapshot on this node, deleted ones (whose layers are still needed) included.
    pub fn snapshots(&self) -> Vec<SnapshotMeta> {
        snapshots::all(&self.cfg.data_dir)
    }

    /// Deletes a snapshot: it cannot be restored any more and its memory image goes at once;
    /// its disk layer goes when no sandbox or kept snapshot sits on it.
    pub fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), NodeError> {
        if !valid_id(snapshot_id) {
            return Err(NodeError::SnapshotNotFound(snapshot_id.to_string()));
        }
        let dir = snapshots::snapshot_dir(&self.cfg.data_dir, snapshot_id);
        let mut meta = snapshots::read_meta(&dir)
            .filter(|m| !m.deleted)
            .ok_or_else(|| NodeError::SnapshotNotFound(snapshot_id.to_string()))?;
        meta.deleted = true;
        snapshots::write_meta(&dir, &meta)?;
        // Sandboxes running from the RAM file keep their mapping (the inode lives on until they
        // end); a paused one's image holds all of its RAM, so nothing needs these files now.
        for f in [snapshots::MEMORY, snapshots::RAM, snapshots::RAM_STATE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        tracing::info!(snapshot_id, "snapshot deleted");
        self.collect_snapshots();
        Ok(())
    }

    /// The data directory's snapshot store, for disk-usage reports.
    pub fn snapshots_dir(&self) -> PathBuf {
        snapshots::snapshots_root(&self.cfg.data_dir)
    }
}

/// Ends a paused (or pausing) sandbox's VM and lets go of everything that served it.
async fn end_vm_for_pause<V: Vmm>(live: &Live<V>, vm: &V::Vm) {
    vm.kill().await;
    live.stop_net();
    *live.agent.lock().await = None;
    *live.vm.lock().expect("vm lock") = None;
}

/// Records the sandbox paused (`sha`: of what its resume starts from) and removes the ended
/// VM's sockets and pid file.
fn record_paused<V: Vmm>(live: &Live<V>, sha: String, disk_only: bool) -> Result<(), NodeError> {
    live.apply(Event::Paused {
        state_sha256: sha,
        at_unix_ms: now_ms(),
        disk_only,
    })?;
    for sock in ["qmp.sock", "agent.sock", "console.sock", "qemu.pid"] {
        let _ = std::fs::remove_file(live.dir().join(sock));
    }
    Ok(())
}

/// Before its disk alone is kept, the guest saves its env vars to the disk (the agent takes
/// them back at the next boot) and runs `sync`, as root, within [`FLUSH_TIMEOUT`]. After `sync`
/// returns, the guest's writes are on the host: the virtio-blk flush makes QEMU write and sync
/// its qcow2 data and metadata. A non-zero exit is an error naming it.
async fn keep_env_and_sync<V: Vmm>(live: &Live<V>, vm: &V::Vm, id: &str) -> Result<(), NodeError> {
    let keep = alcove_guest_contract::PERSISTED_ENV_FILE;
    let script = format!(
        "mkdir -p \"$(dirname {keep})\" && if [ -f {run} ]; then cp {run} {keep}.tmp && chmod 600 {keep}.tmp && mv -f {keep}.tmp {keep}; else rm -f {keep}; fi; sync",
        run = alcove_guest_contract::SANDBOX_ENV_FILE,
    );
    let limit = FLUSH_TIMEOUT;
    let access_token = live.snapshot().access_token;
    let guard = live.agent.lock().await;
    let agent = guard.as_ref().ok_or_else(|| NodeError::NotRunning {
        id: id.to_string(),
        state: "without an agent connection".into(),
    })?;
    let out = crate::create::within_vm(vm, id, limit, async {
        Ok(agent
            .run(alcove_agent_client::RunRequest {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script],
                user: Some("root".into()),
                timeout: Some(limit),
                access_token,
                ..Default::default()
            })
            .await?)
    })
    .await?;
    if out.exit_code != 0 {
        return Err(NodeError::Io(
            "flushing the guest's disk".into(),
            std::io::Error::other(format!(
                "exit code {}: {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        ));
    }
    Ok(())
}

/// What a resume starts from must hash to what the pause recorded; else it is refused (and
/// left as it is).
pub(crate) async fn verify_checksum(
    id: &str,
    path: &Path,
    recorded: &str,
) -> Result<(), NodeError> {
    let got = crate::node::sha256_blocking(path)
        .await
        .map_err(|e| NodeError::CorruptSnapshot {
            id: id.to_string(),
            detail: format!("{} cannot be read ({e})", path.display()),
        })?;
    if got != recorded {
        return Err(NodeError::CorruptSnapshot {
            id: id.to_string(),
            detail: format!("{} has checksum {got}, recorded {recorded}", path.display()),
        });
    }
    Ok(())
}
