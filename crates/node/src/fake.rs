//! An in-memory VMM and host network for the node's unit tests: no QEMU, no KVM, no root.
//!
//! A fake VM is a pid from a counter (above any real pid), a `qemu.pid` file, and a fake agent
//! served on the VM's `agent.sock`: the session marker, then HTTP/2 answering `/init` and
//! `/health` with 204 and `process.Start` with a command that exits 0, so the node's real agent
//! path (`AgentClient` over the unix socket) runs.
//! Saves write a small file; restores read the one they are given. VMs are registered by run dir
//! in the [`FakeVmm`] (clones share it), so a second `Node::open` re-attaches them the way it
//! re-attaches QEMU processes that outlived their node. Tests crash VMs and inject faults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use alcove_net::{EgressConfig, NetStats, NetworkConfig, RuleError};
use alcove_vmm::console::Console;
use alcove_vmm::{ExitReason, RestoreTimings, Vm, VmSpec, Vmm, VmmError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::NodeError;
use crate::host::{Egress, EgressSockets, HostNetwork, Sockets};

/// What every fake VM of one [`FakeVmm`] shares.
#[derive(Default)]
struct Host {
    vms: Mutex<HashMap<PathBuf, FakeVm>>,
    next_pid: AtomicU32,
    /// The next save fails because the VM dies in the middle of it.
    crash_on_save: AtomicBool,
    /// Restores take this long (ms), so tests can see how many run at once.
    restore_ms: AtomicU32,
    restoring: AtomicU32,
    most_restoring: AtomicU32,
}

#[derive(Clone, Default)]
pub(crate) struct FakeVmm {
    host: Arc<Host>,
}

impl std::fmt::Debug for FakeVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeVmm")
    }
}

impl FakeVmm {
    /// The VM last started (or attached) in `run_dir`.
    pub(crate) fn vm_in(&self, run_dir: &Path) -> Option<FakeVm> {
        self.host.vms.lock().unwrap().get(run_dir).cloned()
    }

    /// Makes the next [`Vm::save`] (pause, snapshot) find the VM dying under it.
    pub(crate) fn crash_on_next_save(&self) {
        self.host.crash_on_save.store(true, Ordering::SeqCst);
    }

    /// Makes every restore take `ms` milliseconds.
    pub(crate) fn slow_restores(&self, ms: u32) {
        self.host.restore_ms.store(ms, Ordering::SeqCst);
    }

    /// The most restores that were running at one time.
    pub(crate) fn most_restoring(&self) -> u32 {
        self.host.most_restoring.load(Ordering::SeqCst)
    }

    async fn restoring(&self, spec: &VmSpec, state_file: &Path) -> Result<FakeVm, VmmError> {
        let h = &self.host;
        let now = h.restoring.fetch_add(1, Ordering::SeqCst) + 1;
        h.most_restoring.fetch_max(now, Ordering::SeqCst);
        let ms = h.restore_ms.load(Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(ms.into())).await;
        h.restoring.fetch_sub(1, Ordering::SeqCst);
        self.start(spec, Some(state_file))
    }

    fn start(&self, spec: &VmSpec, state_file: Option<&Path>) -> Result<FakeVm, VmmError> {
        if let Some(f) = state_file {
            let bytes = std::fs::read(f).map_err(|e| VmmError::Io(f.display().to_string(), e))?;
            if !bytes.starts_with(b"fake-state") {
                return Err(VmmError::Migration {
                    what: "restore",
                    detail: "not a fake VM state".into(),
                });
            }
        }
        if spec.ram_shared && !spec.ram_file.exists() {
            crate::private::write_file(&spec.ram_file, b"fake ram")
                .map_err(|e| VmmError::Io(spec.ram_file.display().to_string(), e))?;
        }
        let pid = 10_000_000 + self.host.next_pid.fetch_add(1, Ordering::SeqCst);
        let run_dir = spec.run_dir.clone();
        let pid_file = run_dir.join("qemu.pid");
        crate::private::write_file(&pid_file, pid.to_string().as_bytes())
            .map_err(|e| VmmError::Io(pid_file.display().to_string(), e))?;
        let vm = FakeVm {
            inner: Arc::new(Inner {
                pid,
                run_dir: run_dir.clone(),
                console: Console::default(),
                exit: watch::channel(None).0,
                agent: Mutex::new(None),
                host: self.host.clone(),
            }),
        };
        vm.serve_agent()?;
        self.host.vms.lock().unwrap().insert(run_dir, vm.clone());
        Ok(vm)
    }
}

impl Vmm for FakeVmm {
    type Vm = FakeVm;

    async fn boot(&self, spec: &VmSpec) -> Result<FakeVm, VmmError> {
        self.start(spec, None)
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        state_file: &Path,
    ) -> Result<(FakeVm, RestoreTimings), VmmError> {
        Ok((
            self.restoring(spec, state_file).await?,
            RestoreTimings::default(),
        ))
    }

    async fn restore_full(
        &self,
        spec: &VmSpec,
        state_file: &Path,
    ) -> Result<(FakeVm, RestoreTimings), VmmError> {
        Ok((
            self.restoring(spec, state_file).await?,
            RestoreTimings::default(),
        ))
    }

    async fn restore_stopped(&self, spec: &VmSpec, state_file: &Path) -> Result<FakeVm, VmmError> {
        self.start(spec, Some(state_file))
    }

    async fn attach(&self, run_dir: &Path) -> Result<FakeVm, VmmError> {
        self.vm_in(run_dir).ok_or_else(|| {
            VmmError::Io(
                run_dir.join("qemu.pid").display().to_string(),
                std::io::Error::other("no such fake VM"),
            )
        })
    }
}

struct Inner {
    pid: u32,
    run_dir: PathBuf,
    console: Console,
    exit: watch::Sender<Option<ExitReason>>,
    /// The fake agent's accept loop (its connections die with it).
    agent: Mutex<Option<tokio::task::AbortHandle>>,
    host: Arc<Host>,
}

#[derive(Clone)]
pub(crate) struct FakeVm {
    inner: Arc<Inner>,
}

impl FakeVm {
    /// The VM process ends on its own (a crash: SIGSEGV).
    pub(crate) fn crash(&self) {
        self.exit(ExitReason::Exited {
            code: None,
            signal: Some(11),
        });
    }

    fn exit(&self, reason: ExitReason) {
        if let Some(a) = self.inner.agent.lock().unwrap().take() {
            a.abort();
        }
        let _ = std::fs::remove_file(self.agent_socket());
        self.inner.exit.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    fn died(&self, stage: &'static str) -> VmmError {
        VmmError::DiedDuring {
            stage,
            reason: self.exit_reason().unwrap_or(ExitReason::GuestShutdown),
            console: String::new(),
        }
    }

    /// A minimal agent on `agent.sock`: the session marker, then HTTP/2 with `/init` and
    /// `/health` answered 204.
    fn serve_agent(&self) -> Result<(), VmmError> {
        let path = self.agent_socket();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| VmmError::Io(path.display().to_string(), e))?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    if stream
                        .write_all(alcove_envd_proto::CHANNEL_SESSION_MARKER)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let path = req.uri().path().to_string();
                            let _ = BodyExt::collect(req.into_body()).await;
                            let (status, body) = match path.as_str() {
                                "/init" | "/health" => (http::StatusCode::NO_CONTENT, Bytes::new()),
                                "/process.Process/Start" => (http::StatusCode::OK, exited_ok()),
                                _ => (http::StatusCode::NOT_FOUND, Bytes::new()),
                            };
                            let mut resp = http::Response::new(Full::new(body));
                            *resp.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        *self.inner.agent.lock().unwrap() = Some(task.abort_handle());
        Ok(())
    }
}

/// A `process.Start` stream in which the command exits 0 at once (the warm pool's warm-up).
fn exited_ok() -> Bytes {
    use alcove_envd_proto::connect::{Codec, encode_end_stream, encode_message};
    use alcove_envd_proto::process::{ProcessEvent, StartResponse, process_event};
    let end = StartResponse {
        event: Some(ProcessEvent {
            event: Some(process_event::Event::End(process_event::EndEvent {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None,
            })),
        }),
    };
    let mut b = encode_message(Codec::Proto, &end).to_vec();
    b.extend_from_slice(&encode_end_stream(None));
    Bytes::from(b)
}

impl Vm for FakeVm {
    fn pid(&self) -> u32 {
        self.inner.pid
    }

    fn agent_socket(&self) -> PathBuf {
        self.inner.run_dir.join("agent.sock")
    }

    fn console(&self) -> &Console {
        &self.inner.console
    }

    async fn snapshot(&self, state_file: &Path) -> Result<(), VmmError> {
        self.save(state_file, true).await
    }

    async fn save(&self, state_file: &Path, _ignore_shared: bool) -> Result<(), VmmError> {
        if self.inner.host.crash_on_save.swap(false, Ordering::SeqCst) {
            self.crash();
        }
        if self.exit_reason().is_some() {
            return Err(self.died("snapshot"));
        }
        // QEMU writes with the server's umask (077): owner-only, as here.
        crate::private::write_file(
            state_file,
            format!("fake-state of VM {}", self.inner.pid).as_bytes(),
        )
        .map_err(|e| VmmError::Io(state_file.display().to_string(), e))
    }

    async fn resume(&self) -> Result<(), VmmError> {
        match self.exit_reason() {
            Some(_) => Err(self.died("resume")),
            None => Ok(()),
        }
    }

    async fn ensure_running(&self) -> Result<(), VmmError> {
        self.resume().await
    }

    async fn resume_after_io_error(&self) -> Result<bool, VmmError> {
        Ok(false)
    }

    fn set_cpu_weight(&self, _weight: u32) -> std::io::Result<()> {
        Ok(())
    }

    async fn kill(&self) {
        self.exit(ExitReason::Exited {
            code: None,
            signal: Some(9),
        });
    }

    async fn wait_exit(&self) -> ExitReason {
        let mut rx = self.inner.exit.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return ExitReason::GuestShutdown;
            }
        }
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        self.inner.exit.borrow().clone()
    }
}

/// No namespaces; egress "served" by an inert service that keeps its rules.
#[derive(Debug, Default)]
pub(crate) struct FakeNetwork;

#[derive(Debug)]
struct FakeSockets;

#[derive(Debug, Default)]
struct FakeEgress {
    network: Mutex<NetworkConfig>,
    stopped: AtomicBool,
}

impl HostNetwork for FakeNetwork {
    fn create(
        &self,
        listen: bool,
    ) -> std::io::Result<(Option<Arc<std::os::fd::OwnedFd>>, Option<EgressSockets>)> {
        Ok((None, listen.then(|| Box::new(FakeSockets) as EgressSockets)))
    }

    fn of_pid(&self, _pid: u32) -> std::io::Result<EgressSockets> {
        Ok(Box::new(FakeSockets))
    }
}

impl Sockets for FakeSockets {
    fn serve(
        self: Box<Self>,
        _egress: Arc<EgressConfig>,
        _id: &str,
        network: NetworkConfig,
        _ca: Option<Arc<alcove_net::egress::SandboxCa>>,
    ) -> Result<Arc<dyn Egress>, NodeError> {
        Ok(Arc::new(FakeEgress {
            network: Mutex::new(network),
            stopped: AtomicBool::new(false),
        }))
    }
}

impl Egress for FakeEgress {
    fn update(&self, network: NetworkConfig) -> Result<(), RuleError> {
        *self.network.lock().unwrap() = network;
        Ok(())
    }

    fn stats(&self) -> NetStats {
        NetStats::default()
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}
