//! A VM whose cgroup caps cannot be applied is refused unless the driver allows uncapped VMs.
//! Needs `qemu-system-x86_64` on the PATH (no guest: the VM is refused, or dies, before it boots).

use std::path::Path;

use alcove_vmm::{AccelChoice, Disk, DiskFormat, QemuVmm, VmSpec, Vmm, VmmError, cgroup::Limits};

/// A spec whose cgroup cannot be made: the cgroup is named after the run dir, and
/// `alcove/cgroup.procs` is a file in every cgroup directory (as a non-root user, no cgroup can
/// be made at all).
fn spec(dir: &Path) -> VmSpec {
    let run_dir = dir.join("cgroup.procs");
    std::fs::create_dir(&run_dir).unwrap();
    VmSpec {
        kernel: dir.join("no-such-kernel"),
        cmdline: String::new(),
        vcpus: 1,
        mem_mib: 64,
        ram_file: dir.join("ram"),
        ram_shared: false,
        disk: Disk {
            path: dir.join("disk.raw"),
            format: DiskFormat::Raw,
            read_only: true,
        },
        limits: Some(Limits {
            cpus: 1.0,
            memory_bytes: 256 << 20,
            max_tasks: 64,
            cpu_weight: 100,
        }),
        agent_port: "agent".into(),
        nic: None,
        netns: None,
        run_dir,
    }
}

fn vmm() -> QemuVmm {
    QemuVmm::new(AccelChoice {
        accel: alcove_vmm::Accel::Tcg,
        reason: "test".into(),
    })
    .without_jail()
}

#[tokio::test]
async fn a_vm_without_cgroup_caps_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.raw"), vec![0u8; 4096]).unwrap();
    match vmm().boot(&spec(dir.path())).await {
        Err(e @ VmmError::Uncapped(_)) => {
            assert!(e.to_string().contains("--allow-uncapped"), "{e}")
        }
        Err(e) => panic!("expected a refusal for missing caps, got: {e}"),
        Ok(_) => panic!("an uncapped VM was started"),
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.raw"), vec![0u8; 4096]).unwrap();
    let mut allowing = vmm();
    allowing.allow_uncapped = true;
    // Allowed: the VM is started (and then dies, having no kernel), not refused.
    match allowing.boot(&spec(dir.path())).await {
        Err(VmmError::Uncapped(e)) => panic!("refused despite allow_uncapped: {e}"),
        Err(_) => {}
        Ok(vm) => alcove_vmm::Vm::kill(&vm).await,
    }
}
