//! Template builds from the API: an E2B `Template` (a parent, steps, a start and a ready command)
//! turned into a template of this host, with every step run inside a builder microVM, never on
//! the host. The contract between the API (which owns build records, logs, uploads and tags) and
//! the node (which owns VMs, the layer cache and template files) is [`spec`] (the
//! `alcove-build-spec` crate).
//!
//! A build ([`Node::build_template`]):
//! 1. resolves its parent (a template by name or key, or an OCI image booted into an
//!    intermediate template) and the state its steps start in;
//! 2. computes every layer key up front (`state.rs`), so an unchanged build whose template exists
//!    returns at once, and finds the longest cached prefix (`cache.rs`);
//! 3. starts the builder VM, an ordinary node sandbox (jailed, cgrouped, behind the egress proxy
//!    with the build's rules, counted against the sandbox limit), from that cached layer's
//!    snapshot or from the parent template, and runs the other steps through its agent
//!    (`run.rs`), snapshotting after each `RUN` and `COPY` into the cache;
//! 4. finalizes (`finalize.rs`): `template.json` written in the guest, a last snapshot, the layer
//!    chain flattened into a raw disk, cold-booted by the node's jailed VMM and snapshotted as a
//!    template under `<data>/templates/<key>/`.
//!
//! One build runs at a time per node (`Node::builds`); others wait. The builder VM is killed on
//! every path (a guard).

pub mod cache;
mod finalize;
mod run;
/// The contract types, shared with the API (`alcove-build-spec`).
pub mod spec {
    pub use alcove_build_spec::*;
}
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use alcove_image::Template;
use alcove_vmm::{QemuVmm, Vmm};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use spec::{
    BuildFailure, BuildFrom, BuildLog, BuildLogEntry, BuildSpec, BuiltTemplate, ImageRegistry,
    LogLevel, Step, StepKind, StepRef,
};

use crate::node::{Node, error_chain, now_ms};
use crate::{CreateOptions, NodeError};
use run::{Builder, failure};
use state::StepState;

/// What an API-built template records beside its manifest (`build.json`): the state its
/// processes start in, which a build from it starts its steps in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub build_id: String,
    pub state: StepState,
    /// The finalized layer's key (its cache entry holds the disk chain the template came from).
    pub layer_key: String,
}

pub(crate) const BUILD_RECORD: &str = "build.json";
/// Marks an API-built template deleted: no new sandbox uses it; its files go once nothing does.
pub(crate) const DELETED: &str = "deleted";

/// The parent of a build, resolved.
struct Parent {
    template: Arc<Template>,
    state: StepState,
    /// The image's `ENTRYPOINT` + `CMD`, when the spec has no start command.
    start_cmd: Option<String>,
}

/// Kills the builder VM and removes its sandbox dir however the build ends.
struct BuilderGuard<V: Vmm> {
    node: Arc<Node<V>>,
    id: Option<String>,
}

impl<V: Vmm> BuilderGuard<V> {
    async fn kill(&mut self) {
        if let Some(id) = self.id.take()
            && let Err(e) = self.node.kill(&id).await
        {
            tracing::warn!(sandbox_id = %id, error = %error_chain(&e), "removing a builder VM");
        }
    }
}

impl<V: Vmm> Drop for BuilderGuard<V> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let node = self.node.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = node.kill(&id).await;
                });
            }
        }
    }
}

/// A step's archive hash (COPY) and keys, computed before anything runs.
struct Plan {
    /// The key after each step (index = step index).
    keys: Vec<String>,
    /// The state each step runs in.
    states: Vec<StepState>,
    /// The SHA-256 of each COPY's archive, with its path.
    archives: Vec<Option<PathBuf>>,
    final_state: StepState,
    start_cmd: Option<String>,
    template_json: Vec<u8>,
    finalize_key: String,
    template_key: String,
    forced_from: usize,
}

impl Node<QemuVmm> {
    /// Builds `spec` into a template of this node and returns its key
    /// (`CreateOptions::template` accepts it). Steps run inside a builder microVM; each `RUN` and
    /// `COPY` result is cached; an unchanged build whose template exists returns at once.
    pub async fn build_template(
        self: &Arc<Self>,
        spec: BuildSpec,
        log: BuildLog,
    ) -> Result<BuiltTemplate, BuildFailure> {
        let t0 = Instant::now();
        let deadline = t0 + spec.deadline;
        let say = |step: StepRef, level: LogLevel, message: String| {
            log(BuildLogEntry {
                level,
                step,
                message,
            })
        };
        let permit = match self.builds.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                say(
                    StepRef::Base,
                    LogLevel::Info,
                    "waiting for another build on this node to finish".into(),
                );
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, self.builds.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(failure(
                            StepRef::Base,
                            "the build waited for other builds past its deadline; try again later",
                        ));
                    }
                }
            }
        };
        let span = tracing::info_span!("build", build_id = %spec.build_id, template = %spec.name);
        let result = self
            .build_locked(&spec, &log, t0, deadline)
            .instrument(span)
            .await;
        drop(permit);
        match &result {
            Ok(b) => {
                tracing::info!(build_id = %spec.build_id, template_key = %b.key, cached = b.cached_steps, ms = t0.elapsed().as_millis() as u64, "template built")
            }
            Err(f) => {
                tracing::info!(build_id = %spec.build_id, step = %f.step, error = %f.message, "template build failed")
            }
        }
        result
    }

    async fn build_locked(
        self: &Arc<Self>,
        spec: &BuildSpec,
        log: &BuildLog,
        t0: Instant,
        deadline: Instant,
    ) -> Result<BuiltTemplate, BuildFailure> {
        let say = |step: StepRef, level: LogLevel, message: String| {
            log(BuildLogEntry {
                level,
                step,
                message,
            })
        };
        let parent = self.resolve_parent(spec, log, deadline).await?;
        let plan = plan(spec, &parent).await?;
        let n = spec.steps.len();

        // An unchanged build: its template is there already.
        if plan.forced_from == usize::MAX
            && let Ok(t) = self.built_template(&plan.template_key)
        {
            for i in 0..n {
                say(StepRef::Step(i as u32 + 1), LogLevel::Info, "CACHED".into());
            }
            say(
                StepRef::Finalize,
                LogLevel::Info,
                format!("template {} is built already", t.key),
            );
            return Ok(built(&t, n as u32));
        }

        // The furthest point the cache can start from: after step `i`.
        let usable = plan.forced_from.min(n);
        let mut start: Option<(usize, cache::Entry)> = None; // (steps done, entry)
        for i in (0..usable).rev() {
            if state::makes_layer(&spec.steps[i].kind)
                && let Some(e) = self.usable_entry(&plan.keys[i]).await
            {
                start = Some((i + 1, e));
                break;
            }
        }
        let done = start.as_ref().map_or(0, |(d, _)| *d);
        for i in 0..done {
            say(StepRef::Step(i as u32 + 1), LogLevel::Info, "CACHED".into());
        }

        let dir = {
            let builder_t0 = Instant::now();
            let id = format!("build-{}", hex::encode(crate::node::random_bytes::<6>()));
            let opts = CreateOptions {
                template: parent.template.key.clone(),
                id: Some(id.clone()),
                network: spec.network.clone(),
                snapshot: start.as_ref().map(|(_, e)| e.snapshot.clone()),
                ..Default::default()
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let created = tokio::time::timeout(left, self.create(opts)).await;
            let mut guard = BuilderGuard {
                node: self.clone(),
                id: None,
            };
            match created {
                Ok(Ok(_)) => guard.id = Some(id.clone()),
                Ok(Err(e)) => {
                    return Err(failure(
                        StepRef::Base,
                        format!("the builder VM did not start: {}", error_chain(&e)),
                    ));
                }
                Err(_) => {
                    // The create may still finish: its sandbox goes with the guard.
                    guard.id = Some(id.clone());
                    return Err(failure(
                        StepRef::Base,
                        "the builder VM did not start before the build's deadline",
                    ));
                }
            }
            say(
                StepRef::Base,
                LogLevel::Info,
                format!(
                    "builder VM {id} started in {:.1} s{}",
                    builder_t0.elapsed().as_secs_f64(),
                    if done > 0 {
                        format!(" from the cached layer after step {done}")
                    } else {
                        String::new()
                    }
                ),
            );
            let b = Builder {
                node: self.clone(),
                id: id.clone(),
                log: log.clone(),
                deadline,
            };
            let steps = async {
                for i in done..n {
                    let step_ref = StepRef::Step(i as u32 + 1);
                    let st = &plan.states[i];
                    self.run_step(&b, step_ref, &spec.steps[i].kind, st, &plan.archives[i])
                        .await?;
                    if state::makes_layer(&spec.steps[i].kind) {
                        self.cache_layer(&b, step_ref, &plan.keys[i]).await?;
                    }
                }
                let chain = finalize::finalize_guest(self, &b, &plan).await?;
                finalize::flatten_into_dir(self, &plan, &chain, log, deadline).await
            }
            .await;
            // Awaited on every path (the guard's drop only covers a cancelled build).
            guard.kill().await;
            steps?
        };
        let t = finalize::boot_template(self, spec, &parent, &plan, &dir, log, deadline).await?;
        self.evict_cache(&plan.keys);
        say(
            StepRef::Finalize,
            LogLevel::Info,
            format!(
                "template {} built in {:.1} s",
                t.key,
                t0.elapsed().as_secs_f64()
            ),
        );
        Ok(built(&t, done as u32))
    }

    async fn resolve_parent(
        self: &Arc<Self>,
        spec: &BuildSpec,
        log: &BuildLog,
        deadline: Instant,
    ) -> Result<Parent, BuildFailure> {
        match &spec.from {
            BuildFrom::Template(name) => {
                let template = self.template(name).map_err(|e| {
                    failure(
                        StepRef::Base,
                        format!(
                            "the parent template `{name}` is not on this node: {}",
                            error_chain(&e)
                        ),
                    )
                })?;
                let state = read_record(&template.dir)
                    .map(|r| r.state)
                    .unwrap_or_else(|| StepState {
                        env: template.recipe.env.clone(),
                        ..StepState::default()
                    });
                Ok(Parent {
                    template,
                    state,
                    start_cmd: None,
                })
            }
            BuildFrom::Image {
                reference,
                registry,
            } => {
                finalize::image_parent(self, spec, reference, registry.as_ref(), log, deadline)
                    .await
            }
        }
    }

    /// Runs one step in the builder VM.
    async fn run_step(
        &self,
        b: &Builder<QemuVmm>,
        step: StepRef,
        kind: &StepKind,
        st: &StepState,
        archive: &Option<PathBuf>,
    ) -> Result<(), BuildFailure> {
        let t = Instant::now();
        match kind {
            StepKind::Run { cmd, user } => {
                b.say(step, LogLevel::Info, format!("RUN {cmd}"));
                let user = user.as_deref().unwrap_or(&st.user);
                ensure_workdir(b, step, st).await?;
                // bash where the template has it (E2B runs steps with bash; Debian's sh is dash),
                // sh otherwise (small images).
                let q = state::shell_join(std::slice::from_ref(cmd));
                let script = format!(
                    "if [ -x /bin/bash ]; then exec /bin/bash -c {q}; fi; exec /bin/sh -c {q}"
                );
                if let Some(exit) = b
                    .exec(step, &script, user, st.workdir.as_deref(), &st.env, &[])
                    .await?
                {
                    return Err(failure(
                        step,
                        format!(
                            "`{cmd}` exited with {}; last lines:\n{}",
                            exit.code,
                            exit.tail.join("\n")
                        ),
                    ));
                }
            }
            StepKind::Copy {
                src,
                dest,
                owner,
                mode,
                ..
            } => {
                b.say(step, LogLevel::Info, format!("COPY {src} {dest}"));
                let archive = archive.as_ref().expect("planned");
                b.copy(step, archive, src, dest, owner.as_deref(), *mode, st)
                    .await?;
            }
            StepKind::Env { vars } => {
                let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
                b.say(step, LogLevel::Info, format!("ENV {}", names.join(" ")));
            }
            StepKind::Workdir { path } => b.say(step, LogLevel::Info, format!("WORKDIR {path}")),
            StepKind::User { user } => b.say(step, LogLevel::Info, format!("USER {user}")),
        }
        if state::makes_layer(kind) {
            b.say(
                step,
                LogLevel::Debug,
                format!("step done in {:.1} s", t.elapsed().as_secs_f64()),
            );
        }
        Ok(())
    }

    /// Snapshots the builder VM after a step and records the snapshot under `key`.
    async fn cache_layer(
        &self,
        b: &Builder<QemuVmm>,
        step: StepRef,
        key: &str,
    ) -> Result<cache::Entry, BuildFailure> {
        let t = Instant::now();
        let snap_id = format!(
            "layer-{}-{}",
            &key[..16],
            hex::encode(crate::node::random_bytes::<4>())
        );
        let left = b.remaining(step)?;
        let node = b.node.clone();
        let (meta, _) = match tokio::time::timeout(left, node.snapshot(&b.id, &snap_id)).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(failure(
                    step,
                    format!(
                        "snapshotting the builder VM after the step failed: {}",
                        error_chain(&e)
                    ),
                ));
            }
            Err(_) => {
                return Err(failure(
                    step,
                    "snapshotting the builder VM ran past the build's deadline",
                ));
            }
        };
        let dir = crate::snapshots::snapshot_dir(&self.cfg.data_dir, &meta.id);
        let entry = cache::Entry {
            key: key.to_string(),
            snapshot: meta.id.clone(),
            bytes: crate::snapshots::allocated_bytes(&dir),
            created_at_unix_ms: now_ms(),
            used_at_unix_ms: now_ms(),
        };
        // A forced rerun replaces the entry; the old snapshot goes once nothing sits on it.
        if let Some(old) = cache::get(&self.cfg.data_dir, key)
            && old.snapshot != entry.snapshot
        {
            let _ = self.delete_snapshot(&old.snapshot);
        }
        cache::put(&self.cfg.data_dir, &entry).map_err(|e| {
            failure(
                step,
                format!("recording the layer cache entry: {}", error_chain(&e)),
            )
        })?;
        b.say(
            step,
            LogLevel::Debug,
            format!(
                "layer cached in {:.1} s ({} MiB)",
                t.elapsed().as_secs_f64(),
                entry.bytes >> 20
            ),
        );
        Ok(entry)
    }

    /// A cache entry whose snapshot can still be restored; a stale entry is dropped.
    async fn usable_entry(&self, key: &str) -> Option<cache::Entry> {
        let mut e = cache::get(&self.cfg.data_dir, key)?;
        if self.restorable_snapshot(&e.snapshot).await.is_err() {
            cache::remove(&self.cfg.data_dir, key);
            return None;
        }
        e.used_at_unix_ms = now_ms();
        let _ = cache::put(&self.cfg.data_dir, &e);
        Some(e)
    }

    /// Keeps the cache under its cap (never evicting this build's layers).
    fn evict_cache(&self, keep: &[String]) {
        let entries = cache::all(&self.cfg.data_dir);
        for key in cache::to_evict(&entries, cache::CACHE_CAP_BYTES, keep) {
            if let Some(e) = cache::get(&self.cfg.data_dir, &key) {
                cache::remove(&self.cfg.data_dir, &key);
                let _ = self.delete_snapshot(&e.snapshot);
                tracing::info!(key, snapshot_id = %e.snapshot, "layer cache entry evicted");
            }
        }
    }
}

impl<V: Vmm> Node<V> {
    /// An API-built template of this node by key, unless deleted.
    pub(crate) fn built_template(&self, key: &str) -> Result<Arc<Template>, NodeError> {
        if !valid_key(key) || built_dir(&self.cfg.data_dir, key).join(DELETED).exists() {
            return Err(alcove_image::ImageError::UnknownTemplate(key.to_string()).into());
        }
        let t = alcove_image::build::load_template_key(&self.cfg.data_dir, key)?;
        if t.manifest_version != alcove_image::build::manifest_version() {
            return Err(alcove_image::ImageError::UnknownTemplate(key.to_string()).into());
        }
        Ok(Arc::new(t))
    }

    /// Any template by key, deleted API-built ones included (what existing sandboxes and
    /// snapshots were made from).
    pub(crate) fn template_by_key(&self, key: &str) -> Result<Template, NodeError> {
        match alcove_image::build::load_template_key(&self.cfg.cache_dir, key) {
            Ok(t) => Ok(t),
            Err(e) => alcove_image::build::load_template_key(&self.cfg.data_dir, key)
                .map_err(|_| e.into()),
        }
    }

    /// Marks an API-built template deleted: no new sandbox or build uses it; its files go once
    /// no sandbox (running or paused) and no snapshot references it. Sandboxes keep running.
    pub fn delete_template(&self, key: &str) -> Result<(), NodeError> {
        let dir = built_dir(&self.cfg.data_dir, key);
        if !valid_key(key) || !dir.join("manifest.json").exists() {
            return Err(alcove_image::ImageError::UnknownTemplate(key.to_string()).into());
        }
        crate::private::write_file(&dir.join(DELETED), b"")
            .map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
        self.templates.lock().expect("templates lock").remove(key);
        tracing::info!(template_key = key, "template deleted");
        self.collect_templates();
        Ok(())
    }

    /// Keys of the API-built templates this node has, whole and not deleted (a cluster's
    /// control plane places sandboxes and builds from them here).
    pub fn built_templates(&self) -> Vec<String> {
        let root = built_root(&self.cfg.data_dir);
        let mut keys: Vec<String> = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let dir = e.path();
                dir.join("manifest.json").exists() && !dir.join(DELETED).exists()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|k| valid_key(k))
            .collect();
        keys.sort();
        keys
    }

    /// Removes the files of deleted API-built templates nothing references any more.
    pub fn collect_templates(&self) -> Vec<String> {
        let root = built_root(&self.cfg.data_dir);
        let Ok(rd) = std::fs::read_dir(&root) else {
            return Vec::new();
        };
        let deleted: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join(DELETED).exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if deleted.is_empty() {
            return Vec::new();
        }
        let mut used: std::collections::HashSet<String> =
            self.list().into_iter().map(|i| i.template_key).collect();
        used.extend(self.snapshots().into_iter().map(|m| m.template_key));
        let mut gone = Vec::new();
        for key in deleted {
            if used.contains(&key) {
                continue;
            }
            let dir = root.join(&key);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(template_key = %key, "deleted template's files collected");
                    gone.push(key);
                }
                Err(e) => {
                    tracing::warn!(template_key = %key, error = %e, "removing a deleted template")
                }
            }
        }
        gone
    }

    /// At open: template dirs a crash left half-built (no manifest) are removed.
    pub(crate) fn remove_half_built(&self) {
        let root = built_root(&self.cfg.data_dir);
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let dir = e.path();
            let builder = std::fs::read_to_string(dir.join(finalize::BUILDING))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if builder.is_some_and(crate::node::other_alcove_process_alive) {
                continue;
            }
            if dir.is_dir() && !dir.join("manifest.json").exists() {
                tracing::warn!(dir = %dir.display(), "removing a template a crash left half-built");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

pub(crate) fn built_root(data_dir: &Path) -> PathBuf {
    data_dir.join("templates")
}

pub(crate) fn built_dir(data_dir: &Path, key: &str) -> PathBuf {
    built_root(data_dir).join(key)
}

pub(crate) fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 64 && key.chars().all(|c| c.is_ascii_hexdigit())
}

fn read_record(dir: &Path) -> Option<BuildRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(BUILD_RECORD)).ok()?).ok()
}

fn built(t: &Template, cached_steps: u32) -> BuiltTemplate {
    BuiltTemplate {
        key: t.key.clone(),
        vcpus: t.recipe.vcpus,
        memory_mib: t.recipe.memory_mib,
        disk_mib: t.recipe.disk_mib,
        cached_steps,
        stored_bytes: crate::node::allocated_bytes(&t.dir),
    }
}

/// `WORKDIR` takes effect when a step runs in it: created (owned by the step's user) if missing.
async fn ensure_workdir(
    b: &Builder<QemuVmm>,
    step: StepRef,
    st: &StepState,
) -> Result<(), BuildFailure> {
    let Some(w) = &st.workdir else {
        return Ok(());
    };
    b.exec_ok(
        step,
        "creating the WORKDIR",
        r#"[ -d "$ALCOVE_DIR" ] || { mkdir -p "$ALCOVE_DIR" && chown "$ALCOVE_USER:$(id -gn "$ALCOVE_USER")" "$ALCOVE_DIR"; }"#,
        "root",
        Some("/"),
        &[("ALCOVE_DIR", w.clone()), ("ALCOVE_USER", st.user.clone())],
    )
    .await
}

/// Every key of the build, computed before anything runs (COPY archives are hashed here, and a
/// missing one fails the build at once).
async fn plan(spec: &BuildSpec, parent: &Parent) -> Result<Plan, BuildFailure> {
    let mut key = state::base_key(&parent.template.key);
    let mut st = parent.state.clone();
    let mut keys = Vec::new();
    let mut states = Vec::new();
    let mut archives = Vec::new();
    for (i, step) in spec.steps.iter().enumerate() {
        let step_ref = StepRef::Step(i as u32 + 1);
        let (archive, sha) = match &step.kind {
            StepKind::Copy { files_hash, .. } => {
                let path = run::archive_path(&spec.files_dir, files_hash, step_ref)?;
                let p = path.clone();
                let sha = crate::node::blocking(move || alcove_image::build::sha256_file(&p))
                    .await
                    .map_err(|e| {
                        failure(
                            step_ref,
                            format!("reading the files of COPY: {}", error_chain(&e)),
                        )
                    })?;
                (Some(path), Some(sha))
            }
            _ => (None, None),
        };
        key = state::step_key(&key, step, &st, sha.as_deref());
        states.push(st.clone());
        st = st.after(&step.kind);
        keys.push(key.clone());
        archives.push(archive);
    }
    let start_cmd = spec.start_cmd.clone().or_else(|| parent.start_cmd.clone());
    let template_json = state::template_json(&st, start_cmd.as_deref(), spec.ready_cmd.as_deref());
    let finalize_key = state::finalize_key(&key, &template_json);
    let forced_from = if spec.force {
        0
    } else {
        spec.steps
            .iter()
            .position(|s| s.force)
            .unwrap_or(usize::MAX)
    };
    let nonce = (forced_from != usize::MAX).then_some(spec.build_id.as_str());
    let template_key = state::template_key(&finalize_key, spec.vcpus, spec.memory_mib, nonce);
    Ok(Plan {
        keys,
        states,
        archives,
        final_state: st,
        start_cmd,
        template_json,
        finalize_key,
        template_key,
        forced_from,
    })
}
