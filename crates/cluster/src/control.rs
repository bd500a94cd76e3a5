//! The control plane's side (`alcove server --cluster-listen`): [`ClusterBackend`], the API's
//! [`SandboxBackend`] over the nodes that heartbeat to it, and the cluster listener's routes.
//!
//! - **Membership.** A node is a member from its first signed heartbeat and *up* while its last
//!   one is younger than `lost_after`. Its report (capacity, templates, warm VMs) is what
//!   placement reads; a decision debits it at once, the next heartbeat replaces it.
//! - **Routing.** Each sandbox and snapshot is on one node: learned when it is made there, from
//!   every `list`, or by asking the nodes for one the map does not hold (made through another
//!   control-plane process, or before a restart).
//! - **Loss.** The sandboxes of a node that is not up are left out of `list` and reported
//!   `Exited` with the reason, so the API's liveness check marks them `lost`. If that node
//!   heartbeats again it is told to kill them (`reset`): they were reported gone.
//! - **Start.** After a restart the control plane knows no node until it heartbeats, so `list`
//!   and `templates` wait until `lost_after` has passed since start: every live node has
//!   reported by then, and the restart reconcile does not take a slow node's sandboxes for lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use alcove_api::backend::{
    BackendError, Body, BoxFuture, CreateSandbox, ExecOutput, ExecRequest, HostInfo, Keep,
    LiveSandbox, LogLine, NetCounters, NodeInfo, ResourceUsage, SandboxBackend, SandboxStatus,
    StartedSandbox, TemplateInfo, WarmPool,
};
use alcove_build_spec::{
    BuildFailure, BuildFrom, BuildLog, BuildLogEntry, BuildSpec, BuiltTemplate, LogLevel, StepKind,
    StepRef,
};
use alcove_placement::{NoPlace, Policy};
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;

use crate::blobs::{Blobs, Kind};
use crate::link::{SIGNATURE_HEADER, Token};
use crate::remote::RemoteNode;
use crate::wire::{
    Call, EGRESS_PATH, EgressBatch, EgressReceipt, HEARTBEAT_PATH, Heartbeat, HeartbeatAnswer,
    NodeFailure, SECRET_PATH, SecretAnswer, SecretRequest,
};

/// Deadlines on the link, behind the API's own per-operation ones.
const SHORT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(900);

#[derive(Clone)]
pub struct ClusterConfig {
    pub token: Token,
    pub policy: Policy,
    /// How often nodes are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// A node silent this long is lost.
    pub lost_after: Duration,
    /// How many times a node's vCPUs may be handed out.
    pub vcpu_overcommit: u32,
    /// Where paused sandboxes are kept so that another node can resume them (the nodes have
    /// the same one); without it a paused sandbox resumes only on its own node.
    pub blobs: Option<Blobs>,
    /// The secret store that network rules' placeholders are filled from: each node's egress
    /// proxy asks for a value ([`SECRET_PATH`]) for a sandbox on that node.
    pub secrets: Option<Arc<dyn alcove_net::secrets::SecretSource>>,
    /// Where the nodes' egress events go ([`EGRESS_PATH`]): the API's audit writer.
    pub egress: Option<tokio::sync::mpsc::Sender<alcove_net::EgressEvent>>,
}

impl ClusterConfig {
    pub fn new(token: Token) -> ClusterConfig {
        ClusterConfig {
            token,
            policy: Policy::Spread,
            heartbeat_interval: Duration::from_secs(1),
            lost_after: Duration::from_secs(3),
            vcpu_overcommit: 4,
            blobs: None,
            secrets: None,
            egress: None,
        }
    }
}

struct Member {
    node: Arc<RemoteNode>,
    last_seen: Instant,
    report: Heartbeat,
}

#[derive(Default)]
struct Members {
    nodes: BTreeMap<String, Member>,
    /// sandbox id → node id
    sandboxes: HashMap<String, String>,
    /// snapshot id → node id
    snapshots: HashMap<String, String>,
    /// Paused sandboxes with a complete copy in the blob store.
    stored: HashSet<String>,
    /// Nodes drained through the API (they may not know yet).
    draining: HashSet<String>,
}

pub struct ClusterBackend {
    cfg: ClusterConfig,
    started: Instant,
    state: Mutex<Members>,
    /// Copies to the blob store under way ([`copy_tag`]); a snapshot's delete takes its tag
    /// out, and `keep_snapshot`'s copy, once done, is removed again.
    exporting: Arc<Mutex<HashSet<String>>>,
    /// Whether this control-plane replica runs the background duties, liveness among them:
    /// only then did it report a silent node's sandboxes lost, and only then does it tell the
    /// node, back, to drop them (another replica may have missed heartbeats that this one's
    /// duty holder saw).
    on_duty: std::sync::atomic::AtomicBool,
}

/// Names a copy to the blob store under way in `ClusterBackend::exporting`.
fn copy_tag(kind: Kind, id: &str) -> String {
    format!("{kind:?} {id}")
}

/// Which of the id → node maps.
#[derive(Clone, Copy)]
enum Map {
    Sandboxes,
    Snapshots,
}

impl Map {
    fn of(self, st: &Members) -> &HashMap<String, String> {
        match self {
            Map::Sandboxes => &st.sandboxes,
            Map::Snapshots => &st.snapshots,
        }
    }

    fn of_mut(self, st: &mut Members) -> &mut HashMap<String, String> {
        match self {
            Map::Sandboxes => &mut st.sandboxes,
            Map::Snapshots => &mut st.snapshots,
        }
    }
}

/// A node's sandbox: the node, or why it cannot be reached.
enum Where {
    Up(Arc<RemoteNode>),
    Lost { node: String, reason: String },
}

fn lost_reason(node: &str, silent: Duration) -> String {
    format!(
        "node {node} stopped sending heartbeats (none for {:.1} s), so its sandboxes are gone \
         with it",
        silent.as_secs_f64()
    )
}

fn lost_error(node: &str, reason: String) -> BackendError {
    BackendError::Failed {
        op: "a call to a cluster node",
        source: Box::new(NodeFailure {
            node: node.to_owned(),
            op: "reach the node".into(),
            message: reason,
        }),
    }
}

/// Whether a node's report has template `t`: one of its templates, or one built through the
/// API on it (by key).
fn has_template(report: &Heartbeat, t: &str) -> bool {
    report.templates.iter().any(|x| x.template_id == t) || report.built.iter().any(|k| k == t)
}

/// A cluster-wide answer for a call the API makes on a single host's terms.
fn unsupported_in_cluster(what: &'static str) -> BackendError {
    BackendError::Unsupported { op: what }
}

impl ClusterBackend {
    pub fn new(cfg: ClusterConfig) -> ClusterBackend {
        ClusterBackend {
            cfg,
            started: Instant::now(),
            state: Mutex::new(Members::default()),
            exporting: Arc::default(),
            // One control plane until the API says otherwise (`set_on_duty`).
            on_duty: true.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.state.lock().expect("cluster state lock")
    }

    fn is_up(&self, m: &Member, now: Instant) -> bool {
        now.duration_since(m.last_seen) < self.cfg.lost_after
    }

    /// Until `lost_after` has passed since start, nodes that are up may not have reported yet.
    async fn settled(&self) {
        let ready = self.started + self.cfg.lost_after;
        tokio::time::sleep_until(ready.into()).await;
    }

    /// Learns which paused sandboxes the blob store holds (at start: they may resume on any
    /// node, whatever became of the one that paused them).
    pub async fn load_stored(&self) -> Result<usize, crate::blobs::BlobError> {
        let Some(b) = &self.cfg.blobs else {
            return Ok(0);
        };
        let ids = b.list(Kind::Paused).await?;
        let n = ids.len();
        self.lock().stored.extend(ids);
        Ok(n)
    }

    /// Whether paused sandbox `id` has a complete copy in the blob store. The store is asked
    /// (another control-plane replica may have written or removed the copy); the set this
    /// replica keeps answers only when the store cannot.
    async fn is_stored(&self, id: &str) -> bool {
        let Some(b) = &self.cfg.blobs else {
            return false;
        };
        match b.has(Kind::Paused, id).await {
            Ok(true) => {
                self.lock().stored.insert(id.to_owned());
                true
            }
            Ok(false) => {
                self.lock().stored.remove(id);
                false
            }
            Err(e) => {
                tracing::warn!(sandbox_id = id, error = %e, "asking the blob store for a stored sandbox");
                self.lock().stored.contains(id)
            }
        }
    }

    /// Reloads the set of stored sandboxes from the blob store (kept if it cannot be read).
    async fn refresh_stored(&self) {
        let Some(b) = &self.cfg.blobs else {
            return;
        };
        match b.list(Kind::Paused).await {
            Ok(ids) => self.lock().stored = ids.into_iter().collect(),
            Err(e) => tracing::warn!(error = %e, "listing the blob store's sandboxes"),
        }
    }

    /// Takes a node's heartbeat. Refuses one that claims the id of another node that is up
    /// with a different certificate.
    pub fn heartbeat(&self, mut hb: Heartbeat) -> Result<HeartbeatAnswer, (StatusCode, String)> {
        if !hb.url.starts_with("https://") {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "node {}: its link URL {} must be https:// (the node's own listener)",
                    hb.node_id, hb.url
                ),
            ));
        }
        if hb.node_id.is_empty() || hb.node_id.len() > 253 {
            return Err((
                StatusCode::BAD_REQUEST,
                "a node id is 1 to 253 characters".into(),
            ));
        }
        let now = Instant::now();
        let mut st = self.lock();
        let mut reset = false;
        let existing = st.nodes.get(&hb.node_id);
        let same_link =
            existing.is_some_and(|m| m.node.url == hb.url && m.node.cert_sha256 == hb.cert_sha256);
        if let Some(m) = existing {
            let up = self.is_up(m, now);
            if up && m.node.cert_sha256 != hb.cert_sha256 {
                return Err((
                    StatusCode::CONFLICT,
                    format!(
                        "node id {} is taken by a node that is up with another certificate; \
                         give this node its own --node-id",
                        hb.node_id
                    ),
                ));
            }
            if !up && self.on_duty.load(std::sync::atomic::Ordering::Relaxed) {
                reset = true;
                tracing::warn!(
                    node = %hb.node_id,
                    "a node declared lost is back: it is told to kill its sandboxes"
                );
            }
        } else {
            tracing::info!(node = %hb.node_id, url = %hb.url, "node joined the cluster");
        }
        let node = if same_link {
            Arc::clone(&st.nodes[&hb.node_id].node)
        } else {
            Arc::new(
                RemoteNode::new(&hb.node_id, &hb.url, &hb.cert_sha256, &self.cfg.token)
                    .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?,
            )
        };
        let on_node = std::mem::take(&mut hb.sandboxes);
        if reset {
            let id = hb.node_id.clone();
            st.sandboxes.retain(|_, n| *n != id);
            st.snapshots.retain(|_, n| *n != id);
        } else {
            // Where each of its sandboxes is, whichever replica placed it: a replica that did
            // not must still find it, and name this node if the node is lost.
            for id in on_node {
                st.sandboxes.insert(id, hb.node_id.clone());
            }
        }
        st.nodes.insert(
            hb.node_id.clone(),
            Member {
                node,
                last_seen: now,
                report: hb,
            },
        );
        Ok(HeartbeatAnswer {
            reset,
            interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
        })
    }

    /// The nodes as this control plane sees them, for operators.
    pub fn node_list(&self) -> Vec<NodeInfo> {
        let now = Instant::now();
        let st = self.lock();
        st.nodes
            .values()
            .map(|m| NodeInfo {
                node_id: m.report.node_id.clone(),
                url: m.report.url.clone(),
                up: self.is_up(m, now),
                draining: m.report.draining || st.draining.contains(&m.report.node_id),
                last_heartbeat_ms_ago: now.duration_since(m.last_seen).as_millis() as u64,
                sandboxes: m.report.host.sandboxes,
                memory_available_mib: m.report.host.memory_available_mib,
                templates: m.report.templates.len(),
            })
            .collect()
    }

    fn up_nodes(&self) -> Vec<Arc<RemoteNode>> {
        let now = Instant::now();
        let st = self.lock();
        st.nodes
            .values()
            .filter(|m| self.is_up(m, now))
            .map(|m| Arc::clone(&m.node))
            .collect()
    }

    fn locate(&self, map: &HashMap<String, String>, st: &Members, id: &str) -> Option<Where> {
        let node = map.get(id)?;
        let m = st.nodes.get(node)?;
        let now = Instant::now();
        Some(if self.is_up(m, now) {
            Where::Up(Arc::clone(&m.node))
        } else {
            Where::Lost {
                node: node.clone(),
                reason: lost_reason(node, now.duration_since(m.last_seen)),
            }
        })
    }

    /// Where a sandbox is: the map, else the first up node that knows it.
    async fn sandbox(&self, id: &str) -> Result<Where, BackendError> {
        let call = Call::Status {
            sandbox_id: id.to_owned(),
        };
        self.find(Map::Sandboxes, id, call, |a: &SandboxStatus| {
            matches!(
                a,
                SandboxStatus::Running | SandboxStatus::Paused | SandboxStatus::Exited { .. }
            )
        })
        .await
        .ok_or(BackendError::SandboxNotFound)
    }

    /// Where sandbox or snapshot `id` is: `map`, else the first up node whose answer to `call`
    /// passes `found` (then remembered in `map`).
    async fn find<T: serde::de::DeserializeOwned>(
        &self,
        map: Map,
        id: &str,
        call: Call,
        found: impl Fn(&T) -> bool,
    ) -> Option<Where> {
        {
            let st = self.lock();
            if let Some(w) = self.locate(map.of(&st), &st, id) {
                return Some(w);
            }
        }
        let nodes = self.up_nodes();
        let answers =
            futures::future::join_all(nodes.iter().map(|n| n.call::<T>(&call, SHORT))).await;
        let (n, _) = nodes
            .iter()
            .zip(answers)
            .find(|(_, a)| a.as_ref().is_ok_and(&found))?;
        map.of_mut(&mut self.lock())
            .insert(id.to_owned(), n.id.clone());
        Some(Where::Up(Arc::clone(n)))
    }

    /// `call` on the node that runs sandbox `id`, its answer within `deadline`.
    async fn on_sandbox<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
        call: Call,
        deadline: Duration,
    ) -> Result<T, BackendError> {
        self.up_sandbox(id).await?.call(&call, deadline).await
    }

    async fn up_sandbox(&self, id: &str) -> Result<Arc<RemoteNode>, BackendError> {
        match self.sandbox(id).await? {
            Where::Up(n) => Ok(n),
            Where::Lost { node, reason } => Err(lost_error(&node, reason)),
        }
    }

    /// Where a snapshot's files are: the map, else the first up node holding bytes of it.
    async fn snapshot_node(&self, id: &str) -> Result<Where, BackendError> {
        let call = Call::StoredBytesEach {
            sandbox_ids: Vec::new(),
            snapshot_ids: vec![id.to_owned()],
        };
        self.find(Map::Snapshots, id, call, |b: &Vec<u64>| {
            b.first().is_some_and(|b| *b > 0)
        })
        .await
        .ok_or(BackendError::SnapshotNotFound)
    }

    fn any_up_has(&self, template: &str) -> bool {
        let now = Instant::now();
        let st = self.lock();
        st.nodes
            .values()
            .any(|m| self.is_up(m, now) && has_template(&m.report, template))
    }

    /// Whether an up node has `template`, waiting up to two heartbeats for one to report it
    /// when none does yet: a template built a moment ago on a node (through another replica)
    /// shows in that node's next heartbeat. (The API asks only for templates its store knows.)
    async fn template_reported(&self, template: &str) -> bool {
        let until = Instant::now() + self.cfg.heartbeat_interval * 2 + Duration::from_millis(500);
        loop {
            if self.any_up_has(template) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Chooses a node for `req` (debiting it), skipping `tried`.
    fn place(&self, req: &CreateSandbox, tried: &[String]) -> Result<Arc<RemoteNode>, NoPlace> {
        self.place_sized(
            Some(&req.template_id),
            u64::from(req.memory_mb),
            req.cpu_count,
            tried,
        )
    }

    /// Chooses a node with `memory_mb` and `vcpus` free (and `template`'s files, if given).
    fn place_sized(
        &self,
        template: Option<&str>,
        memory_mb: u64,
        vcpus: u32,
        tried: &[String],
    ) -> Result<Arc<RemoteNode>, NoPlace> {
        let now = Instant::now();
        let mut st = self.lock();
        let ids: Vec<String> = st.nodes.keys().cloned().collect();
        let cluster = alcove_placement::Cluster {
            policy: self.cfg.policy,
            nodes: ids
                .iter()
                .map(|id| {
                    let m = &st.nodes[id];
                    let h = &m.report.host;
                    let has = |t: Option<&str>| t.is_none_or(|t| has_template(&m.report, t));
                    alcove_placement::NodeState {
                        id: id.clone(),
                        up: self.is_up(m, now) && !tried.contains(id) && has(template),
                        draining: m.report.draining
                            || st.draining.contains(id)
                            || h.sandboxes >= h.max_sandboxes,
                        memory_mb: h.memory_mib,
                        memory_free_mb: h.memory_available_mib,
                        vcpus: h.cpus as u32,
                        vcpus_used: h.vcpus_used,
                        vcpu_overcommit: self.cfg.vcpu_overcommit,
                        sandboxes: h.sandboxes as u32,
                        warm: m.report.warm.iter().cloned().collect(),
                        cached: m
                            .report
                            .templates
                            .iter()
                            .map(|t| t.template_id.clone())
                            .chain(m.report.built.iter().cloned())
                            .collect(),
                    }
                })
                .collect(),
        };
        let r = alcove_placement::Request {
            template: template.unwrap_or_default().to_owned(),
            memory_mb,
            vcpus,
            near: None,
        };
        let i = cluster.choose(&r)?;
        let m = st.nodes.get_mut(&ids[i]).expect("chosen from the members");
        let h = &mut m.report.host;
        h.memory_available_mib = h.memory_available_mib.saturating_sub(r.memory_mb);
        h.vcpus_used += r.vcpus;
        h.sandboxes += 1;
        m.report.warm.retain(|t| *t != r.template);
        Ok(Arc::clone(&m.node))
    }

    /// Runs `f` against each node holding some of `ids` (by `map`: the sandboxes' or the
    /// snapshots'), with that node's share, and puts the answers back in `ids`' order; unknown
    /// ones get `default`.
    async fn by_node<T, F, Fut>(&self, map: Map, ids: &[String], default: T, f: F) -> Vec<T>
    where
        T: Clone,
        F: Fn(Arc<RemoteNode>, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, BackendError>>,
    {
        let mut groups: BTreeMap<String, (Arc<RemoteNode>, Vec<usize>)> = BTreeMap::new();
        {
            let st = self.lock();
            for (i, id) in ids.iter().enumerate() {
                if let Some(Where::Up(n)) = self.locate(map.of(&st), &st, id) {
                    groups
                        .entry(n.id.clone())
                        .or_insert_with(|| (n, Vec::new()))
                        .1
                        .push(i);
                }
            }
        }
        let mut out = vec![default; ids.len()];
        let calls = groups.into_values().map(|(n, idx)| {
            let share: Vec<String> = idx.iter().map(|i| ids[*i].clone()).collect();
            let fut = f(n, share);
            async move { (idx, fut.await) }
        });
        for (idx, answer) in futures::future::join_all(calls).await {
            if let Ok(vals) = answer {
                for (i, v) in idx.into_iter().zip(vals) {
                    out[i] = v;
                }
            }
        }
        out
    }

    /// Has `node` copy paused sandbox `id` to the blob store.
    async fn export(&self, node: &RemoteNode, id: &str) -> Result<(), BackendError> {
        let call = Call::Export {
            sandbox_id: id.to_owned(),
        };
        let bytes: u64 = node.call(&call, LONG).await?;
        tracing::info!(sandbox_id = id, node = %node.id, bytes, "paused sandbox copied to the blob store");
        self.lock().stored.insert(id.to_owned());
        Ok(())
    }

    /// A resumed sandbox's stored copy is out of date: gone from the store.
    async fn forget_stored(&self, id: &str) {
        if !self.is_stored(id).await {
            return;
        }
        self.lock().stored.remove(id);
        if let Some(b) = &self.cfg.blobs
            && let Err(e) = b.delete(Kind::Paused, id).await
        {
            tracing::warn!(sandbox_id = id, error = %e, "removing a resumed sandbox's stored copy");
        }
    }

    /// Sandbox `req` made on `node`, which is remembered as its node.
    async fn create_on(
        &self,
        node: &RemoteNode,
        req: &CreateSandbox,
    ) -> Result<StartedSandbox, BackendError> {
        let call = Call::Create {
            req: Box::new(req.clone()),
        };
        let started = node.call::<StartedSandbox>(&call, LONG).await?;
        self.lock()
            .sandboxes
            .insert(req.sandbox_id.clone(), node.id.clone());
        Ok(started)
    }

    /// Whether node `id` is up and takes new sandboxes (not draining).
    fn takes_sandboxes(&self, id: &str) -> bool {
        let st = self.lock();
        st.nodes.get(id).is_some_and(|m| {
            self.is_up(m, Instant::now()) && !m.report.draining && !st.draining.contains(id)
        })
    }

    /// Whether `id` of `kind` has a complete copy in the blob store, made now by `from` (a node
    /// that has it, if up) when there is none yet. One copy of an entry at a time: one under
    /// way (`keep_snapshot`'s included) is waited for.
    async fn copied(&self, kind: Kind, id: &str, from: Option<&RemoteNode>) -> bool {
        let Some(b) = &self.cfg.blobs else {
            return false;
        };
        let tag = copy_tag(kind, id);
        let deadline = Instant::now() + LONG;
        loop {
            match b.has(kind, id).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(id, kind = ?kind, error = %e, "asking the blob store");
                    return false;
                }
            }
            let under_way = {
                let mut exporting = self.exporting.lock().expect("exports lock");
                match from {
                    Some(_) => !exporting.insert(tag.clone()),
                    None => exporting.contains(&tag),
                }
            };
            if !under_way {
                break;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(from) = from else {
            return false;
        };
        let call = match kind {
            Kind::Paused => Call::Export {
                sandbox_id: id.to_owned(),
            },
            Kind::Snapshot => Call::ExportSnapshot {
                snapshot_id: id.to_owned(),
            },
            Kind::Template => Call::ExportTemplate { key: id.to_owned() },
        };
        let t0 = Instant::now();
        let r = from.call::<u64>(&call, LONG).await;
        self.exporting.lock().expect("exports lock").remove(&tag);
        match r {
            Ok(bytes) => {
                tracing::info!(id, kind = ?kind, node = %from.id, bytes, secs = t0.elapsed().as_secs_f64(), "copied to the blob store");
                true
            }
            Err(e) => {
                tracing::warn!(id, kind = ?kind, node = %from.id, error = %alcove_api::error::chain(&e), "copying to the blob store");
                false
            }
        }
    }

    /// A sandbox from snapshot `snap` on a node other than `home` (lost, full or draining),
    /// which takes the snapshot in from the blob store first.
    async fn create_elsewhere(
        &self,
        req: &CreateSandbox,
        home: Option<&str>,
    ) -> Result<StartedSandbox, BackendError> {
        let snap = req.snapshot_id.as_deref().unwrap_or_default();
        let mut tried: Vec<String> = home.into_iter().map(str::to_owned).collect();
        let first = tried.len();
        loop {
            let node = match self.place(req, &tried) {
                Ok(n) => n,
                Err(_) if tried.len() > first => return Err(BackendError::NoCapacity),
                Err(e) => return Err(no_place(e)),
            };
            let import = Call::ImportSnapshot {
                snapshot_id: snap.to_owned(),
            };
            let made = match node.call::<()>(&import, LONG).await {
                Ok(()) => self.create_on(&node, req).await,
                Err(e) => Err(e),
            };
            match made {
                Ok(started) => {
                    tracing::info!(snapshot_id = snap, node = %node.id, sandbox_id = %req.sandbox_id, "sandbox made from a snapshot of another node, through the blob store");
                    return Ok(started);
                }
                Err(e) if tried.len() < first + 2 => {
                    tracing::warn!(snapshot_id = snap, node = %node.id, error = %alcove_api::error::chain(&e), "a sandbox from a snapshot in the blob store failed there; trying another node");
                    tried.push(node.id.clone());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A node that reports template `name` (up, draining or not) and its build key there.
    fn template_holder(&self, name: &str) -> Option<(Arc<RemoteNode>, String)> {
        let now = Instant::now();
        let st = self.lock();
        st.nodes
            .values()
            .filter(|m| self.is_up(m, now))
            .find_map(|m| {
                m.report
                    .templates
                    .iter()
                    .find(|t| t.template_id == name || t.aliases.iter().any(|a| a == name))
                    .and_then(|t| t.build_key.clone())
                    .map(|k| (Arc::clone(&m.node), k))
            })
    }

    /// A sandbox of `req.template_id` on a node that does not have the template, which takes it
    /// in from the blob store first (copied there by a node that has it). `None` when that
    /// cannot be: no blob store, no node with the template, or no node with room.
    async fn create_with_template_moved(
        &self,
        req: &CreateSandbox,
    ) -> Option<Result<StartedSandbox, BackendError>> {
        self.cfg.blobs.as_ref()?;
        let (holder, key) = self.template_holder(&req.template_id)?;
        let node = self
            .place_sized(None, u64::from(req.memory_mb), req.cpu_count, &[])
            .ok()?;
        if !self.copied(Kind::Template, &key, Some(&holder)).await {
            return None;
        }
        let t0 = Instant::now();
        let import = Call::ImportTemplate { key: key.clone() };
        if let Err(e) = node.call::<()>(&import, LONG).await {
            return Some(Err(e));
        }
        tracing::info!(template = %req.template_id, template_key = %key, node = %node.id, secs = t0.elapsed().as_secs_f64(), "template taken in from the blob store");
        Some(self.create_on(&node, req).await)
    }

    /// A sandbox from snapshot `req.snapshot_id`: on the snapshot's node while it is up and
    /// has room, else on another through the blob store.
    async fn create_from_snapshot(
        &self,
        req: &CreateSandbox,
        snap: &str,
    ) -> Result<StartedSandbox, BackendError> {
        let home = match self.snapshot_node(snap).await {
            Ok(Where::Up(n)) => {
                // Without a blob store the snapshot is only there: a draining node still
                // makes its sandboxes.
                if self.takes_sandboxes(&n.id) || self.cfg.blobs.is_none() {
                    match self.create_on(&n, req).await {
                        Ok(started) => return Ok(started),
                        Err(BackendError::NoCapacity) if self.cfg.blobs.is_some() => {
                            tracing::info!(snapshot_id = snap, node = %n.id, "the snapshot's node is full; making the sandbox elsewhere");
                        }
                        Err(e) => return Err(e),
                    }
                }
                if !self.copied(Kind::Snapshot, snap, Some(&n)).await {
                    return Err(BackendError::NoCapacity);
                }
                Some(n.id.clone())
            }
            Ok(Where::Lost { node, reason }) => {
                if !self.copied(Kind::Snapshot, snap, None).await {
                    return Err(lost_error(&node, reason));
                }
                Some(node)
            }
            Err(BackendError::SnapshotNotFound) => {
                if !self.copied(Kind::Snapshot, snap, None).await {
                    return Err(BackendError::SnapshotNotFound);
                }
                None
            }
            Err(e) => return Err(e),
        };
        self.create_elsewhere(req, home.as_deref()).await
    }

    /// Whether sandbox `sandbox_id` runs on node `node_id` (up), as the node's last heartbeat
    /// or this control plane's own placement says.
    fn runs_on(&self, node_id: &str, sandbox_id: &str) -> bool {
        let st = self.lock();
        let now = Instant::now();
        st.nodes.get(node_id).is_some_and(|m| {
            self.is_up(m, now)
                && (m.report.sandboxes.iter().any(|s| s == sandbox_id)
                    || st.sandboxes.get(sandbox_id).is_some_and(|n| n == node_id))
        })
    }

    /// A secret's value for `req`, if its sandbox runs on the asking node (as the node's last
    /// heartbeat or this control plane's own placement says).
    async fn answer_secret(&self, req: &SecretRequest) -> SecretAnswer {
        let Some(store) = &self.cfg.secrets else {
            return SecretAnswer::Refused {
                reason: "this control plane has no secret store".into(),
            };
        };
        if !self.runs_on(&req.node_id, &req.sandbox_id) {
            return SecretAnswer::Refused {
                reason: format!(
                    "sandbox {} is not on node {} as far as this control plane knows",
                    req.sandbox_id, req.node_id
                ),
            };
        }
        match store.resolve(&req.sandbox_id, &req.name).await {
            Ok(v) => SecretAnswer::Value {
                hex: hex::encode(&*v),
            },
            Err(alcove_net::secrets::SecretLookupError::NotFound(_)) => SecretAnswer::NotFound,
            Err(e) => SecretAnswer::Refused {
                reason: e.to_string(),
            },
        }
    }

    /// The cluster listener's routes: the nodes' heartbeats.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(HEARTBEAT_PATH, axum::routing::post(heartbeat))
            .route(SECRET_PATH, axum::routing::post(secret))
            .route(EGRESS_PATH, axum::routing::post(egress))
            // For load balancers' and orchestrators' probes: no secret, no state.
            .route(
                crate::wire::CLUSTER_HEALTH_PATH,
                axum::routing::get(|| async { "ok\n" }),
            )
            .layer(DefaultBodyLimit::max(4 << 20))
            .with_state(self)
    }
}

/// A signed request's body as `T`, or the status and message that refuse it (`what` names it).
fn signed<T: serde::de::DeserializeOwned>(
    c: &ClusterBackend,
    headers: &http::HeaderMap,
    body: &[u8],
    what: &str,
) -> Result<T, (StatusCode, String)> {
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Err(why) = c.cfg.token.verify(sig, body, SystemTime::now()) {
        tracing::warn!(why, "refused a {what}");
        return Err((StatusCode::UNAUTHORIZED, format!("{what} refused: {why}")));
    }
    serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("not a {what}: {e}")))
}

/// `answer` as JSON, signed with the cluster token (nodes obey only signed answers).
fn signed_answer(c: &ClusterBackend, answer: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(answer).unwrap_or_default();
    let sig = c.cfg.token.sign(&body);
    (
        [
            (
                http::header::CONTENT_TYPE.as_str(),
                "application/json".to_owned(),
            ),
            (SIGNATURE_HEADER, sig),
        ],
        body,
    )
        .into_response()
}

async fn heartbeat(
    State(c): State<Arc<ClusterBackend>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let hb: Heartbeat = match signed(&c, &headers, &body, "heartbeat") {
        Ok(h) => h,
        Err(refused) => return refused.into_response(),
    };
    match c.heartbeat(hb) {
        Ok(answer) => signed_answer(&c, &answer),
        Err((status, msg)) => (status, msg).into_response(),
    }
}

/// A node's egress proxy asks for a secret's value: given only for a sandbox this control
/// plane knows to run on that node, the request and the answer signed with the cluster token.
async fn secret(
    State(c): State<Arc<ClusterBackend>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let req: SecretRequest = match signed(&c, &headers, &body, "secret request") {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let answer = c.answer_secret(&req).await;
    if let SecretAnswer::Refused { reason } = &answer {
        tracing::warn!(node = %req.node_id, sandbox_id = %req.sandbox_id, reason, "secret not given to a node");
    }
    signed_answer(&c, &answer)
}

/// A node's egress events: those of sandboxes that run on it go to the audit writer (dropped,
/// and counted in the log, when its queue is full); the rest are not this node's to report.
async fn egress(
    State(c): State<Arc<ClusterBackend>>,
    headers: http::HeaderMap,
    body: Bytes,
) -> Response {
    let batch: EgressBatch = match signed(&c, &headers, &body, "batch of egress events") {
        Ok(b) => b,
        Err(refused) => return refused.into_response(),
    };
    let Some(tx) = &c.cfg.egress else {
        // No audit log to put them in.
        let dropped = batch.events.len();
        return signed_answer(
            &c,
            &EgressReceipt {
                dropped,
                ..Default::default()
            },
        );
    };
    let mut r = EgressReceipt::default();
    for ev in batch.events {
        if !c.runs_on(&batch.node_id, &ev.sandbox_id) {
            r.foreign += 1;
        } else if tx.try_send(ev).is_ok() {
            r.recorded += 1;
        } else {
            r.dropped += 1;
        }
    }
    if r.dropped + r.foreign > 0 {
        tracing::warn!(node = %batch.node_id, dropped = r.dropped, foreign = r.foreign, "egress events not recorded (queue full, or of sandboxes not on that node)");
    }
    signed_answer(&c, &r)
}

/// What a sandbox moved from the blob store is placed by (its size is in its record, which the
/// control plane does not read): an ordinary sandbox's memory and one vCPU.
const MOVED_MEMORY_MB: u64 = 512;

fn no_place(e: NoPlace) -> BackendError {
    match e {
        NoPlace::Full { .. } => BackendError::NoCapacity,
        NoPlace::NoNodes => BackendError::Unavailable {
            reason: "no node with the template is up and taking sandboxes (none has joined, \
                     the ones that have are lost or draining, or none has this template): start \
                     an `alcove node` pointed at this control plane, or wait for one to heartbeat"
                .into(),
        },
    }
}

impl ClusterBackend {
    /// [`SandboxBackend::build_template`]: on a node that has the parent template and room for
    /// the builder VM, placed like a sandbox; the `COPY` archives go to it first.
    async fn build_on_a_node(
        &self,
        spec: BuildSpec,
        log: BuildLog,
    ) -> Result<BuiltTemplate, BuildFailure> {
        let failure = |step: StepRef, message: String| BuildFailure { step, message };
        if !crate::wire::valid_build_id(&spec.build_id) {
            return Err(failure(
                StepRef::Base,
                format!("build id {:?} is not a UUID", spec.build_id),
            ));
        }
        self.settled().await;
        let parent = match &spec.from {
            BuildFrom::Template(t) => Some(t.as_str()),
            BuildFrom::Image { .. } => None,
        };
        if let Some(p) = parent {
            // A parent built a moment ago (through another replica) shows in a heartbeat.
            self.template_reported(p).await;
        }
        let node = self
            .place_sized(parent, u64::from(spec.memory_mib), spec.vcpus, &[])
            .map_err(|e| {
                let why = match e {
                    NoPlace::Full { .. } => {
                        "every node that has the parent template is full; try again once \
                         sandboxes end"
                    }
                    NoPlace::NoNodes => {
                        "no node that is up and taking sandboxes has the parent template"
                    }
                };
                failure(
                    StepRef::Base,
                    format!("no cluster node can run this build: {why}"),
                )
            })?;
        log(BuildLogEntry {
            level: LogLevel::Info,
            step: StepRef::Base,
            message: format!("Building on cluster node {}", node.id),
        });
        // Each archive once, before the build asks for it.
        let mut sent = HashSet::new();
        for (i, step) in spec.steps.iter().enumerate() {
            let StepKind::Copy { files_hash, .. } = &step.kind else {
                continue;
            };
            if !sent.insert(files_hash.as_str()) {
                continue;
            }
            let path = spec.files_dir.join(files_hash);
            node.put_build_file(&spec.build_id, files_hash, &path, LONG)
                .await
                .map_err(|e| {
                    failure(
                        StepRef::Step(i as u32 + 1),
                        format!(
                            "sending its files to node {}: {}",
                            node.id,
                            alcove_api::error::chain(&e)
                        ),
                    )
                })?;
        }
        let built = node.build(&spec, &log, SHORT).await?;
        // Known there before the node's next heartbeat says so.
        if let Some(m) = self.lock().nodes.get_mut(&node.id)
            && !m.report.built.contains(&built.key)
        {
            m.report.built.push(built.key.clone());
        }
        tracing::info!(template_key = %built.key, node = %node.id, "template built on a node");
        Ok(built)
    }
}

impl SandboxBackend for ClusterBackend {
    fn build_template(
        &self,
        spec: BuildSpec,
        log: BuildLog,
    ) -> BoxFuture<'_, Result<BuiltTemplate, BuildFailure>> {
        Box::pin(self.build_on_a_node(spec, log))
    }

    fn delete_template<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            // Every node that has it; one that is down drops it when asked again (the API
            // collects a deleted build's files once more later) or keeps it unused.
            let holders: Vec<Arc<RemoteNode>> = {
                let now = Instant::now();
                let st = self.lock();
                st.nodes
                    .values()
                    .filter(|m| self.is_up(m, now) && m.report.built.iter().any(|k| k == key))
                    .map(|m| Arc::clone(&m.node))
                    .collect()
            };
            let call = Call::DeleteTemplate {
                key: key.to_owned(),
            };
            for node in holders {
                node.call::<()>(&call, SHORT).await?;
                if let Some(m) = self.lock().nodes.get_mut(&node.id) {
                    m.report.built.retain(|k| k != key);
                }
            }
            Ok(())
        })
    }

    fn templates(&self) -> BoxFuture<'_, Result<Vec<TemplateInfo>, BackendError>> {
        Box::pin(async move {
            self.settled().await;
            let now = Instant::now();
            let st = self.lock();
            let mut out: BTreeMap<String, TemplateInfo> = BTreeMap::new();
            for m in st.nodes.values().filter(|m| self.is_up(m, now)) {
                for t in &m.report.templates {
                    out.entry(t.template_id.clone())
                        .or_insert_with(|| t.clone());
                }
            }
            Ok(out.into_values().collect())
        })
    }

    fn create(&self, req: CreateSandbox) -> BoxFuture<'_, Result<StartedSandbox, BackendError>> {
        Box::pin(async move {
            if !req.volume_mounts.is_empty() {
                return Err(unsupported_in_cluster("volume mounts on a cluster"));
            }
            self.settled().await;
            if let Some(snap) = &req.snapshot_id {
                return self.create_from_snapshot(&req, snap).await;
            }
            if !self.up_nodes().is_empty() && !self.template_reported(&req.template_id).await {
                return Err(BackendError::TemplateNotFound);
            }
            let mut tried: Vec<String> = Vec::new();
            loop {
                let node = match self.place(&req, &tried) {
                    Ok(n) => n,
                    // Every node that looked free refused: the cluster is full.
                    Err(_) if !tried.is_empty() => return Err(BackendError::NoCapacity),
                    // No node with the template has room (or takes sandboxes): one without it
                    // takes it in from the blob store.
                    Err(e) => match self.create_with_template_moved(&req).await {
                        Some(r) => return r,
                        None => return Err(no_place(e)),
                    },
                };
                match self.create_on(&node, &req).await {
                    Ok(started) => return Ok(started),
                    Err(BackendError::NoCapacity) if tried.len() < 3 => {
                        tracing::info!(node = %node.id, "node full at create; trying another");
                        tried.push(node.id.clone());
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn kill<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let stored = self.is_stored(sandbox_id).await;
            if stored && let Some(b) = &self.cfg.blobs {
                b.delete(Kind::Paused, sandbox_id)
                    .await
                    .map_err(BackendError::from)?;
                self.lock().stored.remove(sandbox_id);
            }
            let r = match self.sandbox(sandbox_id).await {
                Ok(Where::Up(n)) => {
                    n.call::<()>(
                        &Call::Kill {
                            sandbox_id: sandbox_id.to_owned(),
                        },
                        LONG,
                    )
                    .await
                }
                // Gone with its node; should the node come back, it is told to kill it.
                Ok(Where::Lost { .. }) => Ok(()),
                Err(e) => Err(e),
            };
            let r = match r {
                // Only in the blob store, now deleted.
                Err(BackendError::SandboxNotFound) if stored => Ok(()),
                r => r,
            };
            if matches!(r, Ok(()) | Err(BackendError::SandboxNotFound)) {
                self.lock().sandboxes.remove(sandbox_id);
            }
            r
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveSandbox>, BackendError>> {
        Box::pin(async move {
            self.settled().await;
            // Copies another replica stored count too (a drain through it, say).
            self.refresh_stored().await;
            let nodes = self.up_nodes();
            let answers = futures::future::join_all(
                nodes
                    .iter()
                    .map(|n| n.call::<Vec<LiveSandbox>>(&Call::List, SHORT)),
            )
            .await;
            let mut out = Vec::new();
            let mut st = self.lock();
            for (n, a) in nodes.iter().zip(answers) {
                match a {
                    Ok(live) => {
                        for l in &live {
                            st.sandboxes.insert(l.sandbox_id.clone(), n.id.clone());
                        }
                        out.extend(live);
                    }
                    Err(e) => {
                        // Heartbeating but not answering: its sandboxes are not taken for
                        // lost on one failed list; they count as they were.
                        tracing::warn!(node = %n.id, error = %e, "listing a node's sandboxes failed");
                        out.extend(st.sandboxes.iter().filter(|(_, node)| **node == n.id).map(
                            |(id, _)| LiveSandbox {
                                sandbox_id: id.clone(),
                                paused: false,
                            },
                        ));
                    }
                }
            }
            // Paused sandboxes whose state is in the blob store live on, whatever their node.
            let listed: HashSet<String> = out.iter().map(|l| l.sandbox_id.clone()).collect();
            out.extend(
                st.stored
                    .iter()
                    .filter(|id| !listed.contains(*id))
                    .map(|id| LiveSandbox {
                        sandbox_id: id.clone(),
                        paused: true,
                    }),
            );
            Ok(out)
        })
    }

    fn status<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<SandboxStatus, BackendError>> {
        Box::pin(async move {
            match self.sandbox(sandbox_id).await {
                Ok(Where::Up(n)) => {
                    n.call(
                        &Call::Status {
                            sandbox_id: sandbox_id.to_owned(),
                        },
                        SHORT,
                    )
                    .await
                }
                Ok(Where::Lost { reason, .. }) => Ok(if self.is_stored(sandbox_id).await {
                    SandboxStatus::Paused
                } else {
                    SandboxStatus::Exited { reason }
                }),
                Err(BackendError::SandboxNotFound) => Ok(if self.is_stored(sandbox_id).await {
                    SandboxStatus::Paused
                } else {
                    SandboxStatus::Unknown
                }),
                Err(e) => Err(e),
            }
        })
    }

    fn metrics<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceUsage>, BackendError>> {
        Box::pin(async move {
            self.on_sandbox(
                sandbox_id,
                Call::Metrics {
                    sandbox_id: sandbox_id.to_owned(),
                },
                SHORT,
            )
            .await
        })
    }

    fn logs<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<LogLine>, BackendError>> {
        Box::pin(async move {
            self.on_sandbox(
                sandbox_id,
                Call::Logs {
                    sandbox_id: sandbox_id.to_owned(),
                },
                SHORT,
            )
            .await
        })
    }

    fn update_network<'a>(
        &'a self,
        sandbox_id: &'a str,
        network: alcove_net::NetworkConfig,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.on_sandbox(
                sandbox_id,
                Call::UpdateNetwork {
                    sandbox_id: sandbox_id.to_owned(),
                    network,
                },
                SHORT,
            )
            .await
        })
    }

    fn warm_pool(&self) -> BoxFuture<'_, Result<Vec<WarmPool>, BackendError>> {
        Box::pin(async move {
            let nodes = self.up_nodes();
            let answers = futures::future::join_all(
                nodes
                    .iter()
                    .map(|n| n.call::<Vec<WarmPool>>(&Call::WarmPool, SHORT)),
            )
            .await;
            let mut by: BTreeMap<String, WarmPool> = BTreeMap::new();
            for p in answers.into_iter().flatten().flatten() {
                let e = by.entry(p.template_id.clone()).or_insert(WarmPool {
                    template_id: p.template_id.clone(),
                    target: 0,
                    min: 0,
                    max: 0,
                    ready: 0,
                    hits: 0,
                    misses: 0,
                    last_error: None,
                });
                e.target += p.target;
                e.min += p.min;
                e.max += p.max;
                e.ready += p.ready;
                e.hits += p.hits;
                e.misses += p.misses;
                e.last_error = e.last_error.take().or(p.last_error);
            }
            Ok(by.into_values().collect())
        })
    }

    fn network<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<alcove_net::NetworkConfig>, BackendError>> {
        Box::pin(async move {
            self.on_sandbox(
                sandbox_id,
                Call::Network {
                    sandbox_id: sandbox_id.to_owned(),
                },
                SHORT,
            )
            .await
        })
    }

    fn pause<'a>(
        &'a self,
        sandbox_id: &'a str,
        keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let node = self.up_sandbox(sandbox_id).await?;
            let call = Call::Pause {
                sandbox_id: sandbox_id.to_owned(),
                keep,
            };
            node.call::<()>(&call, LONG).await?;
            // A copy in the blob store, so that it can resume on another node should this one
            // be drained or lost. The pause stands without it (it then resumes only here).
            if self.cfg.blobs.is_some()
                && let Err(e) = self.export(&node, sandbox_id).await
            {
                tracing::warn!(
                    sandbox_id,
                    node = %node.id,
                    error = %alcove_api::error::chain(&e),
                    "the paused sandbox could not be copied to the blob store; it resumes only on its node"
                );
            }
            Ok(())
        })
    }

    fn resume<'a>(
        &'a self,
        sandbox_id: &'a str,
        from: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let call = Call::Resume {
                sandbox_id: sandbox_id.to_owned(),
                from,
            };
            let here = match self.sandbox(sandbox_id).await {
                Ok(Where::Up(n)) => match n.call::<()>(&call, LONG).await {
                    Ok(()) => {
                        self.forget_stored(sandbox_id).await;
                        return Ok(());
                    }
                    Err(BackendError::SandboxNotFound) => None,
                    Err(e) => return Err(e),
                },
                Ok(Where::Lost { node, reason }) => Some((node, reason)),
                Err(BackendError::SandboxNotFound) => None,
                Err(e) => return Err(e),
            };
            if !self.is_stored(sandbox_id).await {
                return Err(match here {
                    Some((node, reason)) => lost_error(&node, reason),
                    None => BackendError::SandboxNotFound,
                });
            }
            // Elsewhere, from the blob store.
            let mut tried = Vec::new();
            loop {
                let node = match self.place_sized(None, MOVED_MEMORY_MB, 1, &tried) {
                    Ok(n) => n,
                    Err(_) if !tried.is_empty() => return Err(BackendError::NoCapacity),
                    Err(e) => return Err(no_place(e)),
                };
                let import = Call::Import {
                    sandbox_id: sandbox_id.to_owned(),
                };
                match node.call::<()>(&import, LONG).await {
                    Ok(()) => {}
                    Err(e) if tried.len() < 2 => {
                        tracing::warn!(sandbox_id, node = %node.id, error = %e, "taking in a paused sandbox failed; trying another node");
                        tried.push(node.id.clone());
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                self.lock()
                    .sandboxes
                    .insert(sandbox_id.to_owned(), node.id.clone());
                node.call::<()>(&call, LONG).await?;
                tracing::info!(sandbox_id, node = %node.id, "resumed on another node from the blob store");
                self.forget_stored(sandbox_id).await;
                return Ok(());
            }
        })
    }

    fn snapshot<'a>(
        &'a self,
        sandbox_id: &'a str,
        snapshot_id: &'a str,
        keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let node = self.up_sandbox(sandbox_id).await?;
            let call = Call::Snapshot {
                sandbox_id: sandbox_id.to_owned(),
                snapshot_id: snapshot_id.to_owned(),
                keep,
            };
            node.call::<()>(&call, LONG).await?;
            self.lock()
                .snapshots
                .insert(snapshot_id.to_owned(), node.id.clone());
            Ok(())
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            // A copy under way removes itself when it ends.
            self.exporting
                .lock()
                .expect("exports lock")
                .remove(&copy_tag(Kind::Snapshot, snapshot_id));
            let home = self.snapshot_node(snapshot_id).await;
            // Every up node: its own node, and those that took it in from the blob store.
            let call = Call::DeleteSnapshot {
                snapshot_id: snapshot_id.to_owned(),
            };
            let nodes = self.up_nodes();
            let answers =
                futures::future::join_all(nodes.iter().map(|n| n.call::<()>(&call, LONG))).await;
            let mut deleted = false;
            let mut failure = None;
            for a in answers {
                match a {
                    Ok(()) => deleted = true,
                    Err(BackendError::SnapshotNotFound) => {}
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            if let Some(b) = &self.cfg.blobs {
                match b.has(Kind::Snapshot, snapshot_id).await {
                    Ok(true) => {
                        b.delete(Kind::Snapshot, snapshot_id)
                            .await
                            .map_err(BackendError::from)?;
                        deleted = true;
                    }
                    Ok(false) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
            if !deleted {
                return Err(match home {
                    Ok(Where::Lost { node, reason }) => lost_error(&node, reason),
                    Err(e) => e,
                    Ok(Where::Up(_)) => BackendError::SnapshotNotFound,
                });
            }
            self.lock().snapshots.remove(snapshot_id);
            Ok(())
        })
    }

    fn stored_bytes_each<'a>(
        &'a self,
        sandbox_ids: &'a [String],
        snapshot_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, BackendError>> {
        Box::pin(async move {
            let mut out = self
                .by_node(Map::Sandboxes, sandbox_ids, 0u64, |n, share| async move {
                    n.call::<Vec<u64>>(
                        &Call::StoredBytesEach {
                            sandbox_ids: share,
                            snapshot_ids: Vec::new(),
                        },
                        SHORT,
                    )
                    .await
                })
                .await;
            // Snapshots by their own map (a snapshot outlives the sandbox it was taken of).
            let snaps = self
                .by_node(Map::Snapshots, snapshot_ids, 0u64, |n, share| async move {
                    n.call::<Vec<u64>>(
                        &Call::StoredBytesEach {
                            sandbox_ids: Vec::new(),
                            snapshot_ids: share,
                        },
                        SHORT,
                    )
                    .await
                })
                .await;
            out.extend(snaps);
            Ok(out)
        })
    }

    fn net_counters<'a>(
        &'a self,
        sandbox_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<NetCounters>>, BackendError>> {
        Box::pin(async move {
            Ok(self
                .by_node(Map::Sandboxes, sandbox_ids, None, |n, share| async move {
                    n.call::<Vec<Option<NetCounters>>>(
                        &Call::NetCounters { sandbox_ids: share },
                        SHORT,
                    )
                    .await
                })
                .await)
        })
    }

    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecOutput, BackendError>> {
        Box::pin(async move {
            let deadline = req.timeout + SHORT;
            let call = Call::Exec {
                sandbox_id: sandbox_id.to_owned(),
                req,
            };
            self.up_sandbox(sandbox_id)
                .await?
                .call(&call, deadline)
                .await
        })
    }

    fn host_info(&self) -> Option<HostInfo> {
        let now = Instant::now();
        let st = self.lock();
        let up: Vec<&Member> = st.nodes.values().filter(|m| self.is_up(m, now)).collect();
        let first = up.first()?;
        let mut h = HostInfo {
            accel: first.report.host.accel.clone(),
            accel_reason: format!(
                "a cluster of {} node(s) up; the first reports: {}",
                up.len(),
                first.report.host.accel_reason
            ),
            jailed: up.iter().all(|m| m.report.host.jailed),
            max_sandboxes: 0,
            sandboxes: 0,
            vcpus_used: 0,
            cpus: 0,
            memory_mib: 0,
            memory_available_mib: 0,
        };
        for m in &up {
            let r = &m.report.host;
            h.max_sandboxes += r.max_sandboxes;
            h.sandboxes += r.sandboxes;
            h.vcpus_used += r.vcpus_used;
            h.cpus += r.cpus;
            h.memory_mib += r.memory_mib;
            h.memory_available_mib += r.memory_available_mib;
        }
        Some(h)
    }

    fn nodes(&self) -> Option<Vec<NodeInfo>> {
        Some(self.node_list())
    }

    fn set_on_duty(&self, on_duty: bool) {
        self.on_duty
            .store(on_duty, std::sync::atomic::Ordering::Relaxed);
    }

    fn drain_node<'a>(
        &'a self,
        node_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<LiveSandbox>, BackendError>> {
        Box::pin(async move {
            let node = {
                let mut st = self.lock();
                let Some(m) = st.nodes.get(node_id) else {
                    return Err(BackendError::Failed {
                        op: "drain",
                        source: format!("no node {node_id} has joined this control plane").into(),
                    });
                };
                let n = Arc::clone(&m.node);
                st.draining.insert(node_id.to_owned());
                n
            };
            tracing::info!(node = node_id, "node draining: no new sandboxes go there");
            // The node says so in its heartbeats from now on, to every replica. This one has
            // it in its own set already, so a node that cannot be told is still drained here.
            if let Err(e) = node.call::<bool>(&Call::Drain, SHORT).await {
                tracing::warn!(node = node_id, error = %alcove_api::error::chain(&e), "telling the node it drains");
            }
            let live: Vec<LiveSandbox> = node.call(&Call::List, SHORT).await?;
            let snapshots: Vec<String> = {
                let mut st = self.lock();
                for l in &live {
                    st.sandboxes
                        .insert(l.sandbox_id.clone(), node_id.to_owned());
                }
                st.snapshots
                    .iter()
                    .filter(|(_, n)| n.as_str() == node_id)
                    .map(|(s, _)| s.clone())
                    .collect()
            };
            // Its snapshots are copied to the blob store (those that are not yet), so that
            // sandboxes are made from them elsewhere once the node is gone.
            for snap in snapshots {
                if self.cfg.blobs.is_some()
                    && !self.copied(Kind::Snapshot, &snap, Some(&node)).await
                {
                    tracing::warn!(node = node_id, snapshot_id = %snap, "a drained node's snapshot is not in the blob store");
                }
            }
            Ok(live)
        })
    }

    fn keep_snapshot(&self, snapshot_id: &str) {
        let Some(blobs) = self.cfg.blobs.clone() else {
            return;
        };
        let node = {
            let st = self.lock();
            match self.locate(&st.snapshots, &st, snapshot_id) {
                Some(Where::Up(n)) => n,
                _ => return,
            }
        };
        let id = snapshot_id.to_owned();
        let tag = copy_tag(Kind::Snapshot, &id);
        let exporting = Arc::clone(&self.exporting);
        if !exporting.lock().expect("exports lock").insert(tag.clone()) {
            return; // a copy is under way
        }
        tokio::spawn(async move {
            let call = Call::ExportSnapshot {
                snapshot_id: id.clone(),
            };
            let r = node.call::<u64>(&call, LONG).await;
            let kept = exporting.lock().expect("exports lock").remove(&tag);
            match r {
                Ok(bytes) if kept => {
                    tracing::info!(snapshot_id = %id, node = %node.id, bytes, "snapshot copied to the blob store");
                }
                Ok(_) => {
                    // Deleted while it was being copied.
                    if let Err(e) = blobs.delete(Kind::Snapshot, &id).await {
                        tracing::warn!(snapshot_id = %id, error = %e, "removing a deleted snapshot's copy");
                    }
                }
                Err(e) => {
                    tracing::warn!(snapshot_id = %id, node = %node.id, error = %alcove_api::error::chain(&e), "the snapshot could not be copied to the blob store; sandboxes are made from it only on its node");
                }
            }
        });
    }

    fn evict<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            if self.cfg.blobs.is_none() {
                return Err(BackendError::Failed {
                    op: "evict",
                    source: "the control plane has no blob store (--blob-store), so a paused \
                             sandbox cannot leave its node"
                        .into(),
                });
            }
            let node = self.up_sandbox(sandbox_id).await?;
            if !self.is_stored(sandbox_id).await {
                self.export(&node, sandbox_id).await?;
            }
            // The node's own copy goes: the stored one is the sandbox now.
            node.call::<()>(
                &Call::Kill {
                    sandbox_id: sandbox_id.to_owned(),
                },
                LONG,
            )
            .await?;
            self.lock().sandboxes.remove(sandbox_id);
            tracing::info!(sandbox_id, node = %node.id, "paused sandbox moved off its node to the blob store");
            Ok(())
        })
    }

    fn forward<'a>(
        &'a self,
        sandbox_id: &'a str,
        port: u16,
        req: http::Request<Body>,
    ) -> BoxFuture<'a, Result<http::Response<Body>, BackendError>> {
        Box::pin(async move {
            self.up_sandbox(sandbox_id)
                .await?
                .forward(sandbox_id, port, req)
                .await
        })
    }
}
