//! The node: the sandboxes of one host, by id, and the queries on them (records, agent
//! connections, networks). The lifecycle operations live beside it, one concern per file:
//! `create.rs` (create, restore, warm-pool claims), `persist.rs` (pause, resume, snapshots),
//! `reattach.rs` (opening a data dir, watching VMs), `cleanup.rs` (kill, collection); `live.rs`
//! holds the per-sandbox state and `record.rs` its one writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use alcove_agent_client::{AgentClient, RunOutput, RunRequest};
use alcove_image::Template;
use alcove_net::{EgressConfig, NetStats, NetworkConfig};
use alcove_vmm::{QemuVmm, Vmm};

use crate::create::{AGENT_INIT_TIMEOUT, connect_agent};
use crate::host::{EgressSockets, HostNetwork};
use crate::lifecycle::Event;
use crate::live::Live;
use crate::record::SandboxInfo;
use crate::{NodeError, SandboxState};

#[derive(Debug, Clone)]
pub struct NodeConfig<V = QemuVmm> {
    /// Sandbox records, overlays and sockets.
    pub data_dir: PathBuf,
    /// Built templates (see `alcove-image`).
    pub cache_dir: PathBuf,
    pub vmm: V,
    pub max_sandboxes: usize,
    /// VMs restored at once (creates that missed the warm pool, resumes, warm-pool fills); the
    /// rest wait their turn. 0: twice the host's cores ([`default_max_starting`]).
    pub max_starting: usize,
    /// How long a create or resume waits for a free slot under `max_sandboxes` and then for its
    /// turn to restore, before it is refused as over capacity ([`ADMISSION_WAIT`] in servers).
    pub admission_wait: std::time::Duration,
    /// Egress policy settings shared by every sandbox's network.
    pub egress: Arc<EgressConfig>,
}

impl<V> NodeConfig<V> {
    /// `max_starting`, 0 read as [`default_max_starting`].
    pub fn max_starting_or_default(&self) -> usize {
        match self.max_starting {
            0 => default_max_starting(),
            n => n,
        }
    }
}

/// The sandboxes of one host.
///
/// Generic over the [`Vmm`] rather than holding an `Arc<dyn ...>`: the VMM traits have async
/// methods (not object-safe without boxing every future), the one production VMM is known at
/// compile time, and the default parameter keeps `Node` meaning the QEMU node for every caller.
/// Unit tests instantiate it with an in-memory fake (`fake.rs`).
pub struct Node<V: Vmm = QemuVmm> {
    pub(crate) cfg: NodeConfig<V>,
    pub(crate) sandboxes: Mutex<HashMap<String, Arc<Live<V>>>>,
    /// Sandboxes being created or resumed: they hold a `max_sandboxes` slot from the check
    /// until they are running (or failed), so racing creates and resumes cannot pass the limit.
    pub(crate) starting: Mutex<std::collections::HashSet<String>>,
    pub(crate) templates: Mutex<HashMap<String, Arc<Template>>>,
    pub(crate) monitors: Mutex<Vec<tokio::task::AbortHandle>>,
    pub(crate) pool: crate::pool::Pool<V::Vm>,
    /// Namespaces and egress (root); a fake in unit tests.
    pub(crate) net: Arc<dyn HostNetwork>,
    /// Turns to restore a VM (`NodeConfig::max_starting`): a restore and its agent's `/init` are
    /// CPU-bound, and too many at once (a burst of creates) each get so little of the cores that
    /// their agents miss the init deadline; in turn, each finishes in its usual time.
    pub(crate) starting_turns: Arc<tokio::sync::Semaphore>,
    /// Template builds running at once (one: builds must not starve sandboxes on small hosts).
    pub(crate) builds: Arc<tokio::sync::Semaphore>,
    /// How builds pull OCI images (`Node::set_oci_options`); none: `fromImage` is refused.
    pub(crate) oci: Mutex<Option<alcove_image::oci::OciOptions>>,
    /// Where volumes live (`Node::set_volumes`); none: volume mounts are refused.
    pub(crate) volumes: Mutex<Option<Arc<alcove_volume::Volumes>>>,
}

impl<V: Vmm> Drop for Node<V> {
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

/// Runs file-sized work (hashing memory images of hundreds of MB) on a blocking thread: on an
/// async worker it would stall every request and VM monitor scheduled there meanwhile.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// SHA-256 of `path`, on a blocking thread (see [`blocking`]).
pub(crate) async fn sha256_blocking(path: &Path) -> Result<String, alcove_image::ImageError> {
    let path = path.to_path_buf();
    blocking(move || alcove_image::build::sha256_file(&path)).await
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
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

/// A server's `NodeConfig::admission_wait`: well inside the official SDKs' 60 s request
/// timeout, so a create refused after waiting is answered before the caller gives up on it.
pub const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_secs(40);

/// How often a create waiting for a slot looks again.
const SLOT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// `NodeConfig::max_starting` when it is 0: twice the host's cores (a restore waits on its
/// memory image's reads as well as on the CPU).
pub fn default_max_starting() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl<V: Vmm> Node<V> {
    pub fn config(&self) -> &NodeConfig<V> {
        &self.cfg
    }

    /// Sandboxes this node holds now, with those starting.
    pub fn sandbox_count(&self) -> usize {
        self.sandboxes.lock().expect("sandboxes lock").len()
            + self.starting.lock().expect("starting lock").len()
    }

    /// How template builds pull OCI images (`fromImage`); until set, such builds are refused.
    pub fn set_oci_options(&self, opts: alcove_image::oci::OciOptions) {
        *self.oci.lock().expect("oci lock") = Some(opts);
    }

    /// A template by name (a recipe build, `base`), or by the key of an API build that is not
    /// deleted.
    pub(crate) fn template(&self, name: &str) -> Result<Arc<Template>, NodeError> {
        if let Some(t) = self.templates.lock().expect("templates lock").get(name) {
            return Ok(t.clone());
        }
        let t = match alcove_image::load_template(&self.cfg.cache_dir, name) {
            Ok(t) => Arc::new(t),
            Err(e) => match self.built_template(name) {
                Ok(t) => t,
                // A recipe build by key (what a build from `base` starts its builder VM from).
                Err(_) => match alcove_image::build::load_template_key(&self.cfg.cache_dir, name) {
                    Ok(t) => Arc::new(t),
                    Err(_) => return Err(e.into()),
                },
            },
        };
        self.templates
            .lock()
            .expect("templates lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// Checks the host's limit and takes a slot for `id` in one step, under the sandboxes lock:
    /// the sandboxes in use are those creating or running, and those starting (a create before
    /// it is listed, a resume before it runs), each counted once.
    pub(crate) fn reserve_slot(&self, id: &str) -> Result<Slot<'_, V>, NodeError> {
        let map = self.sandboxes.lock().expect("sandboxes lock");
        let mut starting = self.starting.lock().expect("starting lock");
        let live = map.values().filter(|l| l.snapshot().state.is_live());
        let in_use = live.count()
            + starting
                .iter()
                .filter(|s| !map.get(*s).is_some_and(|l| l.snapshot().state.is_live()))
                .count();
        if in_use >= self.cfg.max_sandboxes {
            return Err(NodeError::Capacity(in_use));
        }
        starting.insert(id.to_owned());
        Ok(Slot {
            node: self,
            id: id.to_owned(),
        })
    }

    /// [`Node::reserve_slot`], waiting until `deadline` for one while the node is full (kills,
    /// pauses and failed creates free slots).
    pub(crate) async fn admit(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Slot<'_, V>, NodeError> {
        loop {
            match self.reserve_slot(id) {
                Err(NodeError::Capacity(_))
                    if tokio::time::Instant::now() + SLOT_POLL < deadline =>
                {
                    tokio::time::sleep(SLOT_POLL).await;
                }
                r => return r,
            }
        }
    }

    /// Waits (until `deadline`) for a turn to restore a VM; the turn is held until the permit is
    /// dropped, which is once the VM's agent has answered `/init`.
    pub(crate) async fn starting_turn(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, NodeError> {
        let turns = self.starting_turns.clone();
        match tokio::time::timeout_at(deadline, turns.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(NodeError::Busy {
                waited: self.cfg.admission_wait,
                at_once: self.cfg.max_starting_or_default(),
            }),
        }
    }

    pub(crate) fn live(&self, id: &str) -> Result<Arc<Live<V>>, NodeError> {
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
        // A new connection ends the guest's volume session: open it again on this one.
        self.attach_volumes(&info, &agent).await?;
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

    /// A fresh network namespace for a VM about to start from `spec`, with the egress sockets in it.
    pub(crate) async fn new_netns(
        &self,
        spec: &mut alcove_vmm::VmSpec,
    ) -> Result<EgressSockets, NodeError> {
        let net = self.net.clone();
        let (ns, listeners) = tokio::task::spawn_blocking(move || net.create(true))
            .await
            .expect("netns task")
            .map_err(|e| NodeError::Network(e.to_string()))?;
        spec.netns = ns;
        Ok(listeners.expect("asked for listeners"))
    }

    pub(crate) fn start_net(
        &self,
        live: &Live<V>,
        listeners: EgressSockets,
    ) -> Result<(), NodeError> {
        let info = live.snapshot();
        let ca = match crate::create::egress_ca(live.dir(), &info.id) {
            Ok(ca) => Some(ca),
            Err(e) => {
                tracing::warn!(sandbox_id = %info.id, error = %e, "no egress CA: network rules over HTTPS will fail for this sandbox");
                None
            }
        };
        let net = listeners.serve(self.cfg.egress.clone(), &info.id, info.network, ca)?;
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

    /// Bytes on the host's disk (allocated blocks, so sparse files count what they hold) of a
    /// sandbox's dir (its overlay and, paused, its memory image) and of snapshots' dirs. What is
    /// gone counts 0. Walks directories: call it from a blocking thread.
    pub fn stored_bytes(&self, sandbox_ids: &[String], snapshot_ids: &[String]) -> u64 {
        self.stored_bytes_each(sandbox_ids, snapshot_ids)
            .iter()
            .sum()
    }

    /// [`Node::stored_bytes`] of each sandbox, then of each snapshot, in order.
    pub fn stored_bytes_each(&self, sandbox_ids: &[String], snapshot_ids: &[String]) -> Vec<u64> {
        let sandboxes = sandbox_ids
            .iter()
            .map(|id| self.live(id).ok().map_or(0, |l| allocated_bytes(l.dir())));
        let snapshots = snapshot_ids.iter().map(|id| {
            if valid_id(id) {
                allocated_bytes(&crate::snapshots::snapshot_dir(&self.cfg.data_dir, id))
            } else {
                0
            }
        });
        sandboxes.chain(snapshots).collect()
    }

    /// The QEMU process of a live sandbox (for tests and metrics).
    pub fn vm(&self, id: &str) -> Result<V::Vm, NodeError> {
        self.live(id)?.vm().ok_or_else(|| NodeError::NotRunning {
            id: id.to_string(),
            state: "no VM".into(),
        })
    }
}

/// A `max_sandboxes` slot held while a sandbox starts; released when dropped.
pub(crate) struct Slot<'a, V: Vmm> {
    node: &'a Node<V>,
    id: String,
}

impl<V: Vmm> Drop for Slot<'_, V> {
    fn drop(&mut self) {
        self.node
            .starting
            .lock()
            .expect("starting lock")
            .remove(&self.id);
    }
}

pub(crate) use alcove_guest_contract::error_chain;

/// Allocated bytes under `path` (not following symlinks); 0 for what does not exist.
pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| allocated_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// Whether `pid` is an Alcove process other than this one (a warm VM's owner).
pub(crate) fn other_alcove_process_alive(pid: u32) -> bool {
    pid != std::process::id()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("alcove"))
}

pub(crate) fn qemu_log_tail(dir: &Path) -> String {
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
    pub(crate) fn ids_look_like_e2b_ids() {
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

    #[test]
    fn memory_images_are_hashed_off_the_async_threads() {
        // Reading a FIFO blocks until a writer opens it, and the writer is a task on the same
        // single-threaded runtime: hashing on the async thread would never let it run.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("image");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let r = rt.block_on(async move {
                let p = fifo.clone();
                let writer = tokio::spawn(async move { tokio::fs::write(&p, b"abc").await });
                let h = sha256_blocking(&fifo).await;
                writer.await.unwrap().unwrap();
                h
            });
            let _ = tx.send(r);
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the hash blocked the runtime's only thread")
            .unwrap();
        assert_eq!(
            got,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
