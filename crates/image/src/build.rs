//! Template builds: kernel → base rootfs → template disk → boot → ready → snapshot.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alcove_guest_contract::{AGENT_CHANNEL, AGENT_GUEST_PATH, READY_LINE};
use alcove_vmm::{Disk, DiskFormat, Nic, QemuVmm, Vm, VmSpec, Vmm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{ImageError, Recipe};

const KERNEL_SCRIPT: &str = include_str!("../../../guest/kernel/build.sh");
const KERNEL_CONFIG: &str = include_str!("../../../guest/kernel/config");
const ROOTFS_SCRIPT: &str = include_str!("../../../guest/rootfs/build-base.sh");
const ROOTFS_PACKAGES: &str = include_str!("../../../guest/rootfs/packages.txt");

/// Generous: under TCG on a busy 2-core machine a template whose start command warms up a Python
/// data stack has been seen to need more than 5 minutes.
const READY_TIMEOUT: Duration = Duration::from_secs(900);
const MANIFEST_VERSION: u32 = 1;

/// Progress of a build, for the CLI's display.
pub type Progress = Arc<dyn Fn(ProgressEvent) + Send + Sync>;

/// Makes the network namespace a template VM boots in: one holding the tap named
/// [`alcove_guest_contract::net::TAP`] and nothing behind it (`alcove_net::Netns::create(false)`).
/// Returns the namespace's fd. Called on a blocking thread.
pub type NetnsFactory = Arc<dyn Fn() -> std::io::Result<OwnedFd> + Send + Sync>;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    Step {
        index: u32,
        total: u32,
        name: String,
        cached: bool,
    },
    Line {
        text: String,
    },
}

pub struct BuildOptions {
    pub cache_dir: PathBuf,
    /// The `alcove-agent` binary to install in the guest.
    pub agent_bin: PathBuf,
    pub vmm: QemuVmm,
    /// Rebuild even when a complete template with the same key exists.
    pub force: bool,
    pub progress: Progress,
    /// The template VM's network namespace (its NIC is part of the machine description).
    pub netns: NetnsFactory,
}

/// A built template, as recorded in its `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Template {
    pub manifest_version: u32,
    pub name: String,
    pub key: String,
    pub dir: PathBuf,
    pub recipe: Recipe,
    pub kernel: PathBuf,
    pub disk: PathBuf,
    pub mem: PathBuf,
    pub state: PathBuf,
    /// An empty qcow2 overlay over `disk`; each sandbox starts from a copy of it.
    pub overlay: PathBuf,
    pub state_sha256: String,
    pub mem_sha256: String,
    pub accel: String,
    pub built_at_unix: u64,
    pub build_secs: f64,
    pub boot_to_ready_secs: f64,
}

impl Template {
    /// Checks the device-state checksum (cheap; run before every restore).
    pub fn verify_state(&self) -> Result<(), ImageError> {
        let got = sha256_file(&self.state)?;
        if got != self.state_sha256 {
            return Err(ImageError::Corrupt {
                name: self.name.clone(),
                detail: format!(
                    "device state {} has checksum {got}, expected {}",
                    self.state.display(),
                    self.state_sha256
                ),
            });
        }
        Ok(())
    }

    /// Checks every checksum, including the RAM file (hundreds of MB; run at load, not per create).
    pub fn verify_all(&self) -> Result<(), ImageError> {
        self.verify_state()?;
        let got = sha256_file(&self.mem)?;
        if got != self.mem_sha256 {
            return Err(ImageError::Corrupt {
                name: self.name.clone(),
                detail: format!(
                    "RAM file {} has checksum {got}, expected {}",
                    self.mem.display(),
                    self.mem_sha256
                ),
            });
        }
        for p in [&self.kernel, &self.disk, &self.overlay] {
            if !p.exists() {
                return Err(ImageError::Corrupt {
                    name: self.name.clone(),
                    detail: format!("{} is missing", p.display()),
                });
            }
        }
        Ok(())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |e| ImageError::Io(path.display().to_string(), e)
}

pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn templates_dir(cache: &Path) -> PathBuf {
    cache.join("templates")
}

/// The newest complete build of template `name`.
pub fn load_template(cache: &Path, name: &str) -> Result<Template, ImageError> {
    let link = templates_dir(cache).join("by-name").join(name);
    let key = match std::fs::read_to_string(&link) {
        Ok(k) => k.trim().to_string(),
        Err(_) => return Err(ImageError::UnknownTemplate(name.to_string())),
    };
    let manifest = templates_dir(cache).join(&key).join("manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|_| ImageError::UnknownTemplate(name.to_string()))?;
    let t: Template = serde_json::from_str(&text).map_err(|e| ImageError::Corrupt {
        name: name.to_string(),
        detail: format!("manifest: {e}"),
    })?;
    if t.manifest_version != MANIFEST_VERSION {
        return Err(ImageError::Corrupt {
            name: name.to_string(),
            detail: "manifest from another Alcove version".into(),
        });
    }
    Ok(t)
}

/// A template by its exact build key (what a sandbox was made from, even if `name` was rebuilt since).
pub fn load_template_key(cache: &Path, key: &str) -> Result<Template, ImageError> {
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ImageError::UnknownTemplate(key.to_string()));
    }
    load_template_dir(&templates_dir(cache).join(key))
        .map_err(|_| ImageError::UnknownTemplate(key.to_string()))
}

/// Names of templates that have a complete build.
pub fn list_templates(cache: &Path) -> Vec<Template> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(templates_dir(cache).join("by-name")) {
        for e in rd.flatten() {
            if let Ok(t) = load_template(cache, &e.file_name().to_string_lossy()) {
                out.push(t);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Runs an embedded build script (with its data files beside it) and returns its last stdout line.
async fn run_script(
    step: &'static str,
    files: &[(&str, &str)],
    cache: &Path,
    progress: &Progress,
) -> Result<PathBuf, ImageError> {
    let dir = tempfile::tempdir().map_err(io(Path::new("/tmp")))?;
    for (name, content) in files {
        let p = dir.path().join(name);
        std::fs::write(&p, content).map_err(io(&p))?;
        if name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(io(&p))?;
        }
    }
    let mut child = tokio::process::Command::new("bash")
        .arg(dir.path().join(files[0].0))
        .env("ALCOVE_CACHE", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Step {
            step,
            detail: format!("cannot run bash: {e}"),
        })?;
    let stderr = child.stderr.take().expect("piped");
    let p = progress.clone();
    let tail = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tail2 = tail.clone();
    let pump = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            p(ProgressEvent::Line { text: line.clone() });
            let mut t = tail2.lock().expect("tail lock");
            t.push(line);
            if t.len() > 20 {
                t.remove(0);
            }
        }
    });
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| ImageError::Step {
            step,
            detail: e.to_string(),
        })?;
    let _ = pump.await;
    if !out.status.success() {
        let t = tail.lock().expect("tail lock").join("\n");
        return Err(ImageError::Step {
            step,
            detail: format!("{}; last output:\n{t}", out.status),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or("").trim();
    if path.is_empty() {
        return Err(ImageError::Step {
            step,
            detail: "the script printed no output path".into(),
        });
    }
    Ok(PathBuf::from(path))
}

async fn run_cmd(step: &'static str, cmd: &mut tokio::process::Command) -> Result<(), ImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ImageError::Step {
            step,
            detail: format!("cannot start: {e}"),
        })?;
    if !out.status.success() {
        let mut detail = format!("{}", out.status);
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        detail.push_str(&format!(
            "; stderr:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        ));
        return Err(ImageError::Step { step, detail });
    }
    Ok(())
}

async fn qemu_version(vmm: &QemuVmm) -> String {
    match tokio::process::Command::new(&vmm.binary)
        .arg("--version")
        .output()
        .await
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Err(_) => String::new(),
    }
}

/// Builds `recipe` (or returns the cached build with the same inputs).
pub async fn build_template(recipe: &Recipe, opts: &BuildOptions) -> Result<Template, ImageError> {
    let started = Instant::now();
    let total = 6;
    let step = |index: u32, name: &str, cached: bool| {
        (opts.progress)(ProgressEvent::Step {
            index,
            total,
            name: name.to_string(),
            cached,
        })
    };
    let cache = &opts.cache_dir;

    // The kernel build is CPU-bound and the rootfs build mostly waits on the Debian mirror: run
    // them side by side.
    step(1, "guest kernel and base root file system", false);
    let (kernel, base) = tokio::join!(
        run_script(
            "guest kernel build",
            &[("build.sh", KERNEL_SCRIPT), ("config", KERNEL_CONFIG)],
            cache,
            &opts.progress
        ),
        run_script(
            "base rootfs build",
            &[
                ("build-base.sh", ROOTFS_SCRIPT),
                ("packages.txt", ROOTFS_PACKAGES)
            ],
            cache,
            &opts.progress,
        )
    );
    let (kernel, base) = (kernel?, base?);
    step(2, "agent binary", false);

    let agent_sha = sha256_file(&opts.agent_bin)?;
    let mut h = Sha256::new();
    h.update(MANIFEST_VERSION.to_le_bytes());
    h.update(recipe.canonical());
    h.update(kernel.as_os_str().as_encoded_bytes());
    h.update(base.as_os_str().as_encoded_bytes());
    h.update(agent_sha.as_bytes());
    h.update(qemu_version(&opts.vmm).await.as_bytes());
    h.update(opts.vmm.accel.accel.as_str().as_bytes());
    h.update(
        alcove_vmm::qemu::QemuVmm::args(
            &opts.vmm,
            &spec_for(recipe, Path::new("/"), &kernel),
            false,
        )
        .join(" "),
    );
    let key = hex::encode(&h.finalize()[..8]);
    let dir = templates_dir(cache).join(&key);

    if !opts.force
        && let Ok(t) = load_template_dir(&dir)
    {
        step(3, "template disk", true);
        step(4, "boot to ready", true);
        step(5, "snapshot", true);
        step(6, "done", true);
        set_name(cache, &recipe.name, &key)?;
        return Ok(t);
    }
    if dir.exists() {
        make_writable(&dir);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;

    step(3, "template disk", false);
    let disk = dir.join("disk.ext4");
    make_disk(recipe, &base, &opts.agent_bin, &dir, &disk).await?;

    step(4, "boot to ready", false);
    // The template boots with its NIC in a namespace of its own, with nothing behind it.
    let netns = opts.netns.clone();
    let ns = tokio::task::spawn_blocking(move || netns())
        .await
        .expect("netns task")
        .map_err(io(Path::new("network namespace")))?;
    let snap = snapshot_disk(&SnapshotDisk {
        vmm: &opts.vmm,
        recipe,
        kernel: &kernel,
        dir: &dir,
        disk: &disk,
        netns: Some(Arc::new(ns)),
        ready_timeout: READY_TIMEOUT,
        progress: &opts.progress,
        on_snapshot: &|| step(5, "snapshot", false),
    })
    .await?;
    let t = Template {
        manifest_version: MANIFEST_VERSION,
        name: recipe.name.clone(),
        key: key.clone(),
        dir: dir.clone(),
        recipe: recipe.clone(),
        kernel,
        disk: disk.clone(),
        state_sha256: snap.state_sha256,
        mem_sha256: snap.mem_sha256,
        mem: snap.mem,
        state: snap.state,
        overlay: snap.overlay,
        accel: opts.vmm.accel.accel.as_str().to_string(),
        built_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_secs: started.elapsed().as_secs_f64(),
        boot_to_ready_secs: snap.boot_to_ready.as_secs_f64(),
    };
    write_manifest(&t)?;
    set_name(cache, &recipe.name, &key)?;
    step(6, "done", false);
    Ok(t)
}

/// What [`snapshot_disk`] needs: a template's disk, its machine, and where its files go.
pub struct SnapshotDisk<'a> {
    /// The VMM that boots the disk: a node's jailed one when the disk holds a caller's code.
    pub vmm: &'a QemuVmm,
    /// The machine (vCPUs, memory) of the template's VMs.
    pub recipe: &'a Recipe,
    pub kernel: &'a Path,
    /// The template's dir: `mem`, `state` and `overlay.qcow2` are made in it.
    pub dir: &'a Path,
    /// The raw ext4 root disk, inside `dir`.
    pub disk: &'a Path,
    /// The VM's network namespace (a tap named [`alcove_guest_contract::net::TAP`], nothing behind it).
    pub netns: Option<Arc<OwnedFd>>,
    pub ready_timeout: Duration,
    pub progress: &'a Progress,
    /// Called once the agent is ready, before the snapshot.
    pub on_snapshot: &'a (dyn Fn() + Sync),
}

/// A template's snapshot: the files [`snapshot_disk`] made.
#[derive(Debug, Clone)]
pub struct DiskSnapshot {
    pub mem: PathBuf,
    pub state: PathBuf,
    pub overlay: PathBuf,
    pub mem_sha256: String,
    pub state_sha256: String,
    pub boot_to_ready: Duration,
}

/// Boots `disk` until the agent prints its ready line (it starts the template's command and waits
/// for its ready command first), snapshots the VM into `mem` + `state`, and makes the empty
/// overlay sandboxes copy. Shared by the recipe builds and the node's API builds.
pub async fn snapshot_disk(req: &SnapshotDisk<'_>) -> Result<DiskSnapshot, ImageError> {
    let dir = req.dir;
    let run_dir = dir.join("boot");
    std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    let mut spec = spec_for(req.recipe, &run_dir, req.kernel);
    spec.ram_file = dir.join("mem");
    spec.ram_shared = true;
    spec.disk = Disk {
        path: req.disk.to_path_buf(),
        format: DiskFormat::Raw,
        read_only: false,
    };
    spec.netns = req.netns.clone();
    let boot_started = Instant::now();
    let vm = req.vmm.boot(&spec).await.map_err(ImageError::Boot)?;
    let ready = tokio::select! {
        r = tokio::time::timeout(req.ready_timeout, vm.console().wait_for(READY_LINE)) => r.is_ok(),
        _ = vm.wait_exit() => false,
    };
    if !ready {
        let tail = vm.console().tail(30);
        vm.kill().await;
        let _ = std::fs::remove_dir_all(&run_dir);
        return Err(ImageError::NotReady(req.ready_timeout, tail));
    }
    let boot_to_ready = boot_started.elapsed();
    (req.progress)(ProgressEvent::Line {
        text: format!(
            "[template] agent ready {:.1} s after boot",
            boot_to_ready.as_secs_f64()
        ),
    });
    (req.on_snapshot)();
    let state = dir.join("state");
    let snap = vm.snapshot(&state).await;
    vm.kill().await;
    let _ = std::fs::remove_dir_all(&run_dir);
    snap.map_err(ImageError::Boot)?;
    let mem = dir.join("mem");
    // A jailed VM owned its disk and RAM file while it ran: they are the server's again.
    for p in [req.disk, mem.as_path()] {
        let _ = std::os::unix::fs::lchown(p, Some(0), Some(0));
    }

    let overlay = dir.join("overlay.qcow2");
    run_cmd(
        "overlay creation",
        tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(req.disk)
            .arg(&overlay),
    )
    .await?;
    // Hundreds of MB: hashed off the async threads, which serve sandboxes meanwhile.
    let (s, m) = (state.clone(), mem.clone());
    let (state_sha256, mem_sha256) = tokio::task::spawn_blocking(move || {
        Ok::<_, ImageError>((sha256_file(&s)?, sha256_file(&m)?))
    })
    .await
    .map_err(|e| ImageError::Step {
        step: "hashing the template",
        detail: e.to_string(),
    })??;
    Ok(DiskSnapshot {
        state_sha256,
        mem_sha256,
        mem,
        state,
        overlay,
        boot_to_ready,
    })
}

/// Makes a template's files read-only and writes its `manifest.json` (last: it marks the
/// template complete).
pub fn write_manifest(t: &Template) -> Result<(), ImageError> {
    // Read-only from here on: restored VMs map `mem` copy-on-write and read `disk` under their
    // overlays, so a write to either would change every sandbox made from this template. Owner
    // only: API-built templates live in the private data dir, and the jail grants its VMs read
    // through its shared group (root:<shared> 0440) when one first restores from them.
    for p in [&t.disk, &t.mem, &t.state, &t.overlay] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o400)).map_err(io(p))?;
    }
    let manifest = t.dir.join("manifest.json");
    let tmp = t.dir.join("manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(t).expect("serialises")).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &manifest).map_err(io(&manifest))
}

/// The manifest version of templates this build writes.
pub const fn manifest_version() -> u32 {
    MANIFEST_VERSION
}

pub fn load_template_dir(dir: &Path) -> Result<Template, ImageError> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).map_err(io(dir))?;
    serde_json::from_str(&text).map_err(|e| ImageError::Corrupt {
        name: dir.display().to_string(),
        detail: e.to_string(),
    })
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644));
        }
    }
}

/// Makes build `key` the one template `name` resolves to in `cache` (a template taken in from
/// another node of a cluster, say).
pub fn set_template_name(cache: &Path, name: &str, key: &str) -> Result<(), ImageError> {
    set_name(cache, name, key)
}

fn set_name(cache: &Path, name: &str, key: &str) -> Result<(), ImageError> {
    let dir = templates_dir(cache).join("by-name");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, key).map_err(io(&tmp))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(io(&dir))
}

/// The machine description of a template's VMs (the run dir, RAM file and disk are per VM).
pub fn spec_for(recipe: &Recipe, run_dir: &Path, kernel: &Path) -> VmSpec {
    VmSpec {
        run_dir: run_dir.to_path_buf(),
        kernel: kernel.to_path_buf(),
        cmdline: format!(
            "init={AGENT_GUEST_PATH} {}",
            alcove_guest_contract::net::kernel_cmdline()
        ),
        vcpus: recipe.vcpus,
        mem_mib: recipe.memory_mib,
        ram_file: PathBuf::new(),
        ram_shared: false,
        disk: Disk {
            path: PathBuf::new(),
            format: DiskFormat::Qcow2,
            read_only: false,
        },
        limits: None,
        agent_port: AGENT_CHANNEL.to_string(),
        nic: Some(Nic {
            tap: alcove_guest_contract::net::TAP.to_string(),
            mac: alcove_guest_contract::net::GUEST_MAC.to_string(),
        }),
        netns: None,
    }
}

/// Unpacks the base rootfs, applies the recipe, installs the agent and makes the ext4 image.
async fn make_disk(
    recipe: &Recipe,
    base: &Path,
    agent: &Path,
    dir: &Path,
    disk: &Path,
) -> Result<(), ImageError> {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    run_cmd(
        "unpacking the base rootfs",
        tokio::process::Command::new("tar")
            .arg("-xf")
            .arg(base)
            .arg("-C")
            .arg(&root),
    )
    .await?;

    let mut script = String::new();
    if !recipe.apt.is_empty() {
        script.push_str(&format!(
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {} && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb\n",
            shell_words(&recipe.apt)
        ));
    }
    if !recipe.pip.is_empty() {
        script.push_str(&format!(
            "pip install --no-cache-dir -q {}\n",
            shell_words(&recipe.pip)
        ));
    }
    if !recipe.npm.is_empty() {
        script.push_str(&format!(
            "npm install -g --no-fund --no-audit {}\n",
            shell_words(&recipe.npm)
        ));
    }
    for cmd in &recipe.run {
        script.push_str(cmd);
        script.push('\n');
    }
    if !script.is_empty() {
        // A private mount namespace: /proc and /dev mounted for the chroot disappear with it,
        // whatever happens to the script.
        let r = root.display().to_string();
        // Downloads (pip, npm) go out through the host's network, so they trust what the host
        // trusts: its CA bundle is lent to the build and removed after (the image keeps its own).
        let outer = format!(
            "set -e; mount -t proc proc '{r}/proc'; mount --rbind /dev '{r}/dev'; cp /etc/resolv.conf '{r}/etc/resolv.conf'; \
             if [ -s {HOST_CA} ]; then cp {HOST_CA} '{r}{BUILD_CA}'; export PIP_CERT={BUILD_CA} SSL_CERT_FILE={BUILD_CA} REQUESTS_CA_BUNDLE={BUILD_CA} NODE_EXTRA_CA_CERTS={BUILD_CA} npm_config_cafile={BUILD_CA}; fi; \
             chroot '{r}' /bin/sh -ec \"$ALCOVE_SCRIPT\"; rm -f '{r}/etc/resolv.conf' '{r}{BUILD_CA}'"
        );
        run_cmd(
            "template recipe steps",
            tokio::process::Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c", &outer])
                .env("ALCOVE_SCRIPT", &script),
        )
        .await?;
    }

    for (path, contents) in &recipe.files {
        let p = root.join(path.trim_start_matches('/'));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&p, contents).map_err(io(&p))?;
    }
    // The guest's resolver is the gateway of its network namespace (alcove-net).
    let resolv = root.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::fs::write(&resolv, alcove_guest_contract::net::resolv_conf()).map_err(io(&resolv))?;
    let etc = root.join("etc/alcove");
    std::fs::create_dir_all(&etc).map_err(io(&etc))?;
    let cfg = serde_json::json!({
        "start_cmd": recipe.start_cmd,
        "ready_cmd": recipe.ready_cmd,
        "start_user": recipe.start_user,
        "envs": recipe.env,
        // No `workdir`: the agent makes it every process's default, and a built-in template's
        // processes start in their user's home (root's in /root).
        "user": "user",
    });
    let cfg_path = etc.join("template.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_vec_pretty(&cfg).expect("serialises"),
    )
    .map_err(io(&cfg_path))?;
    let agent_dst = root.join(AGENT_GUEST_PATH.trim_start_matches('/'));
    std::fs::copy(agent, &agent_dst).map_err(io(&agent_dst))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&agent_dst, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&agent_dst))?;
    }
    // `mcp-gateway` in every template: the agent runs the MCP gateway when called by that name
    // (what the SDKs run after `Sandbox.create(mcp=...)`).
    let gw = root.join(alcove_guest_contract::MCP_GATEWAY_GUEST_PATH.trim_start_matches('/'));
    let _ = std::fs::remove_file(&gw);
    std::os::unix::fs::symlink("alcove-agent", &gw).map_err(io(&gw))?;

    run_cmd(
        "making the ext4 image",
        tokio::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "alcove-root",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(&root)
            .arg(disk)
            .arg(format!("{}M", recipe.disk_mib)),
    )
    .await?;
    std::fs::remove_dir_all(&root).map_err(io(&root))?;
    Ok(())
}

/// The host's CA bundle, and where the recipe steps see it in the rootfs.
const HOST_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
const BUILD_CA: &str = "/tmp/alcove-build-ca.crt";

fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quotes() {
        assert_eq!(
            shell_words(&["a b".into(), "it's".into()]),
            "'a b' 'it'\\''s'"
        );
    }

    /// The machine description is hashed into every template key: a change here rebuilds every
    /// template and must be deliberate.
    #[test]
    fn machine_description_is_stable() {
        let vmm = QemuVmm {
            binary: "qemu-system-x86_64".into(),
            accel: alcove_vmm::AccelChoice {
                accel: alcove_vmm::Accel::Tcg,
                reason: String::new(),
            },
            tsc_khz: 2_000_000,
            jail: None,
            allow_uncapped: false,
        };
        let recipe = Recipe::builtin("base").unwrap();
        let spec = spec_for(&recipe, Path::new("/"), Path::new("/k/vmlinux"));
        assert_eq!(
            vmm.args(&spec, false).join(" "),
            "-M microvm,acpi=off,x-option-roms=off,memory-backend=mem \
             -accel tcg,thread=multi,tb-size=128 -cpu max -smp 2 -m 512M \
             -object memory-backend-file,id=mem,size=512M,mem-path=,share=off \
             -nodefaults -no-user-config -display none -no-reboot \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -kernel /k/vmlinux \
             -append console=ttyS0 quiet root=/dev/vda rw rootfstype=ext4 reboot=t panic=-1 \
             tsc_early_khz=2000000 tsc=reliable no_timer_check init=/usr/local/bin/alcove-agent \
             ip=10.0.2.2::10.0.2.1:255.255.255.252::eth0:off \
             -chardev socket,id=con,path=/console.sock,server=on,wait=off -serial chardev:con \
             -device virtio-serial-device,max_ports=2 \
             -chardev socket,id=agent,path=/agent.sock,server=on,wait=off \
             -device virtserialport,chardev=agent,name=alcove.agent \
             -blockdev node-name=disk0,driver=qcow2,file.driver=file,file.filename=,read-only=off,discard=unmap \
             -device virtio-blk-device,drive=disk0 -device virtio-rng-device \
             -qmp unix:/qmp.sock,server=on,wait=off -pidfile /qemu.pid \
             -netdev tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=off \
             -device virtio-net-device,netdev=net0,mac=02:a1:c0:00:00:02"
        );
    }

    #[test]
    fn embedded_recipes_are_present() {
        assert!(KERNEL_CONFIG.contains("CONFIG_PVH=y"));
        assert!(ROOTFS_PACKAGES.contains("python3"));
    }
}
