use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alcove_agent_client::{AgentClient, InitRequest, RunOutput, RunRequest, Timeouts};
use alcove_image::Template;
use alcove_vmm::{Disk, DiskFormat, QemuVm, QemuVmm, RestoreTimings, Vm, Vmm};
use base64::Engine;
use tokio::net::UnixStream;

use crate::lifecycle::Event;
use crate::record::{self, Record, SandboxInfo, remove_all_but_record};
use crate::snapshots::{self, SnapshotMeta};
use crate::{NodeError, SandboxState};
use alcove_net::{EgressConfig, NetStats, Netns, NetworkConfig, SandboxNet};

/// A sandbox's CPU weight on the host (cgroup `cpu.weight` scale; warm-pool VMs run lower).
const SANDBOX_CPU_WEIGHT: u32 = 100;

/// Bound on connecting to and initialising the agent of a freshly restored VM.
const AGENT_INIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Sandbox records, overlays and sockets.
    pub data_dir: PathBuf,
    /// Built templates (see `alcove-image`).
    pub cache_dir: PathBuf,
    pub vmm: QemuVmm,
    pub max_sandboxes: usize,
    /// Egress policy settings shared by every sandbox's network.
    pub egress: Arc<EgressConfig>,
}

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
}

/// What a new sandbox is restored from.
struct Source {
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

struct Live {
    /// The sandbox's record; changed only through [`Live::apply`].
    record: Record,
    /// The running VM; `None` while paused or dead.
    vm: Mutex<Option<QemuVm>>,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
    /// Set while this process stops the VM on purpose (kill, pause), so the exit monitor does not
    /// report the exit as a death.
    stopping: AtomicBool,
    /// Serialises lifecycle operations (pause, resume, kill) on one sandbox.
    op: tokio::sync::Mutex<()>,
    /// The egress proxy and resolver of the running VM's namespace.
    net: Mutex<Option<Arc<SandboxNet>>>,
}

impl Live {
    fn snapshot(&self) -> SandboxInfo {
        self.record.info()
    }

    fn vm(&self) -> Option<QemuVm> {
        self.vm.lock().expect("vm lock").clone()
    }

    fn new(record: Record, vm: Option<QemuVm>, agent: Option<AgentClient>) -> Arc<Live> {
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
    fn running_vm(&self, id: &str) -> Result<(SandboxInfo, QemuVm), NodeError> {
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
    fn stop_net(&self) {
        if let Some(n) = self.net.lock().expect("net lock").take() {
            n.stop();
        }
    }

    fn dir(&self) -> &Path {
        self.record.dir()
    }

    /// The one way a sandbox's state and record change (see `lifecycle.rs`).
    fn apply(&self, event: Event) -> Result<SandboxInfo, NodeError> {
        self.record.apply(event)
    }
}

pub struct Node {
    cfg: NodeConfig,
    sandboxes: Mutex<HashMap<String, Arc<Live>>>,
    templates: Mutex<HashMap<String, Arc<Template>>>,
    monitors: Mutex<Vec<tokio::task::AbortHandle>>,
    pub(crate) pool: crate::pool::Pool,
}

impl Drop for Node {
    /// Lets go of every sandbox without stopping it: monitors end and agent connections close, so
    /// another `Node` (a restarted server, the CLI) can take the sandboxes over. Warm-pool VMs are
    /// not sandboxes: they are killed.
    fn drop(&mut self) {
        self.pool.stop_filling();
        self.pool.kill_now();
        for m in self.monitors.lock().expect("monitors lock").drain(..) {
            m.abort();
        }
        for live in self.sandboxes.lock().expect("sandboxes lock").values() {
            live.stop_net();
        }
        self.sandboxes.lock().expect("sandboxes lock").clear();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom is readable");
    buf
}

/// A 20-character lowercase alphanumeric id, the shape E2B's sandbox ids have.
pub fn new_sandbox_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    random_bytes::<20>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Node {
    /// Opens the node's data dir and picks up the sandboxes recorded there: running VMs are
    /// re-attached, VMs that disappeared meanwhile are marked dead with the reason.
    pub async fn open(cfg: NodeConfig) -> Result<Arc<Node>, NodeError> {
        let root = cfg.data_dir.join("sandboxes");
        std::fs::create_dir_all(&root).map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        let node = Arc::new(Node {
            cfg,
            sandboxes: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            monitors: Mutex::new(Vec::new()),
            pool: Default::default(),
        });
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
            if info.state.is_live() {
                let attached = node.cfg.vmm.attach(&dir).await.ok();
                match attached {
                    Some(v) if v.exit_reason().is_none() => vm = Some(v),
                    _ => {}
                }
            }
            let live = Live::new(Record::loaded(&dir, info.clone()), vm.clone(), None);
            if info.state.is_live() {
                match vm {
                    Some(vm) => {
                        let pid = vm.pid();
                        let listeners = tokio::task::spawn_blocking(move || {
                            Netns::of_pid(pid).and_then(|ns| ns.listen())
                        })
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
                        let reason = format!(
                            "the VM process (pid {}) is gone: it was stopped outside Alcove or crashed while no Alcove process was watching{}",
                            info.pid,
                            qemu_log_tail(&dir)
                        );
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

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub(crate) fn template(&self, name: &str) -> Result<Arc<Template>, NodeError> {
        if let Some(t) = self.templates.lock().expect("templates lock").get(name) {
            return Ok(t.clone());
        }
        let t = Arc::new(alcove_image::load_template(&self.cfg.cache_dir, name)?);
        self.templates
            .lock()
            .expect("templates lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn spawn_monitor(self: &Arc<Self>, live: Arc<Live>, vm: QemuVm) {
        let handle = tokio::spawn(async move {
            let reason = vm.wait_exit().await;
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
            if let Err(e) = live.apply(Event::Crashed { reason: text }) {
                tracing::warn!(sandbox_id = %id, error = %error_chain(&e), "could not record the VM's exit");
            }
            live.stop_net();
            remove_all_but_record(live.dir());
        });
        let mut monitors = self.monitors.lock().expect("monitors lock");
        monitors.retain(|h| !h.is_finished());
        monitors.push(handle.abort_handle());
    }

    /// Creates a sandbox from a template snapshot and returns once its agent is initialised.
    pub async fn create(
        self: &Arc<Self>,
        opts: CreateOptions,
    ) -> Result<(SandboxInfo, CreateTimings), NodeError> {
        let t0 = Instant::now();
        let live_count = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .filter(|l| l.snapshot().state.is_live())
            .count();
        if live_count >= self.cfg.max_sandboxes {
            return Err(NodeError::Capacity(live_count));
        }
        let source = match &opts.snapshot {
            None => {
                let template = self.template(&opts.template)?;
                template.verify_state()?;
                Source {
                    template,
                    snapshot: None,
                }
            }
            Some(snap) => {
                let meta = self.restorable_snapshot(snap)?;
                let template = Arc::new(alcove_image::build::load_template_key(
                    &self.cfg.cache_dir,
                    &meta.template_key,
                )?);
                Source {
                    template,
                    snapshot: Some(meta),
                }
            }
        };
        let id = opts.id.clone().unwrap_or_else(new_sandbox_id);
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
        let dir = self.cfg.data_dir.join("sandboxes").join(&id);
        std::fs::create_dir(&dir).map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
        let result = self.create_in(&id, &dir, &source, &opts, t0).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    /// A snapshot that can be restored now: recorded, not deleted, memory image intact.
    fn restorable_snapshot(&self, snap: &str) -> Result<SnapshotMeta, NodeError> {
        if !valid_id(snap) {
            return Err(NodeError::SnapshotNotFound(snap.to_string()));
        }
        let dir = snapshots::snapshot_dir(&self.cfg.data_dir, snap);
        let meta = snapshots::read_meta(&dir)
            .filter(|m| !m.deleted)
            .ok_or_else(|| NodeError::SnapshotNotFound(snap.to_string()))?;
        let state = meta.state_file(&dir);
        let got =
            alcove_image::build::sha256_file(&state).map_err(|e| NodeError::CorruptSnapshot {
                id: snap.to_string(),
                detail: format!("{} cannot be read ({e})", state.display()),
            })?;
        if got != meta.state_sha256 {
            return Err(NodeError::CorruptSnapshot {
                id: snap.to_string(),
                detail: format!(
                    "{} has checksum {got}, recorded {}",
                    state.display(),
                    meta.state_sha256
                ),
            });
        }
        Ok(meta)
    }

    /// Makes a warm VM the sandbox `id`: its identity through `/init`, its egress rules served.
    async fn claim(
        self: &Arc<Self>,
        warm: crate::pool::WarmVm,
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
            within_vm(&vm, id, AGENT_INIT_TIMEOUT, async {
                Ok(agent.init(&init_request(&info, true), None).await?)
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
    fn adopt(
        self: &Arc<Self>,
        live: Arc<Live>,
        vm: QemuVm,
        listeners: alcove_net::Listeners,
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
    fn new_info(
        &self,
        id: &str,
        template: &Template,
        snapshot: Option<&SnapshotMeta>,
        opts: &CreateOptions,
    ) -> SandboxInfo {
        let mut envs = snapshot.map(|m| m.envs.clone()).unwrap_or_default();
        envs.extend(opts.envs.clone());
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
        }
    }

    /// Restores a warm-pool VM of `template` into `dir` and initialises its agent (clock and
    /// entropy only: it has no identity until claimed).
    pub(crate) async fn restore_pooled(
        &self,
        template: &Template,
        vm_id: &str,
        dir: &Path,
    ) -> Result<(QemuVm, AgentClient, alcove_net::Listeners), NodeError> {
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
        let mut init = init_request(&info, true);
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

    async fn create_in(
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
        drop(spec);
        // Recorded before anything else can fail, so a crash of this process cannot leak the VM.
        let info = match record.apply(Event::VmStarted { pid: vm.pid() }) {
            Ok(info) => info,
            Err(e) => {
                vm.kill().await;
                return Err(e);
            }
        };
        let (agent, connected) =
            match connect_and_init(&vm, &info, true, guest_token.as_deref(), t0).await {
                Ok(x) => x,
                Err(e) => {
                    vm.kill().await;
                    return Err(e);
                }
            };
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

    fn live(&self, id: &str) -> Result<Arc<Live>, NodeError> {
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .get(id)
            .cloned()
            .ok_or_else(|| NodeError::NotFound(id.to_string()))
    }

    pub fn get(&self, id: &str) -> Result<SandboxInfo, NodeError> {
        Ok(self.live(id)?.snapshot())
    }

    pub fn list(&self) -> Vec<SandboxInfo> {
        let mut v: Vec<SandboxInfo> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .map(|l| l.snapshot())
            .collect();
        v.sort_by_key(|i| i.created_at_unix_ms);
        v
    }

    /// The agent client of a running sandbox, connecting if this process has not yet.
    pub async fn agent(&self, id: &str) -> Result<AgentClient, NodeError> {
        let live = self.live(id)?;
        let info = live.snapshot();
        if info.state != SandboxState::Running {
            return Err(NodeError::NotRunning {
                id: id.to_string(),
                state: info.state.to_string(),
            });
        }
        let mut slot = live.agent.lock().await;
        if let Some(a) = slot.as_ref().filter(|a| !a.is_closed()) {
            return Ok(a.clone());
        }
        let vm = live.vm().ok_or_else(|| NodeError::NotRunning {
            id: id.to_string(),
            state: "no VM".into(),
        })?;
        let agent = tokio::time::timeout(AGENT_INIT_TIMEOUT, connect_agent(&vm))
            .await
            .map_err(|_| NodeError::AgentTimeout(AGENT_INIT_TIMEOUT))??;
        *slot = Some(agent.clone());
        Ok(agent)
    }

    /// Runs a command to completion in a sandbox.
    pub async fn run(&self, id: &str, mut req: RunRequest) -> Result<RunOutput, NodeError> {
        let agent = self.agent(id).await?;
        if req.access_token.is_none() {
            req.access_token = self.live(id)?.snapshot().access_token;
        }
        Ok(agent.run(req).await?)
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
        // Its overlay may have been the last thing on a deleted snapshot's layer.
        self.collect_snapshots();
        Ok(())
    }

    /// A fresh network namespace for a VM about to start from `spec`, with the egress sockets in it.
    async fn new_netns(
        &self,
        spec: &mut alcove_vmm::VmSpec,
    ) -> Result<alcove_net::Listeners, NodeError> {
        let (ns, listeners) = tokio::task::spawn_blocking(|| Netns::create(true))
            .await
            .expect("netns task")
            .map_err(|e| NodeError::Network(e.to_string()))?;
        spec.netns = Some(Arc::new(ns));
        Ok(listeners.expect("asked for listeners"))
    }

    fn start_net(&self, live: &Live, listeners: alcove_net::Listeners) -> Result<(), NodeError> {
        let info = live.snapshot();
        let net = SandboxNet::start(self.cfg.egress.clone(), &info.id, info.network, listeners)
            .map_err(|e| NodeError::Network(e.to_string()))?;
        if let Some(old) = live.net.lock().expect("net lock").replace(net) {
            old.stop();
        }
        Ok(())
    }

    /// Replaces a sandbox's egress rules: open connections they refuse are closed, new ones follow
    /// them. Kept in the record, so a resumed or re-attached sandbox keeps them.
    pub fn set_network(&self, id: &str, network: NetworkConfig) -> Result<(), NodeError> {
        let live = self.live(id)?;
        alcove_net::Rules::from_config(&network)?;
        if let Some(n) = live.net.lock().expect("net lock").as_ref() {
            n.update(network.clone())?;
        }
        live.apply(Event::NetworkSet { network })?;
        Ok(())
    }

    /// A sandbox's egress rules and, while it runs, its network counters.
    pub fn network(&self, id: &str) -> Result<(NetworkConfig, Option<NetStats>), NodeError> {
        let live = self.live(id)?;
        let stats = live
            .net
            .lock()
            .expect("net lock")
            .as_ref()
            .map(|n| n.stats());
        Ok((live.snapshot().network, stats))
    }

    /// The QEMU process of a live sandbox (for tests and metrics).
    pub fn vm(&self, id: &str) -> Result<QemuVm, NodeError> {
        self.live(id)?.vm().ok_or_else(|| NodeError::NotRunning {
            id: id.to_string(),
            state: "no VM".into(),
        })
    }

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
            return Err(e.into());
        }
        let saved = t0.elapsed();
        vm.kill().await;
        live.stop_net();
        *live.agent.lock().await = None;
        *live.vm.lock().expect("vm lock") = None;
        let sha = alcove_image::build::sha256_file(&tmp)?;
        std::fs::rename(&tmp, &state_file)
            .map_err(|e| NodeError::Io(state_file.display().to_string(), e))?;
        let size = std::fs::metadata(&state_file).map(|m| m.len()).unwrap_or(0);
        live.apply(Event::Paused {
            state_sha256: sha,
            at_unix_ms: now_ms(),
        })?;
        for sock in ["qmp.sock", "agent.sock", "console.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(live.dir().join(sock));
        }
        tracing::info!(sandbox_id = %id, ms = t0.elapsed().as_millis() as u64, bytes = size, "sandbox paused");
        Ok(PauseTimings {
            saved,
            total: t0.elapsed(),
            state_bytes: size,
        })
    }

    /// Resumes a paused sandbox: verifies the snapshot's checksum, restores the VM and sets the
    /// guest clock. A failed resume leaves the sandbox paused and its snapshot untouched.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<Duration, NodeError> {
        let live = self.live(id)?;
        let _op = live.op.lock().await;
        let t0 = Instant::now();
        let info = live.snapshot();
        let SandboxState::Paused { state_sha256, .. } = &info.state else {
            return Err(NodeError::NotPaused {
                id: id.to_string(),
                state: info.state.to_string(),
            });
        };
        let state_file = live.dir().join(PAUSED_STATE);
        let got = alcove_image::build::sha256_file(&state_file).map_err(|e| {
            NodeError::CorruptSnapshot {
                id: id.to_string(),
                detail: format!("{} cannot be read ({e})", state_file.display()),
            }
        })?;
        if &got != state_sha256 {
            return Err(NodeError::CorruptSnapshot {
                id: id.to_string(),
                detail: format!(
                    "{} has checksum {got}, recorded {state_sha256}",
                    state_file.display()
                ),
            });
        }
        self.run_from_state(&live, &state_file, None, false, t0)
            .await?;
        let _ = std::fs::remove_file(&state_file);
        tracing::info!(sandbox_id = %id, ms = t0.elapsed().as_millis() as u64, "sandbox resumed");
        Ok(t0.elapsed())
    }

    /// Starts a sandbox's VM again from a memory image of itself (a resume, or the restart that
    /// ends a snapshot): same identity, only its clock is set and entropy added.
    async fn run_from_state(
        self: &Arc<Self>,
        live: &Arc<Live>,
        state_file: &Path,
        ram_file: Option<&Path>,
        full_image: bool,
        t0: Instant,
    ) -> Result<(), NodeError> {
        let info = live.snapshot();
        let template =
            alcove_image::build::load_template_key(&self.cfg.cache_dir, &info.template_key)?;
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
        let token = info.access_token.clone();
        let (agent, _) = match connect_and_init(&vm, &info, false, token.as_deref(), t0).await {
            Ok(x) => x,
            Err(e) => {
                vm.kill().await;
                return Err(e);
            }
        };
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
        let root = snapshots::snapshots_root(&self.cfg.data_dir);
        std::fs::create_dir_all(&root).map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        let sdir = snapshots::snapshot_dir(&self.cfg.data_dir, snapshot_id);
        std::fs::create_dir(&sdir).map_err(|e| NodeError::Io(sdir.display().to_string(), e))?;
        let tmp = sdir.join("memory.state.tmp");
        live.stopping.store(true, Ordering::SeqCst);
        // Every page, in the stream format without `x-ignore-shared`: what a VM whose RAM is a
        // shared file can load (see `share_memory`).
        if let Err(e) = vm.save(&tmp, false).await {
            let _ = std::fs::remove_dir_all(&sdir);
            let _ = vm.resume().await;
            live.stopping.store(false, Ordering::SeqCst);
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
            let sha = alcove_image::build::sha256_file(&tmp)?;
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
                envs: info.envs.clone(),
                created_at_unix_ms: now_ms(),
                deleted: false,
                shared_ram: false,
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
    async fn share_memory(&self, template_key: &str, sdir: &Path) -> Result<String, NodeError> {
        let template = alcove_image::build::load_template_key(&self.cfg.cache_dir, template_key)?;
        let run = sdir.join("load");
        std::fs::create_dir_all(&run).map_err(|e| NodeError::Io(run.display().to_string(), e))?;
        let mut spec = alcove_image::build::spec_for(&template.recipe, &run, &template.kernel);
        spec.ram_file = sdir.join(snapshots::RAM);
        spec.ram_shared = true;
        spec.disk = Disk {
            path: sdir.join(snapshots::DISK),
            format: DiskFormat::Qcow2,
            read_only: true,
        };
        // The NIC needs its tap, though this VM never runs.
        let (ns, _) = tokio::task::spawn_blocking(|| Netns::create(false))
            .await
            .expect("netns task")
            .map_err(|e| NodeError::Network(e.to_string()))?;
        spec.netns = Some(Arc::new(ns));
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
        Ok(alcove_image::build::sha256_file(
            &sdir.join(snapshots::RAM_STATE),
        )?)
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

    /// The data directory's snapshot store, for disk-usage reports.
    pub fn snapshots_dir(&self) -> PathBuf {
        snapshots::snapshots_root(&self.cfg.data_dir)
    }
}

/// A new qcow2 overlay at `out` over the read-only layer `backing`.
async fn make_overlay(backing: &Path, out: &Path) -> Result<(), NodeError> {
    // qemu-img resolves a relative backing name against the overlay's directory: record an
    // absolute one, so the chain does not depend on where the data dir was named from.
    let backing = std::path::absolute(backing)
        .map_err(|e| NodeError::Io(backing.display().to_string(), e))?;
    let status = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&backing)
        .arg(out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .map_err(|e| NodeError::Io("qemu-img".into(), e))?;
    if !status.status.success() {
        return Err(NodeError::Io(
            out.display().to_string(),
            std::io::Error::other(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            )),
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::Io(out.display().to_string(), e))
}

/// Where a paused sandbox's memory and device state live, inside its dir.
const PAUSED_STATE: &str = "paused.state";

#[derive(Debug, Clone, Copy)]
pub struct PauseTimings {
    /// Until the state file was complete (the VM was stopped at the start of it).
    pub saved: Duration,
    pub total: Duration,
    pub state_bytes: u64,
}

/// The machine of a sandbox made from `template`, with its files in `dir`.
fn sandbox_spec(template: &Template, dir: &Path) -> alcove_vmm::VmSpec {
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

async fn connect_agent(vm: &QemuVm) -> Result<AgentClient, NodeError> {
    let stream = UnixStream::connect(vm.agent_socket())
        .await
        .map_err(|e| NodeError::Io(vm.agent_socket().display().to_string(), e))?;
    Ok(AgentClient::connect_channel(stream, Timeouts::default()).await?)
}

/// The `/init` that gives a just-restored VM its sandbox's identity. `fresh` is true for a new
/// sandbox (new hostname, token, env, entropy); a resumed one only gets its clock set and entropy.
fn init_request(info: &SandboxInfo, fresh: bool) -> InitRequest {
    InitRequest {
        timestamp: Some(humantime::format_rfc3339_nanos(SystemTime::now()).to_string()),
        entropy: Some(base64::engine::general_purpose::STANDARD.encode(random_bytes::<64>())),
        env_vars: fresh.then(|| info.envs.clone().into_iter().collect()),
        access_token: if fresh {
            info.access_token.clone()
        } else {
            None
        },
        hostname: fresh.then(|| info.id.clone()),
        sandbox_id: fresh.then(|| info.id.clone()),
        ..Default::default()
    }
}

/// Runs `work` against a VM, bounded by `limit`, and fails at once if the VM exits meanwhile.
pub(crate) async fn within_vm<T>(
    vm: &QemuVm,
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
async fn connect_and_init(
    vm: &QemuVm,
    info: &SandboxInfo,
    fresh: bool,
    guest_token: Option<&str>,
    t0: Instant,
) -> Result<(AgentClient, Duration), NodeError> {
    within_vm(vm, &info.id, AGENT_INIT_TIMEOUT, async {
        let agent = connect_agent(vm).await?;
        let connected = t0.elapsed();
        agent.init(&init_request(info, fresh), guest_token).await?;
        Ok((agent, connected))
    })
    .await
}

/// Whether `pid` is an Alcove process other than this one (a warm VM's owner).
fn other_alcove_process_alive(pid: u32) -> bool {
    pid != std::process::id()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("alcove"))
}

/// A sandbox's own disk: a copy of the template's empty qcow2 overlay, private to root.
fn copy_template_disk(template: &Template, dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let disk = dir.join("disk.qcow2");
    std::fs::copy(&template.overlay, &disk)
        .map_err(|e| NodeError::Io(disk.display().to_string(), e))?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::Io(disk.display().to_string(), e))
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn qemu_log_tail(dir: &Path) -> String {
    match std::fs::read_to_string(dir.join("qemu.log")) {
        Ok(s) if !s.trim().is_empty() => {
            let lines: Vec<&str> = s.lines().collect();
            format!(
                "; qemu said: {}",
                lines[lines.len().saturating_sub(3)..].join(" | ")
            )
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_e2b_ids() {
        let a = new_sandbox_id();
        let b = new_sandbox_id();
        assert_eq!(a.len(), 20);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(a, b);
        assert!(valid_id(&a));
        assert!(!valid_id("../etc"));
    }
}
