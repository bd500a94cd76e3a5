//! Host-side resource caps for one VM process: CPU time (vCPUs' worth, so a guest spinning every
//! vCPU under TCG cannot starve the host), memory (guest RAM plus the hypervisor's overhead) and
//! tasks. Works with cgroup v2 (unified) and v1 (per-controller hierarchies); where neither is
//! writable, caps are skipped with a warning, because a missing cgroup must not stop sandboxes.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// CPU bandwidth in units of one core.
    pub cpus: f64,
    pub memory_bytes: u64,
    pub max_tasks: u32,
    /// Share of contended CPU against other cgroups: 100 is the default, 1 the least (see
    /// [`VmCgroup::set_cpu_weight`]).
    pub cpu_weight: u32,
}

/// One VM's cgroup(s). Removing it (after the process exited) removes the directories.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    memory_dir: Option<PathBuf>,
    v2: bool,
}

const ROOT: &str = "/sys/fs/cgroup";

/// cgroup v1 `cpu.shares` (default 1024, least 2) for a v2-style weight (default 100).
fn v1_shares(weight: u32) -> u64 {
    (u64::from(weight.clamp(1, 10_000)) * 1024 / 100).max(2)
}
const PERIOD_US: u64 = 100_000;

impl VmCgroup {
    /// Creates `alcove/<name>` with `limits` and moves `pid` into it.
    pub fn apply(name: &str, pid: u32, limits: Limits) -> std::io::Result<VmCgroup> {
        let root = Path::new(ROOT);
        let quota = ((limits.cpus * PERIOD_US as f64).round() as u64).max(1000);
        if root.join("cgroup.controllers").exists() {
            let parent = root.join("alcove");
            std::fs::create_dir_all(&parent)?;
            // Delegate the controllers we use to our subtree (fails harmlessly if already done).
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory +pids");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory +pids");
            let dir = parent.join(name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))?;
            std::fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
            std::fs::write(dir.join("memory.swap.max"), "0").ok();
            std::fs::write(dir.join("pids.max"), limits.max_tasks.to_string())?;
            let cg = VmCgroup {
                memory_dir: Some(dir.clone()),
                dirs: vec![dir.clone()],
                v2: true,
            };
            cg.set_cpu_weight(limits.cpu_weight)?;
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            return Ok(cg);
        }
        let mut cg = VmCgroup {
            dirs: Vec::new(),
            memory_dir: None,
            v2: false,
        };
        let mut attach = |controller: &str, settings: &[(&str, String)]| -> std::io::Result<()> {
            let base = root.join(controller);
            if !base.join("cgroup.procs").exists() {
                return Ok(());
            }
            let dir = base.join("alcove").join(name);
            std::fs::create_dir_all(&dir)?;
            for (file, value) in settings {
                std::fs::write(dir.join(file), value)?;
            }
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            if controller == "memory" {
                cg.memory_dir = Some(dir.clone());
            }
            cg.dirs.push(dir);
            Ok(())
        };
        attach(
            "cpu",
            &[
                ("cpu.cfs_period_us", PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
                ("cpu.shares", v1_shares(limits.cpu_weight).to_string()),
            ],
        )?;
        attach(
            "memory",
            &[("memory.limit_in_bytes", limits.memory_bytes.to_string())],
        )?;
        attach("pids", &[("pids.max", limits.max_tasks.to_string())])?;
        Ok(cg)
    }

    /// The cgroup(s) a VM started by another process was put in, for clean-up after it exits.
    pub fn existing(name: &str) -> VmCgroup {
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            let dir = root.join("alcove").join(name);
            return VmCgroup {
                memory_dir: Some(dir.clone()),
                dirs: vec![dir],
                v2: true,
            };
        }
        let dirs: Vec<PathBuf> = ["cpu", "memory", "pids"]
            .iter()
            .map(|c| root.join(c).join("alcove").join(name))
            .filter(|d| d.exists())
            .collect();
        let memory_dir = dirs
            .iter()
            .find(|d| d.starts_with(root.join("memory")))
            .cloned();
        VmCgroup {
            dirs,
            memory_dir,
            v2: false,
        }
    }

    /// The VM's CPU weight against other cgroups when the host's cores are contended: 100 is
    /// the default (cgroup v2 `cpu.weight`; v1 `cpu.shares` scaled to match), 1 the least. The
    /// bandwidth cap stays as it is.
    pub fn set_cpu_weight(&self, weight: u32) -> std::io::Result<()> {
        let weight = weight.clamp(1, 10_000);
        for dir in &self.dirs {
            if self.v2 {
                return std::fs::write(dir.join("cpu.weight"), weight.to_string());
            }
            if dir.join("cpu.shares").exists() {
                return std::fs::write(dir.join("cpu.shares"), v1_shares(weight).to_string());
            }
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer acted in this cgroup (so a SIGKILL can be explained).
    pub fn oom_killed(&self) -> bool {
        let Some(dir) = &self.memory_dir else {
            return false;
        };
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes the directories; call after the process has exited. A process that exited but is
    /// not reaped yet (its parent was a CLI invocation that is gone) still pins its cgroup, so
    /// busy directories are retried from a background thread for a few seconds.
    pub fn remove(&self) {
        let busy: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter(|d| std::fs::remove_dir(d).is_err() && d.exists())
            .cloned()
            .collect();
        if busy.is_empty() {
            return;
        }
        std::thread::spawn(move || {
            for d in busy {
                let mut last = None;
                for _ in 0..50 {
                    match std::fs::remove_dir(&d) {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                if let Some(e) = last {
                    tracing::warn!(dir = %d.display(), error = %e, "could not remove cgroup");
                }
            }
        });
    }
}
