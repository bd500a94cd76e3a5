//! The QEMU implementation of [`Vmm`]: `-M microvm,acpi=off` with virtio-mmio devices, guest RAM in
//! a file (shared for template boots, copy-on-write for restores), QMP on a unix socket.
//!
//! QEMU runs in its own session so that a VM outlives the process that started it (the CLI, or a
//! server being restarted); [`QemuVmm::attach`] picks a running VM up again from its run dir.
//!
//! Every VM runs in a [`Jail`] (own uid, minimal mount namespace, no capabilities) unless the
//! jail was switched off for development. A jailed QEMU sees only its run dir read-write, so
//! migration streams for paths elsewhere are written there and moved into place afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use crate::accel::{Accel, AccelChoice};
use crate::cgroup::VmCgroup;
use crate::console::Console;
use crate::jail::{Jail, JailConfig};
use crate::qmp::Qmp;
use crate::{ExitReason, RestoreTimings, Vm, VmSpec, Vmm, VmmError};

/// Bound on single QMP commands; migration itself is polled under [`MIGRATION_TIMEOUT`].
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct QemuVmm {
    pub binary: PathBuf,
    pub accel: AccelChoice,
    pub tsc_khz: u64,
    /// `None` runs QEMU unjailed, as root (development only; see [`QemuVmm::without_jail`]).
    pub jail: Option<Arc<Jail>>,
    /// Run a VM whose cgroup caps cannot be applied (with a warning) instead of refusing it.
    pub allow_uncapped: bool,
}

impl QemuVmm {
    /// A QEMU driver whose VMs are jailed with the default uid range.
    pub fn new(accel: AccelChoice) -> QemuVmm {
        QemuVmm {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel,
            tsc_khz: crate::accel::host_tsc_khz(),
            jail: Some(Arc::new(Jail::new(JailConfig::default()))),
            allow_uncapped: false,
        }
    }

    /// The same driver jailing with `cfg`'s uid range.
    pub fn with_jail(mut self, cfg: JailConfig) -> QemuVmm {
        self.jail = Some(Arc::new(Jail::new(cfg)));
        self
    }

    /// The same driver running QEMU as root, unconfined but for its seccomp filter: for
    /// development and before/after measurements only.
    pub fn without_jail(mut self) -> QemuVmm {
        self.jail = None;
        self
    }

    /// The full QEMU argument list for `spec`.
    pub fn args(&self, spec: &VmSpec, incoming: bool) -> Vec<String> {
        let run = &spec.run_dir;
        let mut cmdline =
            String::from("console=ttyS0 quiet root=/dev/vda rw rootfstype=ext4 reboot=t panic=-1");
        if self.accel.accel == Accel::Tcg {
            cmdline.push_str(&format!(
                " tsc_early_khz={} tsc=reliable no_timer_check",
                self.tsc_khz
            ));
        }
        if !spec.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.cmdline);
        }
        let (accel, cpu) = match self.accel.accel {
            Accel::Kvm => ("kvm".to_string(), "host"),
            // tb-size bounds the translated-code cache (QEMU's default is up to 1 GiB).
            Accel::Tcg => (
                format!(
                    "tcg,thread={},tb-size=128",
                    if spec.vcpus > 1 { "multi" } else { "single" }
                ),
                "max",
            ),
        };
        let disk = &spec.disk;
        let mut args: Vec<String> = [
            "-M",
            "microvm,acpi=off,x-option-roms=off,memory-backend=mem",
            "-accel",
            &accel,
            "-cpu",
            cpu,
            "-smp",
            &spec.vcpus.to_string(),
            "-m",
            &format!("{}M", spec.mem_mib),
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}{}",
                spec.mem_mib,
                spec.ram_file.display(),
                if spec.ram_shared { "on" } else { "off" },
                // A jailed QEMU may only read a private RAM file (it is mounted read-only): open
                // it read-only, still mapped as writable private RAM. The same machine as
                // without (migration streams and template keys do not change).
                if self.jail.is_some() && !spec.ram_shared {
                    ",readonly=on,rom=off"
                } else {
                    ""
                }
            ),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // QEMU confines itself with seccomp: no exec, no privilege changes, no new namespaces.
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel",
            &spec.kernel.display().to_string(),
            "-append",
            &cmdline,
            "-chardev",
            &format!("socket,id=con,path={},server=on,wait=off", run.join("console.sock").display()),
            "-serial",
            "chardev:con",
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", run.join("agent.sock").display()),
            "-device",
            &format!("virtserialport,chardev=agent,name={}", spec.agent_port),
            "-blockdev",
            &format!(
                "node-name=disk0,driver={},file.driver=file,file.filename={},read-only={},discard=unmap",
                disk.format.as_str(),
                disk.path.display(),
                if disk.read_only { "on" } else { "off" }
            ),
            "-device",
            "virtio-blk-device,drive=disk0",
            "-device",
            "virtio-rng-device",
            "-qmp",
            &format!("unix:{},server=on,wait=off", run.join("qmp.sock").display()),
            "-pidfile",
            &run.join("qemu.pid").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(nic) = &spec.nic {
            args.push("-netdev".into());
            args.push(format!(
                "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
                nic.tap
            ));
            args.push("-device".into());
            args.push(format!("virtio-net-device,netdev=net0,mac={}", nic.mac));
        }
        if incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        args
    }

    async fn spawn(
        &self,
        spec: &VmSpec,
        incoming: Option<&Path>,
    ) -> Result<(QemuVm, Duration), VmmError> {
        let t0 = Instant::now();
        let jail = match &self.jail {
            Some(jail) => {
                let ids = jail.allocate()?;
                match jail.prepare(ids, spec, &self.binary, self.accel.accel, incoming) {
                    Ok(prepared) => Some((jail.clone(), Arc::new(prepared))),
                    Err(e) => {
                        jail.release(ids.uid);
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let release = |jail: &Option<(Arc<Jail>, Arc<crate::jail::Prepared>)>| {
            if let Some((j, p)) = jail {
                j.release(p.ids().uid);
            }
        };
        let result = self.spawn_jailed(spec, incoming, t0, &jail).await;
        if result.is_err() {
            release(&jail);
        }
        result
    }

    async fn spawn_jailed(
        &self,
        spec: &VmSpec,
        incoming: Option<&Path>,
        t0: Instant,
        jail: &Option<(Arc<Jail>, Arc<crate::jail::Prepared>)>,
    ) -> Result<(QemuVm, Duration), VmmError> {
        let stderr_path = spec.run_dir.join("qemu.log");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| VmmError::Io(stderr_path.display().to_string(), e))?;
        let program = match jail {
            Some((_, p)) => p.binary().to_path_buf(),
            None => self.binary.clone(),
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(self.args(spec, incoming.is_some()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        if spec.netns.is_none() && spec.nic.is_some() {
            return Err(VmmError::SpawnQemu(std::io::Error::other(
                "a VM with a NIC needs a network namespace holding its tap",
            )));
        }
        let ns = match &spec.netns {
            Some(ns) => Some(ns.try_clone().map_err(VmmError::SpawnQemu)?),
            None => None,
        };
        // Shared with the child, which only reads it.
        let prepared = jail.as_ref().map(|(_, p)| p.clone());
        if ns.is_some() || prepared.is_some() {
            // SAFETY: setns and `Prepared::enter` are raw syscalls on data prepared (and fds
            // duplicated) before the fork; nothing in the child allocates.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(ns) = &ns {
                        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(std::io::Error::from)?;
                    }
                    if let Some(p) = &prepared {
                        p.enter()?;
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(spec, e))?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let cgroup = match spec.limits {
            None => None,
            Some(limits) => match VmCgroup::apply(&cgroup_name(&spec.run_dir), pid, limits) {
                Ok(c) => Some(c),
                Err(e) if self.allow_uncapped => {
                    tracing::warn!(error = %e, "could not apply host cgroup limits; the VM runs uncapped (--allow-uncapped)");
                    None
                }
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                    VmCgroup::existing(&cgroup_name(&spec.run_dir)).remove();
                    return Err(VmmError::Uncapped(e));
                }
            },
        };
        let jailed_uid = jail.as_ref().map(|(j, p)| (j.clone(), p.ids().uid));
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let reason = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    if status.code() == Some(0) {
                        ExitReason::GuestShutdown
                    } else if status.signal() == Some(9)
                        && cgroup.as_ref().is_some_and(|c| c.oom_killed())
                    {
                        ExitReason::OutOfMemory
                    } else {
                        ExitReason::Exited {
                            code: status.code(),
                            signal: status.signal(),
                        }
                    }
                }
                Err(_) => ExitReason::Exited {
                    code: None,
                    signal: None,
                },
            };
            if let Some(c) = &cgroup {
                c.remove();
            }
            if let Some((j, uid)) = &jailed_uid {
                j.release(*uid);
            }
            tx.send_replace(Some(reason));
        });
        let vm = QemuVm::new(pid, spec.run_dir.clone(), rx, jail.is_some());
        // The console first: the guest's first lines are what explains an early death.
        let console_sock = spec.run_dir.join("console.sock");
        let qmp_sock = spec.run_dir.join("qmp.sock");
        let connect = async {
            vm.inner
                .console
                .attach(&console_sock, QMP_CONNECT_TIMEOUT)
                .await
                .map_err(|_| VmmError::QmpConnectTimeout)?;
            let qmp = connect_qmp(&qmp_sock).await?;
            Ok::<_, VmmError>(qmp)
        };
        let qmp = tokio::select! {
            r = connect => r,
            reason = vm.wait_exit() => Err(vm.died("start-up", reason)),
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                // A QEMU dying in start-up resets the QMP socket: report the death and its log.
                let died = tokio::time::timeout(Duration::from_millis(500), vm.wait_exit())
                    .await
                    .ok();
                vm.kill().await;
                return Err(match died {
                    Some(reason) => vm.died("start-up", reason),
                    None => e,
                });
            }
        };
        let _ = vm.inner.qmp.set(qmp);
        Ok((vm, t0.elapsed()))
    }

    /// A failed spawn; when the jail's set-up failed in the child, its step is in `qemu.log`.
    fn spawn_error(&self, spec: &VmSpec, e: std::io::Error) -> VmmError {
        let log = std::fs::read_to_string(spec.run_dir.join("qemu.log")).unwrap_or_default();
        match log.lines().find_map(|l| l.strip_prefix("alcove jail: ")) {
            Some(step) => VmmError::EnterJail(step.to_string(), e),
            None => VmmError::SpawnQemu(e),
        }
    }

    /// Re-attaches to a VM started earlier (by another process) from its run dir. Exit is noticed
    /// by polling the pid; the exit status of a process we did not start cannot be known.
    pub async fn attach(&self, run_dir: &Path) -> Result<QemuVm, VmmError> {
        let pid_path = run_dir.join("qemu.pid");
        let pid: u32 = std::fs::read_to_string(&pid_path)
            .map_err(|e| VmmError::Io(pid_path.display().to_string(), e))?
            .trim()
            .parse()
            .map_err(|_| {
                VmmError::Io(
                    pid_path.display().to_string(),
                    std::io::Error::other("bad pid file"),
                )
            })?;
        let (tx, rx) = watch::channel(None);
        let dir = run_dir.to_path_buf();
        let cgroup = VmCgroup::existing(&cgroup_name(run_dir));
        let jailed = self
            .jail
            .as_ref()
            .and_then(|j| Some((j.clone(), j.adopt(run_dir)?)));
        let is_jailed = jailed.is_some();
        if !is_our_qemu(pid, &dir) {
            if let Some((j, uid)) = &jailed {
                j.release(*uid);
            }
            cgroup.remove();
            tx.send_replace(Some(ExitReason::Exited {
                code: None,
                signal: None,
            }));
        } else {
            tokio::spawn(async move {
                while is_our_qemu(pid, &dir) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let reason = if cgroup.oom_killed() {
                    ExitReason::OutOfMemory
                } else {
                    ExitReason::Exited {
                        code: None,
                        signal: None,
                    }
                };
                cgroup.remove();
                if let Some((j, uid)) = &jailed {
                    j.release(*uid);
                }
                tx.send_replace(Some(reason));
            });
        }
        let vm = QemuVm::new(pid, run_dir.to_path_buf(), rx, is_jailed);
        if vm.exit_reason().is_none() {
            let _ = vm
                .inner
                .console
                .attach(&run_dir.join("console.sock"), Duration::from_secs(1))
                .await;
        }
        Ok(vm)
    }
}

/// The file in a jailed VM's run dir its outgoing migration stream is written to.
const MIGRATION_OUT: &str = "migration.out";

/// Moves a stream a jailed QEMU wrote to `dest` and makes it the server's (root, 0600). The VM's
/// uid controlled the file, so it must still be a plain file with one link: never follow
/// something it could have swapped in (a symlink to a host file).
fn adopt_stream(out: &Path, dest: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |p: &Path, e| VmmError::Io(p.display().to_string(), e);
    let m = std::fs::symlink_metadata(out).map_err(|e| io(out, e))?;
    if !m.file_type().is_file() || m.nlink() != 1 {
        let _ = std::fs::remove_file(out);
        return Err(io(
            out,
            std::io::Error::other("the VM's migration stream is not a plain file"),
        ));
    }
    if let Err(e) = std::fs::rename(out, dest) {
        if e.raw_os_error() != Some(libc::EXDEV) {
            return Err(io(dest, e));
        }
        std::fs::copy(out, dest).map_err(|e| io(dest, e))?;
        let _ = std::fs::remove_file(out);
    }
    std::os::unix::fs::lchown(dest, Some(0), Some(0)).map_err(|e| io(dest, e))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o600)).map_err(|e| io(dest, e))
}

/// The cgroup of a VM is named after its run dir (the sandbox id).
fn cgroup_name(run_dir: &Path) -> String {
    run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into())
}

/// True while `pid` is a QEMU whose command line mentions `run_dir` (guards against pid reuse).
fn is_our_qemu(pid: u32, run_dir: &Path) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let needle = run_dir.as_os_str().as_encoded_bytes();
            cmdline.windows(needle.len()).any(|w| w == needle)
        }
        Err(_) => false,
    }
}

async fn connect_qmp(path: &Path) -> Result<Qmp, VmmError> {
    let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
    loop {
        match Qmp::connect(path, QMP_TIMEOUT).await {
            Ok(q) => return Ok(q),
            Err(crate::qmp::QmpError::Connect(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(crate::qmp::QmpError::Connect(_)) => return Err(VmmError::QmpConnectTimeout),
            Err(e) => return Err(e.into()),
        }
    }
}

impl Vmm for QemuVmm {
    type Vm = QemuVm;

    async fn boot(&self, spec: &VmSpec) -> Result<QemuVm, VmmError> {
        Ok(self.spawn(spec, None).await?.0)
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        state_file: &Path,
    ) -> Result<(QemuVm, RestoreTimings), VmmError> {
        self.load(spec, state_file, true, true).await
    }

    async fn restore_full(
        &self,
        spec: &VmSpec,
        state_file: &Path,
    ) -> Result<(QemuVm, RestoreTimings), VmmError> {
        QemuVmm::restore_full(self, spec, state_file).await
    }

    async fn restore_stopped(&self, spec: &VmSpec, state_file: &Path) -> Result<QemuVm, VmmError> {
        QemuVmm::restore_stopped(self, spec, state_file).await
    }

    async fn attach(&self, run_dir: &Path) -> Result<QemuVm, VmmError> {
        QemuVmm::attach(self, run_dir).await
    }
}

impl QemuVmm {
    /// Loads a state written by [`QemuVm::save`] with `ignore_shared: false` (every page of RAM
    /// in the file) into a new VM and leaves its vCPUs stopped: no guest code runs. What
    /// re-homing a memory image into a shared RAM file needs (load, then save again).
    pub async fn restore_stopped(
        &self,
        spec: &VmSpec,
        state_file: &Path,
    ) -> Result<QemuVm, VmmError> {
        Ok(self.load(spec, state_file, false, false).await?.0)
    }

    /// [`Vmm::restore`] of a state written with `ignore_shared: false`.
    pub async fn restore_full(
        &self,
        spec: &VmSpec,
        state_file: &Path,
    ) -> Result<(QemuVm, RestoreTimings), VmmError> {
        self.load(spec, state_file, true, false).await
    }

    async fn load(
        &self,
        spec: &VmSpec,
        state_file: &Path,
        run: bool,
        ignore_shared: bool,
    ) -> Result<(QemuVm, RestoreTimings), VmmError> {
        let t0 = Instant::now();
        let (vm, spawn_to_qmp) = self.spawn(spec, Some(state_file)).await?;
        let result = async {
            let qmp = vm.qmp()?;
            // The capability changes the stream's format: it must match the saving side.
            set_ignore_shared(qmp, ignore_shared).await?;
            let uri = format!("file:{}", state_file.display());
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })), QMP_TIMEOUT)
                .await?;
            vm.wait_migration("restore").await?;
            let state_loaded = t0.elapsed();
            if run {
                qmp.execute("cont", None, QMP_TIMEOUT).await?;
            }
            Ok(RestoreTimings {
                spawn_to_qmp,
                state_loaded,
                resumed: t0.elapsed(),
            })
        }
        .await;
        match result {
            Ok(t) => Ok((vm, t)),
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }
}

async fn set_ignore_shared(qmp: &Qmp, on: bool) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": on } ] })),
        QMP_TIMEOUT,
    )
    .await?;
    Ok(())
}

struct Inner {
    pid: u32,
    run_dir: PathBuf,
    console: Console,
    qmp: tokio::sync::OnceCell<Qmp>,
    exit: watch::Receiver<Option<ExitReason>>,
    /// QEMU runs in a jail that sees only its run dir (migration streams go through it).
    jailed: bool,
}

/// A QEMU process and its control connections. Cloning shares the same VM.
#[derive(Clone)]
pub struct QemuVm {
    inner: Arc<Inner>,
}

impl QemuVm {
    fn new(
        pid: u32,
        run_dir: PathBuf,
        exit: watch::Receiver<Option<ExitReason>>,
        jailed: bool,
    ) -> QemuVm {
        QemuVm {
            inner: Arc::new(Inner {
                pid,
                run_dir,
                console: Console::default(),
                qmp: tokio::sync::OnceCell::new(),
                exit,
                jailed,
            }),
        }
    }

    async fn qmp_or_connect(&self) -> Result<&Qmp, VmmError> {
        let path = self.inner.run_dir.join("qmp.sock");
        self.inner
            .qmp
            .get_or_try_init(|| async move { connect_qmp(&path).await })
            .await
    }

    fn qmp(&self) -> Result<&Qmp, VmmError> {
        self.inner.qmp.get().ok_or(VmmError::QmpConnectTimeout)
    }

    fn died(&self, stage: &'static str, reason: ExitReason) -> VmmError {
        let mut console = self.inner.console.tail(8);
        if let Ok(log) = std::fs::read_to_string(self.inner.run_dir.join("qemu.log")) {
            let log = log.trim();
            if !log.is_empty() {
                console.push_str("\nqemu: ");
                console.push_str(&log.chars().take(2000).collect::<String>());
            }
        }
        VmmError::DiedDuring {
            stage,
            reason,
            console,
        }
    }

    async fn wait_migration(&self, what: &'static str) -> Result<(), VmmError> {
        let qmp = self.qmp_or_connect().await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = qmp.execute("query-migrate", None, QMP_TIMEOUT).await?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let detail = info["error-desc"]
                        .as_str()
                        .unwrap_or("no detail from QEMU")
                        .to_string();
                    return Err(VmmError::Migration { what, detail });
                }
                _ => {}
            }
            if let Some(reason) = self.exit_reason() {
                return Err(self.died(what, reason));
            }
            if Instant::now() > deadline {
                return Err(VmmError::Timeout(MIGRATION_TIMEOUT, what));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sets the VM's CPU weight (100 = default; see [`VmCgroup::set_cpu_weight`]).
    pub fn set_cpu_weight(&self, weight: u32) -> std::io::Result<()> {
        VmCgroup::existing(&cgroup_name(&self.inner.run_dir)).set_cpu_weight(weight)
    }

    pub fn run_dir(&self) -> &Path {
        &self.inner.run_dir
    }

    /// Stops the vCPUs and writes the VM's state to `state_file`. With `ignore_shared`, RAM in a
    /// shared file is left out (it stays in the file); without, every page of RAM is written,
    /// whatever backs it. The VM stays stopped.
    pub async fn save(&self, state_file: &Path, ignore_shared: bool) -> Result<(), VmmError> {
        let qmp = self.qmp_or_connect().await?;
        set_ignore_shared(qmp, ignore_shared).await?;
        qmp.execute("stop", None, QMP_TIMEOUT).await?;
        // A jailed QEMU can write only into its run dir: the stream goes there first.
        let out = if self.inner.jailed {
            self.inner.run_dir.join(MIGRATION_OUT)
        } else {
            state_file.to_path_buf()
        };
        if self.inner.jailed {
            let _ = std::fs::remove_file(&out);
        }
        let uri = format!("file:{}", out.display());
        qmp.execute("migrate", Some(json!({ "uri": uri })), QMP_TIMEOUT)
            .await?;
        self.wait_migration("snapshot").await?;
        if self.inner.jailed {
            adopt_stream(&out, state_file)?;
        }
        Ok(())
    }

    /// Stops the vCPUs (the VM keeps its memory).
    pub async fn pause(&self) -> Result<(), VmmError> {
        self.qmp_or_connect()
            .await?
            .execute("stop", None, QMP_TIMEOUT)
            .await?;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), VmmError> {
        self.qmp_or_connect()
            .await?
            .execute("cont", None, QMP_TIMEOUT)
            .await?;
        Ok(())
    }

    /// See [`Vm::resume_after_io_error`].
    pub async fn resume_after_io_error(&self) -> Result<bool, VmmError> {
        let qmp = self.qmp_or_connect().await?;
        let status = qmp.execute("query-status", None, QMP_TIMEOUT).await?;
        if status["status"].as_str() != Some("io-error") {
            return Ok(false);
        }
        qmp.execute("cont", None, QMP_TIMEOUT).await?;
        Ok(true)
    }

    /// See [`Vm::ensure_running`].
    pub async fn ensure_running(&self) -> Result<(), VmmError> {
        let qmp = self.qmp_or_connect().await?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let info = qmp.execute("query-migrate", None, QMP_TIMEOUT).await?;
            let status = info["status"].as_str().unwrap_or("none").to_string();
            if !matches!(
                status.as_str(),
                "setup" | "active" | "pre-switchover" | "device" | "cancelling"
            ) {
                break;
            }
            if status != "cancelling" {
                qmp.execute("migrate_cancel", None, QMP_TIMEOUT).await?;
            }
            if Instant::now() > deadline {
                return Err(VmmError::Timeout(
                    QMP_TIMEOUT,
                    "an interrupted save to cancel",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = qmp.execute("query-status", None, QMP_TIMEOUT).await?;
        match status["status"].as_str().unwrap_or("") {
            "running" => Ok(()),
            // Stopped by a pause or snapshot that never finished, or by a write that found the
            // host's disk full (retried now): the guest's memory is intact.
            "paused" | "postmigrate" | "finish-migrate" | "io-error" => self.resume().await,
            other => Err(VmmError::Migration {
                what: "re-attach",
                detail: format!("the VM is in state `{other}` and cannot run"),
            }),
        }
    }
}

impl Vm for QemuVm {
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
        QemuVm::save(self, state_file, true).await
    }

    async fn save(&self, state_file: &Path, ignore_shared: bool) -> Result<(), VmmError> {
        QemuVm::save(self, state_file, ignore_shared).await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        QemuVm::resume(self).await
    }

    async fn ensure_running(&self) -> Result<(), VmmError> {
        QemuVm::ensure_running(self).await
    }

    async fn resume_after_io_error(&self) -> Result<bool, VmmError> {
        QemuVm::resume_after_io_error(self).await
    }

    fn set_cpu_weight(&self, weight: u32) -> std::io::Result<()> {
        QemuVm::set_cpu_weight(self, weight)
    }

    async fn kill(&self) {
        if self.exit_reason().is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.inner.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        if tokio::time::timeout(Duration::from_secs(10), self.wait_exit())
            .await
            .is_err()
        {
            tracing::warn!(pid = self.inner.pid, "qemu did not exit 10 s after SIGKILL");
        }
    }

    async fn wait_exit(&self) -> ExitReason {
        let mut rx = self.inner.exit.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return ExitReason::Exited {
                    code: None,
                    signal: None,
                };
            }
        }
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        self.inner.exit.borrow().clone()
    }
}
