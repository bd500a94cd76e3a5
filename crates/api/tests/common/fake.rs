//! A fake [`SandboxBackend`] for the API's tests and the SDK-suite dev server: VMs are map
//! entries; `forward` answers like a tiny echo server. Never used outside tests.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use alcove_api::{
    BackendError, Body, BoxFuture, BuildFailure, BuildLog, BuildLogEntry, BuildSpec, BuiltTemplate,
    CreateSandbox, Keep, LiveSandbox, ResourceUsage, SandboxBackend, SandboxStatus, StartedSandbox,
    StepKind, StepRef, TemplateInfo,
};

/// Port on which the fake answers "nothing listens here".
pub const CLOSED_PORT: u16 = 1234;

#[derive(Default)]
pub struct FakeBackend {
    pub vms: Mutex<HashMap<String, CreateSandbox>>,
    /// Why each VM that disappeared did so.
    pub exited: Mutex<HashMap<String, String>>,
    pub fail_creates: AtomicBool,
    pub create_delay: Mutex<Duration>,
    /// Sandboxes whose VM is paused (saved, not running).
    pub paused: Mutex<HashSet<String>>,
    /// Paused sandboxes whose saved state fails its checksum.
    pub corrupt: Mutex<HashSet<String>>,
    /// Each pause and resume, in order: (sandbox, what was kept or resumed from).
    pub persist_calls: Mutex<Vec<(String, &'static str, Keep)>>,
    /// Snapshots: the VM config each was taken from.
    pub snapshots: Mutex<HashMap<String, CreateSandbox>>,
    /// Sandboxes whose calls never answer (a hung VM or backend): kill, status, metrics,
    /// pause, resume, snapshot and forward stay pending forever.
    pub hung: Mutex<HashSet<String>>,
    /// Sandboxes whose egress rules cannot be read (`network` fails).
    pub network_unreadable: Mutex<HashSet<String>>,
    /// Whether `update_network` applies rules (off: refused as unsupported, as by a backend
    /// without per-sandbox networks).
    pub network_updates: AtomicBool,
    /// How long a resume takes (quota races).
    pub resume_delay: Mutex<Duration>,
    /// Bytes each paused sandbox and each snapshot holds on the fake disk.
    pub bytes_per_saved_state: std::sync::atomic::AtomicU64,
    /// Template builds asked for, in order.
    pub builds: Mutex<Vec<BuildSpec>>,
    /// How long each fake build takes.
    pub build_delay: Mutex<Duration>,
    /// Built template keys given back with `delete_template`.
    pub deleted_templates: Mutex<Vec<String>>,
}

impl FakeBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a VM dying underneath the server.
    pub fn crash(&self, id: &str, reason: &str) {
        self.vms.lock().unwrap().remove(id);
        self.exited.lock().unwrap().insert(id.into(), reason.into());
    }

    /// The hang switch: every later call about `id` stays pending until [`Self::unhang`].
    pub fn hang(&self, id: &str) {
        self.hung.lock().unwrap().insert(id.into());
    }

    pub fn unhang(&self, id: &str) {
        self.hung.lock().unwrap().remove(id);
    }

    /// Never returns while `id` is hung; the caller's deadline has to cut it off.
    async fn answer(&self, id: &str) {
        while self.hung.lock().unwrap().contains(id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn env_of(&self, id: &str) -> Option<HashMap<String, String>> {
        self.vms
            .lock()
            .unwrap()
            .get(id)
            .map(|vm| vm.env_vars.clone().into_iter().collect())
    }
}

pub fn templates() -> Vec<TemplateInfo> {
    vec![
        TemplateInfo {
            template_id: "tpl-base-0001".into(),
            aliases: vec!["base".into()],
            build_id: "6f1c2b1e-8a4b-4c3d-9e8f-0a1b2c3d4e5f".into(),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 2048,
            envd_version: "0.2.0".into(),
            build_key: None,
        },
        TemplateInfo {
            template_id: "tpl-ci-0001".into(),
            aliases: vec!["code-interpreter-v1".into()],
            build_id: "sha256-feedface".into(),
            cpu_count: 2,
            memory_mb: 1024,
            disk_size_mb: 4096,
            envd_version: "0.2.0".into(),
            build_key: None,
        },
    ]
}

/// A fake build's key: what the steps say, so an unchanged build is the same template.
fn fake_key(spec: &BuildSpec) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!(
        "{:?}{:?}{:?}{:?}",
        spec.from, spec.steps, spec.start_cmd, spec.ready_cmd
    )
    .hash(&mut h);
    format!("{:016x}", h.finish())
}

impl SandboxBackend for FakeBackend {
    /// Logs a line per step; `RUN exit N` (N > 0) fails that step; a `COPY` needs its upload.
    fn build_template(
        &self,
        spec: BuildSpec,
        log: BuildLog,
    ) -> BoxFuture<'_, Result<BuiltTemplate, BuildFailure>> {
        Box::pin(async move {
            self.builds.lock().unwrap().push(spec.clone());
            let delay = *self.build_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            for (i, step) in spec.steps.iter().enumerate() {
                let at = StepRef::Step(i as u32 + 1);
                log(BuildLogEntry {
                    level: alcove_api::BuildLogLevel::Info,
                    step: at,
                    message: format!("step {}: {:?}", i + 1, step.kind),
                });
                match &step.kind {
                    StepKind::Run { cmd, .. } if cmd.starts_with("exit ") && cmd != "exit 0" => {
                        return Err(BuildFailure {
                            step: at,
                            message: format!("`{cmd}` exited with {}", &cmd[5..]),
                        });
                    }
                    StepKind::Copy { files_hash, .. }
                        if !spec.files_dir.join(files_hash).is_file() =>
                    {
                        return Err(BuildFailure {
                            step: at,
                            message: format!("files {files_hash} are missing"),
                        });
                    }
                    _ => {}
                }
            }
            Ok(BuiltTemplate {
                key: fake_key(&spec),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                disk_mib: 2048,
                cached_steps: 0,
                stored_bytes: 1000,
            })
        })
    }

    fn delete_template<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.deleted_templates.lock().unwrap().push(key.to_owned());
            Ok(())
        })
    }

    fn templates(&self) -> BoxFuture<'_, Result<Vec<TemplateInfo>, BackendError>> {
        Box::pin(async { Ok(templates()) })
    }

    fn create(&self, req: CreateSandbox) -> BoxFuture<'_, Result<StartedSandbox, BackendError>> {
        Box::pin(async move {
            let delay = *self.create_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if self.fail_creates.load(Ordering::SeqCst) {
                return Err(BackendError::Failed {
                    op: "restore snapshot",
                    source: "qemu exited with status 1".into(),
                });
            }
            let mut req = req;
            if let Some(snap) = &req.snapshot_id {
                let parent = self
                    .snapshots
                    .lock()
                    .unwrap()
                    .get(snap)
                    .cloned()
                    .ok_or(BackendError::SnapshotNotFound)?;
                let mut env = parent.env_vars.clone();
                env.extend(req.env_vars.clone());
                req.env_vars = env;
            }
            let started = StartedSandbox {
                cpu_count: req.cpu_count,
                memory_mb: req.memory_mb,
                disk_size_mb: 2048,
                envd_version: "0.2.0".into(),
                started_at: SystemTime::now(),
            };
            self.vms.lock().unwrap().insert(req.sandbox_id.clone(), req);
            Ok(started)
        })
    }

    fn kill<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.answer(sandbox_id).await;
            match self.vms.lock().unwrap().remove(sandbox_id) {
                Some(_) => {
                    self.exited
                        .lock()
                        .unwrap()
                        .insert(sandbox_id.into(), "killed".into());
                    Ok(())
                }
                None => Err(BackendError::SandboxNotFound),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveSandbox>, BackendError>> {
        Box::pin(async move {
            Ok(self
                .vms
                .lock()
                .unwrap()
                .keys()
                .map(|id| LiveSandbox {
                    sandbox_id: id.clone(),
                    paused: self.paused.lock().unwrap().contains(id),
                })
                .collect())
        })
    }

    fn status<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<SandboxStatus, BackendError>> {
        Box::pin(async move {
            self.answer(sandbox_id).await;
            if self.vms.lock().unwrap().contains_key(sandbox_id) {
                if self.paused.lock().unwrap().contains(sandbox_id) {
                    return Ok(SandboxStatus::Paused);
                }
                return Ok(SandboxStatus::Running);
            }
            Ok(match self.exited.lock().unwrap().get(sandbox_id) {
                Some(reason) => SandboxStatus::Exited {
                    reason: reason.clone(),
                },
                None => SandboxStatus::Unknown,
            })
        })
    }

    fn metrics<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceUsage>, BackendError>> {
        Box::pin(async move {
            self.answer(sandbox_id).await;
            let vms = self.vms.lock().unwrap();
            let vm = vms.get(sandbox_id).ok_or(BackendError::SandboxNotFound)?;
            Ok(Some(ResourceUsage {
                timestamp: SystemTime::now(),
                cpu_count: vm.cpu_count,
                cpu_used_pct: 1.5,
                mem_used: 64 << 20,
                mem_total: (vm.memory_mb as u64) << 20,
                mem_cache: 8 << 20,
                disk_used: 100 << 20,
                disk_total: 2048 << 20,
            }))
        })
    }

    fn pause<'a>(
        &'a self,
        sandbox_id: &'a str,
        keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.answer(sandbox_id).await;
            self.persist_calls
                .lock()
                .unwrap()
                .push((sandbox_id.to_owned(), "pause", keep));
            if !self.vms.lock().unwrap().contains_key(sandbox_id) {
                return Err(BackendError::SandboxNotFound);
            }
            if !self.paused.lock().unwrap().insert(sandbox_id.to_owned()) {
                return Err(BackendError::WrongState {
                    state: "paused".into(),
                });
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
            self.answer(sandbox_id).await;
            self.persist_calls
                .lock()
                .unwrap()
                .push((sandbox_id.to_owned(), "resume", from));
            let delay = *self.resume_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            if !self.vms.lock().unwrap().contains_key(sandbox_id) {
                return Err(BackendError::SandboxNotFound);
            }
            if self.corrupt.lock().unwrap().contains(sandbox_id) {
                return Err(BackendError::CorruptSnapshot {
                    detail: "checksum mismatch".into(),
                });
            }
            if !self.paused.lock().unwrap().remove(sandbox_id) {
                return Err(BackendError::WrongState {
                    state: "running".into(),
                });
            }
            Ok(())
        })
    }

    fn update_network<'a>(
        &'a self,
        sandbox_id: &'a str,
        network: alcove_net::NetworkConfig,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            if !self.network_updates.load(Ordering::SeqCst) {
                return Err(BackendError::Unsupported {
                    op: "network update",
                });
            }
            match self.vms.lock().unwrap().get_mut(sandbox_id) {
                Some(vm) => {
                    vm.network = network;
                    Ok(())
                }
                None => Err(BackendError::SandboxNotFound),
            }
        })
    }

    fn network<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<alcove_net::NetworkConfig>, BackendError>> {
        Box::pin(async move {
            if self.network_unreadable.lock().unwrap().contains(sandbox_id) {
                return Err(BackendError::Failed {
                    op: "network rules",
                    source: "record.json unreadable".into(),
                });
            }
            Ok(self
                .vms
                .lock()
                .unwrap()
                .get(sandbox_id)
                .map(|vm| vm.network.clone()))
        })
    }

    fn snapshot<'a>(
        &'a self,
        sandbox_id: &'a str,
        snapshot_id: &'a str,
        keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.answer(sandbox_id).await;
            self.persist_calls
                .lock()
                .unwrap()
                .push((sandbox_id.to_owned(), "snapshot", keep));
            let vm = self
                .vms
                .lock()
                .unwrap()
                .get(sandbox_id)
                .cloned()
                .ok_or(BackendError::SandboxNotFound)?;
            self.snapshots
                .lock()
                .unwrap()
                .insert(snapshot_id.to_owned(), vm);
            Ok(())
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.snapshots
                .lock()
                .unwrap()
                .remove(snapshot_id)
                .map(|_| ())
                .ok_or(BackendError::SnapshotNotFound)
        })
    }

    fn stored_bytes<'a>(
        &'a self,
        sandbox_ids: &'a [String],
        snapshot_ids: &'a [String],
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            let paused = self.paused.lock().unwrap();
            let snaps = self.snapshots.lock().unwrap();
            let n = sandbox_ids.iter().filter(|id| paused.contains(*id)).count()
                + snapshot_ids
                    .iter()
                    .filter(|id| snaps.contains_key(*id))
                    .count();
            Ok(n as u64 * self.bytes_per_saved_state.load(Ordering::SeqCst))
        })
    }

    fn forward<'a>(
        &'a self,
        sandbox_id: &'a str,
        port: u16,
        req: http::Request<Body>,
    ) -> BoxFuture<'a, Result<http::Response<Body>, BackendError>> {
        Box::pin(async move {
            self.answer(sandbox_id).await;
            if !self.vms.lock().unwrap().contains_key(sandbox_id)
                || self.paused.lock().unwrap().contains(sandbox_id)
            {
                return Err(BackendError::SandboxNotFound);
            }
            if port == CLOSED_PORT {
                return Err(BackendError::PortNotOpen);
            }
            if req.headers().contains_key("upgrade") {
                // An echo "protocol" after a 101, as a WebSocket server in a sandbox would do.
                let on = hyper::upgrade::on(http::Request::from_parts(req.into_parts().0, ()));
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let mut io = hyper_util::rt::TokioIo::new(up);
                        let (mut r, mut w) = tokio::io::split(&mut io);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                return Ok(http::Response::builder()
                    .status(101)
                    .header("upgrade", "echo")
                    .header("connection", "upgrade")
                    .body(Body::empty())
                    .unwrap());
            }
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let echo = serde_json::json!({
                "sandbox": sandbox_id,
                "port": port,
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "routingHeaders": parts.headers.contains_key("e2b-sandbox-id"),
                "trafficHeader": parts.headers.contains_key("e2b-traffic-access-token"),
                "apiKeyHeader": parts.headers.contains_key("x-api-key"),
                "accessTokenHeader": parts.headers.contains_key("x-access-token"),
                "authorization": parts.headers.get("authorization")
                    .and_then(|v| v.to_str().ok()),
                "bodyLen": body.len(),
                "body": (body.len() <= 4096).then(|| String::from_utf8_lossy(&body).into_owned()),
            });
            Ok(http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from(echo.to_string()))
                .unwrap())
        })
    }
}
