//! The jail every QEMU process runs in: its own unprivileged uid/gid (one per VM, from a
//! configurable range), its own mount namespace whose root is an empty tmpfs holding only what the
//! VM needs, no capabilities in any set, `no_new_privs`, then QEMU's own seccomp (`-sandbox`) as
//! before. Learnt from Firecracker's jailer; the mechanics are ours.
//!
//! The minimal root holds, at their host paths so QEMU's arguments need no rewriting:
//! - the VM's run dir, read-write (sockets, pid file, disk overlay, migration files);
//! - the kernel, the RAM file, every layer of the disk's qcow2 backing chain and an incoming state
//!   file, read-only unless the VM writes them (a template boot's shared RAM, a writable disk);
//! - the host's shared libraries and QEMU's data (`/usr`, `/lib*`, the binary's own directory),
//!   read-only;
//! - `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random`, `/dev/net/tun` (with a NIC) and
//!   `/dev/kvm` (under KVM): nodes of the jail's own, owned by the VM's uid, so the host nodes'
//!   modes do not matter.
//!
//! Nothing else of the host is visible: not `/etc`, `/root`, `/proc`, the data dir's database or
//! other sandboxes' files.
//!
//! **How it is entered: in `pre_exec`, not a re-exec'd jailer.** Everything that allocates (the
//! mount plan, every path as a `CString`, the group list) is computed in the parent before the
//! fork ([`Jail::prepare`]); the child only makes raw syscalls on that prepared data
//! ([`Prepared::enter`]), which keeps it async-signal-safe. A separate jailer binary would add an
//! exec (a few ms of dynamic loading per VM, against a 5 ms budget), a second argv protocol, and a
//! second binary to find and keep in step; it buys nothing here because the server already is the
//! privileged parent and must stay it (cgroups, netns, re-attach).
//!
//! **Ids and files.** A VM runs as uid = gid = `uid_base + slot` with one supplementary group,
//! `uid_base` itself (the *shared* group). The run dir becomes
//! `root:<vm gid>` mode `1770`: QEMU can create its sockets there, and the sticky bit keeps it from
//! touching the root-owned records beside them. The disk overlay is chowned to the VM. Read-only
//! inputs (templates, snapshot layers, state files) are made `root:<shared group>` and group
//! readable: a VM could read another VM's inputs only if they were in its mount namespace, and they
//! are not. Migration streams (pause, snapshot, fork) are written by QEMU into the run dir and then
//! moved into place by the server ([`crate::qemu`]).
//!
//! **Re-attach.** The VM's id is recorded as the run dir's group: [`Jail::adopt`] reads it back
//! when a restarted server picks a running VM up, so the slot is not handed out twice.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use crate::{Accel, DiskFormat, VmSpec};

/// The default first id of the range (uid and gid `uid_base` is the shared group; VMs get
/// `uid_base + 1 ..= uid_base + uid_count`). Far above any login or system account.
pub const DEFAULT_UID_BASE: u32 = 1_900_000_000;
pub const DEFAULT_UID_COUNT: u32 = 65_536;

/// Where every jailed child mounts its new root (in its own mount namespace, so one shared,
/// always-empty mount point serves all VMs).
const ROOT_MOUNT_POINT: &str = "/run/alcove-jail-root";

/// qcow2 backing chains deeper than this are refused (ours are template + snapshot layers).
const MAX_CHAIN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "jailing QEMU needs root (it changes uids and mounts); run as root, or pass --no-jail (development only)"
    )]
    NotRoot,
    #[error("all {0} jail uids are in use; raise --jail-uid-count")]
    Exhausted(u32),
    #[error("preparing {0} for the jailed VM")]
    Prepare(String, #[source] std::io::Error),
    #[error("{0} has a path the jail cannot mount (it must be absolute, without `..`)")]
    BadPath(String),
    #[error("reading the qcow2 backing chain of {0}")]
    Chain(String, #[source] std::io::Error),
}

/// The uid range the jail allocates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailConfig {
    pub uid_base: u32,
    pub uid_count: u32,
}

impl Default for JailConfig {
    fn default() -> JailConfig {
        JailConfig {
            uid_base: DEFAULT_UID_BASE,
            uid_count: DEFAULT_UID_COUNT,
        }
    }
}

/// The ids one VM runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIds {
    pub uid: u32,
    pub gid: u32,
    /// Group of the read-only inputs every jailed VM may read (when they are mounted for it).
    pub shared_gid: u32,
}

/// Allocates per-VM ids and prepares jails. Shared by every VM of one [`crate::QemuVmm`].
#[derive(Debug)]
pub struct Jail {
    cfg: JailConfig,
    used: Mutex<BTreeSet<u32>>,
}

impl Jail {
    pub fn new(cfg: JailConfig) -> Jail {
        Jail {
            cfg,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn config(&self) -> JailConfig {
        self.cfg
    }

    /// A free uid for a new VM: not held by a VM of this process and not the owner of any running
    /// process (another Alcove process on the host may use the same range).
    pub fn allocate(&self) -> Result<VmIds, JailError> {
        let busy = process_owners();
        let mut used = self.used.lock().expect("jail lock");
        let uid =
            pick_uid(self.cfg, &used, &busy).ok_or(JailError::Exhausted(self.cfg.uid_count))?;
        used.insert(uid);
        Ok(self.ids(uid))
    }

    /// Returns a VM's uid to the pool (after its process exited).
    pub fn release(&self, uid: u32) {
        self.used.lock().expect("jail lock").remove(&uid);
    }

    /// Re-registers the uid of a VM started earlier (by a server before a restart), read from its
    /// run dir's group. `None` when the VM was not jailed.
    pub fn adopt(&self, run_dir: &Path) -> Option<u32> {
        let gid = std::fs::metadata(run_dir).ok()?.gid();
        let in_range = gid > self.cfg.uid_base && gid - self.cfg.uid_base <= self.cfg.uid_count;
        if !in_range {
            return None;
        }
        self.used.lock().expect("jail lock").insert(gid);
        Some(gid)
    }

    fn ids(&self, uid: u32) -> VmIds {
        VmIds {
            uid,
            gid: uid,
            shared_gid: self.cfg.uid_base,
        }
    }

    /// Sets file ownership and modes on the host for `spec` and computes everything the child
    /// needs to enter the jail, so that the child allocates nothing.
    pub fn prepare(
        &self,
        ids: VmIds,
        spec: &VmSpec,
        binary: &Path,
        accel: Accel,
        incoming: Option<&Path>,
    ) -> Result<Prepared, JailError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(JailError::NotRoot);
        }
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |e| JailError::Prepare(p, e)
        };
        let run = absolute(&spec.run_dir)?;
        // The run dir: QEMU's uid may create files (its sockets, pid file, migration streams);
        // the sticky bit keeps the root-owned records in it out of its reach.
        chown(&run, Some(0), Some(ids.gid)).map_err(io(&run))?;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1770))
            .map_err(io(&run))?;
        // Sockets and the pid file of an earlier VM (maybe another uid) would block QEMU's bind.
        for f in ["qmp.sock", "agent.sock", "console.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(run.join(f));
        }
        let mut binds = vec![Bind::dir(&run, true)];

        let mut inputs: Vec<(PathBuf, bool)> = Vec::new();
        let disk = absolute(&spec.disk.path)?;
        inputs.push((disk.clone(), !spec.disk.read_only));
        if spec.disk.format == DiskFormat::Qcow2 {
            for layer in qcow2_chain(&disk)? {
                inputs.push((layer, false));
            }
        }
        inputs.push((absolute(&spec.kernel)?, false));
        let ram = absolute(&spec.ram_file)?;
        if spec.ram_shared && !ram.exists() {
            // QEMU would create it, but its directory is not in the jail: make it here.
            std::fs::File::create(&ram).map_err(io(&ram))?;
        }
        inputs.push((ram, spec.ram_shared));
        if let Some(state) = incoming {
            inputs.push((absolute(state)?, false));
        }
        for (path, writable) in inputs {
            if writable {
                // A file the VM wrote before (its disk) is under its control: never follow a
                // symlink it may have put in its place.
                let m = std::fs::symlink_metadata(&path).map_err(io(&path))?;
                if !m.file_type().is_file() {
                    return Err(JailError::Prepare(
                        path.display().to_string(),
                        std::io::Error::other("not a plain file"),
                    ));
                }
                std::os::unix::fs::lchown(&path, Some(ids.uid), Some(ids.gid))
                    .map_err(io(&path))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io(&path))?;
            } else {
                grant_read(&path, ids.shared_gid).map_err(io(&path))?;
            }
            binds.push(Bind::file(&path, writable));
        }

        for sys in ["/usr", "/lib", "/lib64", "/lib32", "/libx32"] {
            let p = Path::new(sys);
            if p.exists() {
                binds.push(Bind::dir(p, false));
            }
        }
        let binary = resolve_binary(binary)
            .ok_or_else(|| JailError::BadPath(binary.display().to_string()))?;
        if let Some(dir) = binary.parent() {
            binds.push(Bind::dir(dir, false));
        }
        let mut devices = vec!["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];
        if spec.nic.is_some() {
            devices.push("/dev/net/tun");
        }
        let groups = vec![ids.shared_gid];
        if accel == Accel::Kvm {
            devices.push("/dev/kvm");
        }
        for d in devices {
            binds.push(Bind::device(Path::new(d)));
        }

        let root = PathBuf::from(ROOT_MOUNT_POINT);
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let plan = MountPlan::new(binds);
        Prepared::new(
            &root,
            &plan,
            ids,
            groups,
            binary,
            spec.nic.as_ref().map(|n| n.tap.as_str()),
        )
    }
}

/// The lowest free uid of the range.
fn pick_uid(cfg: JailConfig, used: &BTreeSet<u32>, busy: &BTreeSet<u32>) -> Option<u32> {
    (1..=cfg.uid_count)
        .map(|slot| cfg.uid_base.saturating_add(slot))
        .find(|uid| !used.contains(uid) && !busy.contains(uid))
}

/// The owners of every running process (the owner of `/proc/<pid>` is the process's euid).
fn process_owners() -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
        .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
        .collect()
}

/// The program path QEMU is exec'd from: absolute, symlinks resolved (its directory is mounted).
fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return std::fs::canonicalize(binary).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// `path` made absolute (against the cwd) and checked to have no `..`: the jail creates it
/// literally under its new root.
fn absolute(path: &Path) -> Result<PathBuf, JailError> {
    let abs =
        std::path::absolute(path).map_err(|e| JailError::Prepare(path.display().to_string(), e))?;
    if abs
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(JailError::BadPath(path.display().to_string()));
    }
    Ok(abs)
}

fn chown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, uid, gid)
}

/// Makes a read-only input `root:<shared>` and group readable (not group writable), unless it
/// already is.
fn grant_read(path: &Path, shared_gid: u32) -> std::io::Result<()> {
    let m = std::fs::metadata(path)?;
    if m.uid() != 0 || m.gid() != shared_gid {
        chown(path, Some(0), Some(shared_gid))?;
    }
    let mode = m.permissions().mode() & 0o7777;
    let want = (mode & !0o020) | 0o040;
    if want != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

/// The layers below a qcow2 image, top first, as recorded in each header (relative names are
/// resolved against the image's directory, as QEMU does).
pub fn qcow2_chain(top: &Path) -> Result<Vec<PathBuf>, JailError> {
    let mut chain = Vec::new();
    let mut current = top.to_path_buf();
    loop {
        let err = |e| JailError::Chain(top.display().to_string(), e);
        let backing = read_backing(&current).map_err(err)?;
        let Some(name) = backing else {
            return Ok(chain);
        };
        let next = if name.is_absolute() {
            name
        } else {
            current.parent().unwrap_or(Path::new("/")).join(name)
        };
        if chain.len() >= MAX_CHAIN {
            return Err(err(std::io::Error::other("backing chain too deep")));
        }
        chain.push(next.clone());
        current = next;
    }
}

/// The backing file name in a qcow2 image's header, `None` for a raw file or a base image.
fn read_backing(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    if f.read_at(&mut header, 0)? < header.len() {
        return Ok(None);
    }
    let Some((offset, len)) = backing_location(&header) else {
        return Ok(None);
    };
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, offset)?;
    Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(&name))))
}

/// Where the backing file name sits in a qcow2 header (offset, length); `None` when the header is
/// not qcow2 or names no backing file.
fn backing_location(header: &[u8; 20]) -> Option<(u64, u32)> {
    if &header[0..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(header[16..20].try_into().ok()?);
    // qcow2 caps the name at 1023 bytes.
    (offset != 0 && len != 0 && len <= 1023).then_some((offset, len))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    Dir,
    File,
    Device,
}

/// One host path made visible in the jail at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub kind: BindKind,
    pub writable: bool,
}

impl Bind {
    fn dir(path: &Path, writable: bool) -> Bind {
        Bind {
            path: path.to_path_buf(),
            kind: BindKind::Dir,
            writable,
        }
    }
    fn file(path: &Path, writable: bool) -> Bind {
        Bind {
            path: path.to_path_buf(),
            kind: BindKind::File,
            writable,
        }
    }
    fn device(path: &Path) -> Bind {
        Bind {
            path: path.to_path_buf(),
            kind: BindKind::Device,
            writable: false,
        }
    }
}

/// The new root's layout: directories to create (parents first) and bind mounts, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    pub dirs: Vec<PathBuf>,
    pub binds: Vec<Bind>,
}

impl MountPlan {
    /// A plan for `binds`: duplicates and paths inside a directory that is bound anyway are
    /// dropped (creating their mount points would write into the bound host directory).
    pub fn new(binds: Vec<Bind>) -> MountPlan {
        let mut kept: Vec<Bind> = Vec::new();
        for b in binds {
            let covered = kept
                .iter()
                .any(|k| k.kind == BindKind::Dir && b.path.starts_with(&k.path));
            if !covered {
                kept.retain(|k| !(b.kind == BindKind::Dir && k.path.starts_with(&b.path)));
                kept.push(b);
            }
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut seen = BTreeSet::new();
        for b in &kept {
            let mut ancestors: Vec<&Path> = b.path.ancestors().skip(1).collect();
            ancestors.reverse();
            if b.kind == BindKind::Dir {
                ancestors.push(&b.path);
            }
            for a in ancestors {
                if a != Path::new("/") && seen.insert(a.to_path_buf()) {
                    dirs.push(a.to_path_buf());
                }
            }
        }
        MountPlan { dirs, binds: kept }
    }
}

struct PreparedBind {
    src: CString,
    dst: CString,
    kind: BindKind,
    writable: bool,
    /// For a device: the host node's device number (the jail makes its own node, owned by the
    /// VM, rather than depending on the host node's mode).
    rdev: libc::dev_t,
}

/// Everything the child needs, allocated before the fork.
pub struct Prepared {
    root: CString,
    dot: CString,
    slash: CString,
    tmpfs: CString,
    tmpfs_opts: CString,
    dirs: Vec<CString>,
    binds: Vec<PreparedBind>,
    tun: CString,
    tap: Option<[u8; 16]>,
    ids: VmIds,
    groups: Vec<libc::gid_t>,
    binary: PathBuf,
}

fn cstring(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.display().to_string()))
}

impl Prepared {
    fn new(
        root: &Path,
        plan: &MountPlan,
        ids: VmIds,
        groups: Vec<u32>,
        binary: PathBuf,
        tap: Option<&str>,
    ) -> Result<Prepared, JailError> {
        let under = |p: &Path| cstring(&root.join(p.strip_prefix("/").unwrap_or(p)));
        let tap = match tap {
            Some(name) => {
                let mut buf = [0u8; 16];
                if name.len() >= buf.len() {
                    return Err(JailError::BadPath(name.to_string()));
                }
                buf[..name.len()].copy_from_slice(name.as_bytes());
                Some(buf)
            }
            None => None,
        };
        Ok(Prepared {
            root: cstring(root)?,
            dot: c".".to_owned(),
            slash: c"/".to_owned(),
            tmpfs: c"tmpfs".to_owned(),
            tmpfs_opts: c"mode=0755,size=64k,nr_inodes=1024".to_owned(),
            dirs: plan
                .dirs
                .iter()
                .map(|d| under(d))
                .collect::<Result<_, _>>()?,
            binds: plan
                .binds
                .iter()
                .map(|b| {
                    let rdev = match b.kind {
                        BindKind::Device => std::fs::metadata(&b.path)
                            .map_err(|e| JailError::Prepare(b.path.display().to_string(), e))?
                            .rdev(),
                        _ => 0,
                    };
                    Ok(PreparedBind {
                        src: cstring(&b.path)?,
                        dst: under(&b.path)?,
                        kind: b.kind,
                        writable: b.writable,
                        rdev,
                    })
                })
                .collect::<Result<_, JailError>>()?,
            tun: c"/dev/net/tun".to_owned(),
            tap,
            ids,
            groups,
            binary,
        })
    }

    /// The program to exec (absolute; visible in the jail).
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn ids(&self) -> VmIds {
        self.ids
    }

    /// Enters the jail. Runs in the forked child before exec, after it entered the VM's network
    /// namespace: only raw syscalls on prepared data, no allocation. On failure a fixed line naming
    /// the step goes to stderr (QEMU's log) and the errno to the parent.
    pub fn enter(&self) -> std::io::Result<()> {
        // The server runs with umask 077: the jail's own root dirs must still be 0755, or the
        // VM's uid could not walk down to its run dir. QEMU gets the server's umask back.
        // SAFETY: umask only swaps the process's file-mode mask.
        let umask = unsafe { libc::umask(0) };
        let entered = self.enter_with_mask();
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        entered
    }

    fn enter_with_mask(&self) -> std::io::Result<()> {
        if let Some(tap) = &self.tap {
            step(b"tap owner", self.set_tap_owner(tap))?;
        }
        // SAFETY (all blocks below): plain syscalls on NUL-terminated strings owned by `self`,
        // which outlives every call; no memory is allocated or freed.
        step(
            b"unshare mount namespace",
            check(unsafe { libc::unshare(libc::CLONE_NEWNS) }),
        )?;
        step(
            b"make mounts private",
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    self.slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            }),
        )?;
        step(
            b"mount root tmpfs",
            check(unsafe {
                libc::mount(
                    self.tmpfs.as_ptr(),
                    self.root.as_ptr(),
                    self.tmpfs.as_ptr(),
                    // Not nodev: the jail's own device nodes live on it. It is read-only once
                    // set up, and QEMU cannot make nodes (no CAP_MKNOD).
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    self.tmpfs_opts.as_ptr().cast(),
                )
            }),
        )?;
        for d in &self.dirs {
            let r = unsafe { libc::mkdir(d.as_ptr(), 0o755) };
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return step(b"mkdir in new root", check(r));
            }
        }
        for b in &self.binds {
            if b.kind == BindKind::Device {
                step(
                    b"mknod device",
                    check(unsafe { libc::mknod(b.dst.as_ptr(), libc::S_IFCHR | 0o600, b.rdev) }),
                )?;
                step(
                    b"chown device",
                    check(unsafe { libc::chown(b.dst.as_ptr(), self.ids.uid, self.ids.gid) }),
                )?;
                continue;
            }
            if b.kind != BindKind::Dir {
                let fd = unsafe {
                    libc::open(
                        b.dst.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                step(b"create mount point", check(fd))?;
                unsafe { libc::close(fd) };
            }
            step(
                b"bind mount",
                check(unsafe {
                    libc::mount(
                        b.src.as_ptr(),
                        b.dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                }),
            )?;
            let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
            if !b.writable {
                flags |= libc::MS_RDONLY;
            }
            match b.kind {
                BindKind::Device => unreachable!("devices are made, not bound"),
                BindKind::File => flags |= libc::MS_NODEV | libc::MS_NOEXEC,
                // Libraries and the binary need exec; the run dir does not.
                BindKind::Dir if b.writable => flags |= libc::MS_NODEV | libc::MS_NOEXEC,
                BindKind::Dir => flags |= libc::MS_NODEV,
            }
            step(
                b"remount bind",
                check(unsafe {
                    libc::mount(
                        std::ptr::null(),
                        b.dst.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    )
                }),
            )?;
        }
        step(
            b"chdir new root",
            check(unsafe { libc::chdir(self.root.as_ptr()) }),
        )?;
        step(
            b"pivot_root",
            check(unsafe {
                libc::syscall(libc::SYS_pivot_root, self.dot.as_ptr(), self.dot.as_ptr()) as i32
            }),
        )?;
        step(
            b"detach old root",
            check(unsafe { libc::umount2(self.dot.as_ptr(), libc::MNT_DETACH) }),
        )?;
        step(
            b"chdir /",
            check(unsafe { libc::chdir(self.slash.as_ptr()) }),
        )?;
        step(
            b"remount root read-only",
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    self.slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
                    self.tmpfs_opts.as_ptr().cast(),
                )
            }),
        )?;
        step(
            b"setgroups",
            check(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) }),
        )?;
        let (uid, gid) = (self.ids.uid, self.ids.gid);
        step(
            b"setresgid",
            check(unsafe { libc::setresgid(gid, gid, gid) }),
        )?;
        // The bounding set can only be emptied while CAP_SETPCAP is still held, before setuid.
        for cap in 0..=63 {
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return step(b"drop bounding set", check(r));
            }
        }
        step(
            b"clear ambient caps",
            check(unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                )
            }),
        )?;
        // Leaving uid 0 clears the permitted and effective sets (SECBIT_KEEP_CAPS is off).
        step(
            b"setresuid",
            check(unsafe { libc::setresuid(uid, uid, uid) }),
        )?;
        step(b"clear capabilities", clear_caps())?;
        step(
            b"no_new_privs",
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }),
        )?;
        Ok(())
    }

    /// Makes the VM's uid/gid the owner of its (persistent) tap, which QEMU opens by name.
    fn set_tap_owner(&self, tap: &[u8; 16]) -> std::io::Result<()> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
        const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            pad: [u8; 22],
        }
        let req = IfReq {
            name: *tap,
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            pad: [0; 22],
        };
        // SAFETY: open/ioctl/close on a path owned by `self` and an ifreq on the stack that
        // lives across the calls; the fd is closed on every path.
        unsafe {
            let fd = libc::open(self.tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            check(fd)?;
            let r = (|| {
                check(libc::ioctl(fd, TUNSETIFF, &req) as i32)?;
                check(libc::ioctl(fd, TUNSETOWNER, self.ids.uid as libc::c_ulong) as i32)?;
                check(libc::ioctl(fd, TUNSETGROUP, self.ids.gid as libc::c_ulong) as i32)
            })();
            libc::close(fd);
            r
        }
    }
}

/// Empties every capability set of this thread (inheritable included; permitted and effective
/// are empty already after leaving uid 0).
fn clear_caps() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a v3 header and two data structs, both on the stack.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as i32 })
}

fn check(r: i32) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Passes `r` through; on error writes `alcove jail: <what> failed` to stderr first (a fixed
/// buffer: no allocation in the child).
fn step(what: &[u8], r: std::io::Result<()>) -> std::io::Result<()> {
    if r.is_err() {
        let mut line = [0u8; 96];
        let prefix = b"alcove jail: ";
        let suffix = b" failed\n";
        let n = (prefix.len() + what.len() + suffix.len()).min(line.len());
        let mut at = 0;
        for part in [&prefix[..], what, &suffix[..]] {
            let take = part.len().min(n - at);
            line[at..at + take].copy_from_slice(&part[..take]);
            at += take;
        }
        // SAFETY: writes `at` bytes of a stack buffer to fd 2.
        unsafe { libc::write(2, line.as_ptr().cast(), at) };
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JailConfig {
        JailConfig {
            uid_base: 1000,
            uid_count: 3,
        }
    }

    #[test]
    fn uids_come_from_the_range_lowest_free_first() {
        let none = BTreeSet::new();
        assert_eq!(pick_uid(cfg(), &none, &none), Some(1001));
        let used: BTreeSet<u32> = [1001].into();
        assert_eq!(pick_uid(cfg(), &used, &none), Some(1002));
        // A uid some process already runs as (another server on the host) is skipped.
        let busy: BTreeSet<u32> = [1002].into();
        assert_eq!(pick_uid(cfg(), &used, &busy), Some(1003));
        let all: BTreeSet<u32> = [1001, 1002, 1003].into();
        assert_eq!(pick_uid(cfg(), &all, &none), None);
    }

    #[test]
    fn jail_allocates_releases_and_adopts() {
        let jail = Jail::new(JailConfig {
            uid_base: 4_000_000_000,
            uid_count: 2,
        });
        let a = jail.allocate().unwrap();
        assert_eq!(a.uid, 4_000_000_001);
        assert_eq!(a.gid, a.uid);
        assert_eq!(a.shared_gid, 4_000_000_000);
        let b = jail.allocate().unwrap();
        assert_eq!(b.uid, 4_000_000_002);
        assert!(matches!(jail.allocate(), Err(JailError::Exhausted(2))));
        jail.release(a.uid);
        assert_eq!(jail.allocate().unwrap().uid, a.uid);
        // A run dir whose group is outside the range was not jailed by us.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(jail.adopt(dir.path()), None);
    }

    #[test]
    fn mount_plan_creates_parents_and_drops_covered_paths() {
        let plan = MountPlan::new(vec![
            Bind::dir(Path::new("/data/sandboxes/a"), true),
            Bind::file(Path::new("/data/sandboxes/a/disk.qcow2"), true),
            Bind::file(Path::new("/cache/t/mem"), false),
            Bind::file(Path::new("/cache/t/vmlinux"), false),
            Bind::dir(Path::new("/usr"), false),
            Bind::dir(Path::new("/usr/bin"), false),
            Bind::device(Path::new("/dev/null")),
        ]);
        let paths: Vec<&Path> = plan.binds.iter().map(|b| b.path.as_path()).collect();
        assert_eq!(
            paths,
            [
                "/data/sandboxes/a",
                "/cache/t/mem",
                "/cache/t/vmlinux",
                "/usr",
                "/dev/null"
            ]
            .map(Path::new)
        );
        let dirs: Vec<&Path> = plan.dirs.iter().map(|d| d.as_path()).collect();
        assert_eq!(
            dirs,
            [
                "/data",
                "/data/sandboxes",
                "/data/sandboxes/a",
                "/cache",
                "/cache/t",
                "/usr",
                "/dev"
            ]
            .map(Path::new)
        );
        assert!(plan.binds[0].writable && !plan.binds[1].writable);
    }

    #[test]
    fn a_directory_bound_later_replaces_the_paths_inside_it() {
        let plan = MountPlan::new(vec![
            Bind::file(Path::new("/r/a/x"), false),
            Bind::dir(Path::new("/r/a"), true),
        ]);
        assert_eq!(plan.binds, vec![Bind::dir(Path::new("/r/a"), true)]);
    }

    #[test]
    fn qcow2_backing_names_are_read_from_the_header() {
        let mut h = [0u8; 20];
        assert_eq!(backing_location(&h), None);
        h[0..4].copy_from_slice(b"QFI\xfb");
        assert_eq!(backing_location(&h), None, "no backing file");
        h[8..16].copy_from_slice(&0x68u64.to_be_bytes());
        h[16..20].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(backing_location(&h), Some((0x68, 9)));
        h[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert_eq!(backing_location(&h), None, "over qcow2's limit");
    }

    #[test]
    fn qcow2_chain_follows_relative_and_absolute_names() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, backing: Option<&str>| {
            let mut buf = vec![0u8; 0x200];
            buf[0..4].copy_from_slice(b"QFI\xfb");
            if let Some(b) = backing {
                buf[8..16].copy_from_slice(&0x100u64.to_be_bytes());
                buf[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
                buf[0x100..0x100 + b.len()].copy_from_slice(b.as_bytes());
            }
            std::fs::write(dir.path().join(name), buf).unwrap();
        };
        let base = dir.path().join("base.qcow2");
        write("base.qcow2", None);
        write("mid.qcow2", Some(base.to_str().unwrap()));
        write("top.qcow2", Some("mid.qcow2"));
        let chain = qcow2_chain(&dir.path().join("top.qcow2")).unwrap();
        assert_eq!(chain, vec![dir.path().join("mid.qcow2"), base]);
        std::fs::write(dir.path().join("raw"), b"not qcow2").unwrap();
        assert!(qcow2_chain(&dir.path().join("raw")).unwrap().is_empty());
    }

    #[test]
    fn relative_and_dotted_paths_are_checked() {
        assert!(absolute(Path::new("/a/../b")).is_err());
        assert!(absolute(Path::new("x")).unwrap().is_absolute());
    }
}
