//! Making sandboxes: a create restores a template's snapshot (or a snapshot of a sandbox) into a
//! new dir, or claims a warm VM from the pool; either way the agent gets the sandbox's identity
//! through `/init` before the sandbox is listed. Also restores warm-pool VMs for `pool.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use alcove_agent_client::{AgentClient, InitRequest, Timeouts};
use alcove_image::Template;
use alcove_net::NetworkConfig;
use alcove_net::egress::SandboxCa;
use alcove_vmm::{Disk, DiskFormat, RestoreTimings, Vm, Vmm};
use base64::Engine;
use tokio::net::UnixStream;

use crate::host::EgressSockets;
use crate::lifecycle::Event;
use crate::live::Live;
use crate::node::{Node, error_chain, new_sandbox_id, now_ms, random_bytes, valid_id};
use crate::record::{Record, SandboxInfo};
use crate::snapshots::{self, SnapshotMeta};
use crate::{NodeError, SandboxState};

/// A sandbox's CPU weight on the host (cgroup `cpu.weight` scale; warm-pool VMs run lower).
pub(crate) const SANDBOX_CPU_WEIGHT: u32 = 100;

/// Bound on connecting to and initialising the agent of a freshly restored VM.
pub(crate) const AGENT_INIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub template: String,
    /// Chosen by the caller (the API server) or generated.
    pub id: Option<String>,
    pub envs: BTreeMap<String, String>,
    /// The envd access token the agent will require on every call.
    pub access_token: Option<String>,
    pub network: NetworkConfig,
    /// Restore this snapshot (see [`Node::snapshot`]) instead of the template's. `template` is
    /// then ignored; env vars add to the snapshot's.
    pub snapshot: Option<String>,
    /// Volumes to mount in the guest (checked by the caller: they exist and are its own).
    pub volume_mounts: Vec<alcove_volume::MountSpec>,
}

/// What a new sandbox is restored from.
pub(crate) struct Source {
    template: Arc<Template>,
    /// `None`: the template's own snapshot.
    snapshot: Option<SnapshotMeta>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CreateTimings {
    pub restore: RestoreTimings,
    /// Agent channel connected and HTTP/2 handshake done.
    pub agent_connected: Duration,
    /// `/init` answered: the sandbox is usable. Measured from the start of `create`.
    pub ready: Duration,
    /// Served from the warm pool: no restore happened while the caller waited (`restore` and
    /// `agent_connected` are zero).
    pub warm: bool,
}

impl<V: Vmm> Node<V> {
    /// Creates a sandbox from a template snapshot and returns once its agent is initialised.
    pub async fn create(
        self: &Arc<Self>,
        opts: CreateOptions,
    ) -> Result<(SandboxInfo, CreateTimings), NodeError> {
        let t0 = Instant::now();
        let id = opts.id.clone().unwrap_or_else(new_sandbox_id);
        let deadline = tokio::time::Instant::now() + self.cfg.admission_wait;
        let _slot = self.admit(&id, deadline).await?;
        let source = match &opts.snapshot {
            None => {
                let template = self.template(&opts.template)?;
                let t = template.clone();
                crate::node::blocking(move || t.verify_state()).await?;
                Source {
                    template,
                    snapshot: None,
                }
            }
            Some(snap) => {
                let meta = self.restorable_snapshot(snap).await?;
                let template = Arc::new(self.template_by_key(&meta.template_key)?);
                Source {
                    template,
                    snapshot: Some(meta),
                }
            }
        };
        if !valid_id(&id) {
            return Err(NodeError::Io(
                id,
                std::io::Error::other("invalid sandbox id"),
            ));
        }
        alcove_net::Rules::from_config(&opts.network)?;
        if source.snapshot.is_none() {
            loop {
                let (warm, stale) = self.pool.take(&source.template.name, &source.template.key);
                crate::pool::discard(stale);
                let Some(warm) = warm else { break };
                match self.claim(warm, &id, &source.template, &opts, t0).await {
                    Ok(r) => return Ok(r),
                    Err(e) => {
                        tracing::warn!(sandbox_id = %id, error = %error_chain(&e), "a warm VM could not be claimed; trying the next");
                    }
                }
            }
        }
        let _turn = self.starting_turn(deadline).await?;
        let dir = self.cfg.data_dir.join("sandboxes").join(&id);
        crate::private::create_dir(&dir)
            .map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
        let result = self.create_in(&id, &dir, &source, &opts, t0).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    /// A snapshot that can be restored now: recorded, not deleted, memory image intact.
    pub(crate) async fn restorable_snapshot(&self, snap: &str) -> Result<SnapshotMeta, NodeError> {
        if !valid_id(snap) {
            return Err(NodeError::SnapshotNotFound(snap.to_string()));
        }
        let dir = snapshots::snapshot_dir(&self.cfg.data_dir, snap);
        let meta = snapshots::read_meta(&dir)
            .filter(|m| !m.deleted)
            .ok_or_else(|| NodeError::SnapshotNotFound(snap.to_string()))?;
        // A filesystem-only snapshot's sandboxes start from its layer; the others from its image.
        match (&meta.disk_sha256, meta.disk_only) {
            (Some(sha), true) => {
                crate::persist::verify_checksum(snap, &dir.join(snapshots::DISK), sha).await?
            }
            _ => {
                crate::persist::verify_checksum(snap, &meta.state_file(&dir), &meta.state_sha256)
                    .await?
            }
        }
        Ok(meta)
    }

    /// Makes a warm VM the sandbox `id`: its identity through `/init`, its egress rules served.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        warm: crate::pool::WarmVm<V::Vm>,
        id: &str,
        template: &Template,
        opts: &CreateOptions,
        t0: Instant,
    ) -> Result<(SandboxInfo, CreateTimings), NodeError> {
        let crate::pool::WarmVm {
            dir,
            vm,
            agent,
            listeners,
            ..
        } = warm;
        if let Err(e) = vm.set_cpu_weight(SANDBOX_CPU_WEIGHT) {
            tracing::warn!(sandbox_id = %id, error = %e, "could not restore a claimed VM's CPU weight");
        }
        let mut info = self.new_info(id, template, None, opts);
        info.pid = vm.pid();
        let mut init_ms = 0;
        let claimed = async {
            let record = Record::create(&dir, info.clone())?;
            let t1 = Instant::now();
            let ca = egress_ca(&dir, id)?;
            within_vm(&vm, id, AGENT_INIT_TIMEOUT, async {
                agent
                    .init(&init_request(&info, true, Some(ca.cert_pem())), None)
                    .await?;
                self.attach_volumes(&info, &agent).await
            })
            .await?;
            init_ms = t1.elapsed().as_millis() as u64;
            let info = record.apply(Event::Ready)?;
            Ok::<_, NodeError>((record, info))
        }
        .await;
        let (record, info) = match claimed {
            Ok(x) => x,
            Err(e) => {
                vm.kill().await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let live = Live::new(record, Some(vm.clone()), Some(agent));
        self.adopt(live, vm, listeners)?;
        tracing::info!(sandbox_id = %id, template = %template.name, ms = t0.elapsed().as_millis() as u64, init_ms, "sandbox created from the warm pool");
        Ok((
            info,
            CreateTimings {
                ready: t0.elapsed(),
                warm: true,
                ..Default::default()
            },
        ))
    }

    /// Takes a just-started sandbox into the node: its egress served, listed, its VM watched.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        live: Arc<Live<V>>,
        vm: V::Vm,
        listeners: EgressSockets,
    ) -> Result<(), NodeError> {
        self.start_net(&live, listeners)?;
        let id = live.snapshot().id;
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .insert(id, live.clone());
        self.spawn_monitor(live, vm);
        Ok(())
    }

    /// The record of a new sandbox `id` about to be made from `template` (or a snapshot of it).
    pub(crate) fn new_info(
        &self,
        id: &str,
        template: &Template,
        snapshot: Option<&SnapshotMeta>,
        opts: &CreateOptions,
    ) -> SandboxInfo {
        // Only this create's own variables: a snapshot's live on in its guest memory (the agent
        // adds a later /init's variables to the ones it has), never on the host's disk.
        let envs = opts.envs.clone();
        SandboxInfo {
            id: id.to_string(),
            template: template.name.clone(),
            template_key: template.key.clone(),
            state: SandboxState::Creating,
            created_at_unix_ms: now_ms(),
            pid: 0,
            vcpus: template.recipe.vcpus,
            memory_mib: template.recipe.memory_mib,
            disk_mib: template.recipe.disk_mib,
            hostname: id.to_string(),
            envs,
            access_token: opts.access_token.clone(),
            base_snapshot: snapshot.map(|m| m.id.clone()),
            network: opts.network.clone(),
            pooled: false,
            pool_owner: None,
            volumes: opts.volume_mounts.clone(),
        }
    }

    /// Restores a warm-pool VM of `template` into `dir` and initialises its agent (clock and
    /// entropy only: it has no identity until claimed).
    pub(crate) async fn restore_pooled(
        &self,
        template: &Template,
        vm_id: &str,
        dir: &Path,
    ) -> Result<(V::Vm, AgentClient, EgressSockets), NodeError> {
        copy_template_disk(template, dir)?;
        let mut info = self.new_info(vm_id, template, None, &CreateOptions::default());
        info.pooled = true;
        info.pool_owner = Some(std::process::id());
        let record = Record::create(dir, info)?;
        let mut spec = sandbox_spec(template, dir);
        // Warming up yields the host's cores to sandboxes in use (a claim restores the weight).
        if let Some(l) = spec.limits.as_mut() {
            l.cpu_weight = crate::pool::WARM_CPU_WEIGHT;
        }
        let listeners = self.new_netns(&mut spec).await?;
        let (vm, _) = self.cfg.vmm.restore(&spec, &template.state).await?;
        drop(spec);
        let info = record.apply(Event::VmStarted { pid: vm.pid() })?;
        // The same request a claim makes, with the VM's own id and no token or env: the claim's
        // `/init` then runs code the VM has already run (under TCG: already translated).
        let mut init = init_request(&info, true, None);
        init.access_token = None;
        let agent = within_vm(&vm, vm_id, AGENT_INIT_TIMEOUT, async {
            let agent = connect_agent(&vm).await?;
            agent.init(&init, None).await?;
            Ok(agent)
        })
        .await;
        match agent {
            Ok(agent) => Ok((vm, agent, listeners)),
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }

    pub(crate) async fn create_in(
        self: &Arc<Self>,
        id: &str,
        dir: &Path,
        source: &Source,
        opts: &CreateOptions,
        t0: Instant,
    ) -> Result<(SandboxInfo, CreateTimings), NodeError> {
        let template = &source.template;
        match &source.snapshot {
            None => copy_template_disk(template, dir)?,
            Some(meta) => {
                let layer =
                    snapshots::snapshot_dir(&self.cfg.data_dir, &meta.id).join(snapshots::DISK);
                make_overlay(&layer, &dir.join("disk.qcow2")).await?;
            }
        }
        let record = Record::create(
            dir,
            self.new_info(id, template, source.snapshot.as_ref(), opts),
        )?;

        let (vm, listeners, restore, guest_token) = match &source.snapshot {
            // A filesystem-only snapshot: a cold boot from its layer; the guest has no token yet.
            Some(meta) if meta.disk_only => {
                let (vm, listeners) = self.boot_vm(template, dir, id).await?;
                (vm, listeners, RestoreTimings::default(), None)
            }
            _ => {
                let mut spec = sandbox_spec(template, dir);
                let (state_file, guest_token) = match &source.snapshot {
                    None => (template.state.clone(), None),
                    Some(meta) => {
                        let sdir = snapshots::snapshot_dir(&self.cfg.data_dir, &meta.id);
                        if meta.shared_ram {
                            spec.ram_file = sdir.join(snapshots::RAM);
                        }
                        (meta.state_file(&sdir), meta.access_token.clone())
                    }
                };
                let listeners = self.new_netns(&mut spec).await?;
                let full_image = source.snapshot.as_ref().is_some_and(|m| !m.shared_ram);
                let (vm, restore) = if full_image {
                    self.cfg.vmm.restore_full(&spec, &state_file).await?
                } else {
                    self.cfg.vmm.restore(&spec, &state_file).await?
                };
                (vm, listeners, restore, guest_token)
            }
        };
        // Recorded before anything else can fail, so a crash of this process cannot leak the VM.
        let info = match record.apply(Event::VmStarted { pid: vm.pid() }) {
            Ok(info) => info,
            Err(e) => {
                vm.kill().await;
                return Err(e);
            }
        };
        let (agent, connected) =
            match connect_and_init(&vm, &info, true, guest_token.as_deref(), t0, Some(dir)).await {
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
        let info = match record.apply(Event::Ready) {
            Ok(info) => info,
            Err(e) => {
                vm.kill().await;
                return Err(e);
            }
        };
        let live = Live::new(record, Some(vm.clone()), Some(agent));
        self.adopt(live, vm, listeners)?;
        tracing::info!(sandbox_id = %id, template = %template.name, ms = t0.elapsed().as_millis() as u64, "sandbox created");
        Ok((
            info,
            CreateTimings {
                restore,
                agent_connected: connected,
                ready: t0.elapsed(),
                warm: false,
            },
        ))
    }
}

/// Runs `qemu-img` with `args`; a failure is reported on `subject` (the image it makes or
/// changes) with the tool's own words.
pub(crate) async fn qemu_img<'a>(
    subject: &Path,
    args: impl IntoIterator<Item = &'a std::ffi::OsStr>,
) -> Result<(), NodeError> {
    let args: Vec<&std::ffi::OsStr> = args.into_iter().collect();
    let out = tokio::process::Command::new("qemu-img")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| NodeError::Io("qemu-img".into(), e))?;
    if !out.status.success() {
        let op = args
            .first()
            .map(|a| a.to_string_lossy())
            .unwrap_or_default();
        return Err(NodeError::Io(
            subject.display().to_string(),
            std::io::Error::other(format!(
                "qemu-img {op} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        ));
    }
    Ok(())
}

/// A new qcow2 overlay at `out` over the read-only layer `backing`.
pub(crate) async fn make_overlay(backing: &Path, out: &Path) -> Result<(), NodeError> {
    // qemu-img resolves a relative backing name against the overlay's directory: record an
    // absolute one, so the chain does not depend on where the data dir was named from.
    let backing = std::path::absolute(backing)
        .map_err(|e| NodeError::Io(backing.display().to_string(), e))?;
    let flags = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"].map(std::ffi::OsStr::new);
    qemu_img(
        out,
        flags
            .into_iter()
            .chain([backing.as_os_str(), out.as_os_str()]),
    )
    .await?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::Io(out.display().to_string(), e))
}

/// The machine of a sandbox made from `template`, with its files in `dir`.
pub(crate) fn sandbox_spec(template: &Template, dir: &Path) -> alcove_vmm::VmSpec {
    let mut spec = alcove_image::build::spec_for(&template.recipe, dir, &template.kernel);
    spec.ram_file = template.mem.clone();
    spec.ram_shared = false;
    spec.disk = Disk {
        path: dir.join("disk.qcow2"),
        format: DiskFormat::Qcow2,
        read_only: false,
    };
    spec.limits = Some(alcove_vmm::cgroup::Limits {
        cpus: f64::from(template.recipe.vcpus),
        // Guest RAM plus QEMU itself and its translated-code cache (128 MiB under TCG).
        memory_bytes: (u64::from(template.recipe.memory_mib) + 384) << 20,
        max_tasks: 256,
        cpu_weight: SANDBOX_CPU_WEIGHT,
    });
    spec
}

pub(crate) async fn connect_agent(vm: &impl Vm) -> Result<AgentClient, NodeError> {
    let stream = UnixStream::connect(vm.agent_socket())
        .await
        .map_err(|e| NodeError::Io(vm.agent_socket().display().to_string(), e))?;
    Ok(AgentClient::connect_channel(stream, Timeouts::default()).await?)
}

/// The `/init` that gives a just-restored VM its sandbox's identity. `fresh` is true for a new
/// sandbox (new hostname, env, sandbox id); a resumed one gets its clock set, entropy and its
/// access token again (never its env values: the host does not keep them, the guest does).
pub(crate) fn init_request(info: &SandboxInfo, fresh: bool, ca_pem: Option<&str>) -> InitRequest {
    InitRequest {
        egress_ca: ca_pem.filter(|_| fresh).map(str::to_string),
        timestamp: Some(humantime::format_rfc3339_nanos(SystemTime::now()).to_string()),
        entropy: Some(base64::engine::general_purpose::STANDARD.encode(random_bytes::<64>())),
        env_vars: fresh.then(|| info.envs.clone().into_iter().collect()),
        // Every /init, resumes and restarts included: the agent treats an absent token as
        // "no token", so leaving it out would open a resumed sandbox's envd to anyone.
        access_token: info.access_token.clone(),
        hostname: fresh.then(|| info.id.clone()),
        sandbox_id: fresh.then(|| info.id.clone()),
        ..Default::default()
    }
}

/// Runs `work` against a VM, bounded by `limit`, and fails at once if the VM exits meanwhile.
pub(crate) async fn within_vm<T>(
    vm: &impl Vm,
    id: &str,
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, NodeError>>,
) -> Result<T, NodeError> {
    tokio::select! {
        r = tokio::time::timeout(limit, work) => r.unwrap_or(Err(NodeError::AgentTimeout(limit))),
        reason = vm.wait_exit() => Err(NodeError::NotRunning {
            id: id.to_string(),
            state: format!("the VM exited while starting: {reason}; console: {}", vm.console().tail(6)),
        }),
    }
}

/// Connects to a just-restored VM's agent and hands it the sandbox's identity (see
/// [`init_request`]). `guest_token` is the access token the guest already has (a resumed
/// sandbox's own, or the snapshot's for a sandbox made from one): changing anything takes it.
pub(crate) async fn connect_and_init(
    vm: &impl Vm,
    info: &SandboxInfo,
    fresh: bool,
    guest_token: Option<&str>,
    t0: Instant,
    dir: Option<&Path>,
) -> Result<(AgentClient, Duration), NodeError> {
    // A sandbox that starts anew (fresh) learns its egress CA; a resumed one has it already.
    let ca = match dir.filter(|_| fresh) {
        Some(d) => Some(egress_ca(d, &info.id)?),
        None => None,
    };
    let init = init_request(info, fresh, ca.as_ref().map(|c| c.cert_pem()));
    within_vm(vm, &info.id, AGENT_INIT_TIMEOUT, async {
        let agent = connect_agent(vm).await?;
        let connected = t0.elapsed();
        agent.init(&init, guest_token).await?;
        Ok((agent, connected))
    })
    .await
}

/// The sandbox's egress CA (`alcove_net`'s interception of hosts with network rules), kept
/// owner-only in its directory: made at its first start, read back at every later one (resume,
/// re-attach), so the certificate the guest trusts stays the one the proxy signs with.
pub(crate) fn egress_ca(dir: &Path, id: &str) -> Result<Arc<SandboxCa>, NodeError> {
    let (crt, key) = (dir.join(EGRESS_CA_CERT), dir.join(EGRESS_CA_KEY));
    let io = |p: &Path, e| NodeError::Io(p.display().to_string(), e);
    if let (Ok(c), Ok(k)) = (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        let k = zeroize::Zeroizing::new(k);
        return SandboxCa::from_pem(id, &c, &k)
            .map(Arc::new)
            .map_err(|e| NodeError::Network(e.to_string()));
    }
    let ca = SandboxCa::generate(id).map_err(|e| NodeError::Network(e.to_string()))?;
    crate::private::write_file(&key, ca.key_pem().as_bytes()).map_err(|e| io(&key, e))?;
    crate::private::write_file(&crt, ca.cert_pem().as_bytes()).map_err(|e| io(&crt, e))?;
    Ok(Arc::new(ca))
}

/// The files of [`egress_ca`] in a sandbox's directory.
pub(crate) const EGRESS_CA_CERT: &str = "egress-ca.crt";
pub(crate) const EGRESS_CA_KEY: &str = "egress-ca.key";

/// A sandbox's own disk: a copy of the template's empty qcow2 overlay, private to root.
pub(crate) fn copy_template_disk(template: &Template, dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let disk = dir.join("disk.qcow2");
    std::fs::copy(&template.overlay, &disk)
        .map_err(|e| NodeError::Io(disk.display().to_string(), e))?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::Io(disk.display().to_string(), e))
}
