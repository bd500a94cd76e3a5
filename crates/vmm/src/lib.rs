//! The VM layer: a [`Vmm`] trait for "boot, snapshot, restore, stop" of one microVM, and its QEMU
//! implementation driven over QMP ([`qemu::QemuVmm`]).
//!
//! Owns: QEMU command lines, the accelerator choice (KVM only on hardware KVM, TCG otherwise), the
//! QMP conversation, and the per-VM sockets (QMP, serial console, agent virtio-serial port).
//! Does not own: disks, templates or sandbox identity (see `alcove-image` and `alcove-node`),
//! network namespaces and taps (`alcove-net`), or what the guest expects (`alcove-guest-contract`):
//! the caller hands all of those in as plain values in [`VmSpec`]. A leaf: no other Alcove crate.
//!
//! Invariant: a VM restored from a snapshot is started from exactly the machine description the
//! snapshot was taken with ([`VmSpec`] minus the per-VM paths); the snapshot's RAM file is mapped
//! copy-on-write by every restored VM and is never written after the snapshot.

pub mod accel;
pub mod cgroup;
pub mod console;
pub mod jail;
pub mod qemu;
pub mod qmp;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use accel::{Accel, AccelChoice};
pub use qemu::{QemuVm, QemuVmm};

/// The machine a VM is built from. Two VMs with equal specs (ignoring `run_dir`, `disk`,
/// `ram_shared` and `netns`) are migration-compatible.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Directory for this VM's sockets; created by the caller, removed by the caller.
    pub run_dir: PathBuf,
    /// Uncompressed PVH kernel image.
    pub kernel: PathBuf,
    /// Extra kernel command line (the driver adds console, timing and panic options).
    pub cmdline: String,
    pub vcpus: u32,
    pub mem_mib: u32,
    /// File backing guest RAM. `ram_shared = true` writes guest RAM into it (template boot);
    /// `false` maps it copy-on-write (sandboxes restored from the template).
    pub ram_file: PathBuf,
    pub ram_shared: bool,
    pub disk: Disk,
    /// Host-side caps on the VM process; `None` runs it uncapped (template builds).
    pub limits: Option<cgroup::Limits>,
    /// The name of the virtio-serial port the agent is reached over (the guest sees it as
    /// `/dev/virtio-ports/<name>`; the host end is `agent.sock` in `run_dir`).
    pub agent_port: String,
    /// A virtio-net NIC (part of the machine description); its tap must be in `netns`.
    pub nic: Option<Nic>,
    /// The network namespace QEMU runs in (it enters it before exec), as an open namespace fd
    /// (`/proc/<pid>/ns/net`, `/run/netns/<name>`, ...); per VM, like `run_dir`. The namespace
    /// lives as long as something holds it: this fd (the caller's, for as long as it keeps the
    /// spec) and then the QEMU process. `None` runs QEMU in the caller's namespace, which only
    /// works without a NIC.
    pub netns: Option<Arc<OwnedFd>>,
}

/// A virtio-net NIC backed by a tap device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap's name in the VM's network namespace (QEMU's `ifname`).
    pub tap: String,
    /// The guest-visible MAC address.
    pub mac: String,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Timings of one restore, for benchmarks and logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTimings {
    pub spawn_to_qmp: Duration,
    pub state_loaded: Duration,
    pub resumed: Duration,
}

/// How a VM ended, as far as the VMM can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off or rebooted (we run with `-no-reboot`).
    GuestShutdown,
    /// The host's OOM killer ended QEMU: the VM used more host memory than its cap.
    OutOfMemory,
    /// QEMU exited on its own with this status (crash, bad config, guest panic with panic=-1).
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestShutdown => write!(f, "the guest shut down"),
            ExitReason::OutOfMemory => {
                write!(
                    f,
                    "the VM was killed by the host's out-of-memory killer (it exceeded its memory cap)"
                )
            }
            ExitReason::Exited { code: Some(c), .. } => write!(f, "qemu exited with status {c}"),
            ExitReason::Exited {
                signal: Some(s), ..
            } => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown");
                write!(f, "qemu was killed by signal {s} ({name})")
            }
            ExitReason::Exited { .. } => write!(f, "qemu exited"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("failed to start the hypervisor process")]
    SpawnQemu(#[source] std::io::Error),
    #[error("the hypervisor did not open its control socket in time")]
    QmpConnectTimeout,
    #[error("control socket error")]
    Qmp(#[from] qmp::QmpError),
    #[error("the hypervisor exited during {stage}: {reason}; console tail: {console}")]
    DiedDuring {
        stage: &'static str,
        reason: ExitReason,
        console: String,
    },
    #[error("migration {what} failed: {detail}")]
    Migration { what: &'static str, detail: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("i/o on {0}")]
    Io(String, #[source] std::io::Error),
    #[error("could not jail the hypervisor")]
    Jail(#[from] jail::JailError),
    #[error("could not jail the hypervisor: {0}")]
    EnterJail(String, #[source] std::io::Error),
    #[error(
        "host cgroup limits (CPU, memory, tasks) could not be applied to the VM, so it was not started; \
         fix cgroup access (cgroup v2 at /sys/fs/cgroup, writable by the server) or pass --allow-uncapped \
         to run VMs without caps"
    )]
    Uncapped(#[source] std::io::Error),
}

/// A hypervisor that can boot VMs and restore them from snapshots: the seam between the node and
/// the VMs it runs (`alcove-node` is generic over it; its unit tests use an in-memory fake).
pub trait Vmm: Send + Sync + 'static {
    type Vm: Vm;
    /// Boots a fresh VM from `spec` (kernel + disk).
    fn boot(&self, spec: &VmSpec) -> impl Future<Output = Result<Self::Vm, VmmError>> + Send;
    /// Starts a VM from `spec` and loads the device state in `state_file` (taken by
    /// [`Vm::snapshot`] from a VM with a compatible spec), then lets it run.
    fn restore(
        &self,
        spec: &VmSpec,
        state_file: &std::path::Path,
    ) -> impl Future<Output = Result<(Self::Vm, RestoreTimings), VmmError>> + Send;
    /// [`Vmm::restore`] of a state written by [`Vm::save`] with `ignore_shared: false` (every
    /// page of RAM in the file).
    fn restore_full(
        &self,
        spec: &VmSpec,
        state_file: &std::path::Path,
    ) -> impl Future<Output = Result<(Self::Vm, RestoreTimings), VmmError>> + Send;
    /// Like [`Vmm::restore_full`], but leaves the vCPUs stopped: no guest code runs (what
    /// re-homing a memory image into a shared RAM file needs: load, then save again).
    fn restore_stopped(
        &self,
        spec: &VmSpec,
        state_file: &std::path::Path,
    ) -> impl Future<Output = Result<Self::Vm, VmmError>> + Send;
    /// Picks up a VM started earlier (maybe by another process) from its run dir. A VM that is
    /// gone comes back already exited.
    fn attach(
        &self,
        run_dir: &std::path::Path,
    ) -> impl Future<Output = Result<Self::Vm, VmmError>> + Send;
}

/// One running VM. Cloning shares the same VM.
pub trait Vm: Clone + Send + Sync + 'static {
    fn pid(&self) -> u32;
    /// Unix socket that is the host end of the agent's virtio-serial port.
    fn agent_socket(&self) -> PathBuf;
    /// The serial console, as captured so far (bounded).
    fn console(&self) -> &console::Console;
    /// Stops the vCPUs and writes the device state to `state_file`; RAM stays in the RAM file
    /// (which must be shared). The VM stays stopped.
    fn snapshot(
        &self,
        state_file: &std::path::Path,
    ) -> impl Future<Output = Result<(), VmmError>> + Send;
    /// Stops the vCPUs and writes the VM's state to `state_file`. With `ignore_shared`, RAM in a
    /// shared file is left out; without, every page of RAM is written. The VM stays stopped.
    fn save(
        &self,
        state_file: &std::path::Path,
        ignore_shared: bool,
    ) -> impl Future<Output = Result<(), VmmError>> + Send;
    /// Lets the vCPUs of a stopped VM run again.
    fn resume(&self) -> impl Future<Output = Result<(), VmmError>> + Send;
    /// Brings a re-attached VM back to running if the process that drove it died half-way
    /// through a save (vCPUs stopped, a migration running or finished): cancels the migration
    /// and lets the vCPUs run. Fails when the VM cannot run (it still waits for an incoming
    /// state, or it errored).
    fn ensure_running(&self) -> impl Future<Output = Result<(), VmmError>> + Send;
    /// Lets the vCPUs run again if the VM stopped on a failed disk write (QEMU stops a VM whose
    /// write found the host's disk full and retries the write when it runs again; if the disk
    /// is still full, it stops again). Whether it was stopped so.
    fn resume_after_io_error(&self) -> impl Future<Output = Result<bool, VmmError>> + Send;
    /// Sets the VM's host CPU weight (100 = a sandbox's default).
    fn set_cpu_weight(&self, weight: u32) -> std::io::Result<()>;
    /// Stops the VM process (SIGKILL after a short grace) and waits for it to exit.
    fn kill(&self) -> impl Future<Output = ()> + Send;
    /// Resolves when the VM process has exited.
    fn wait_exit(&self) -> impl Future<Output = ExitReason> + Send;
    /// `Some` once the VM process has exited.
    fn exit_reason(&self) -> Option<ExitReason>;
}
