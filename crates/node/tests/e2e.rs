//! End-to-end tests on real microVMs (QEMU, TCG on the dev machines) restored from the built
//! `base` template. They need `alcove template build base` first, so they are `#[ignore]`d for a
//! plain `cargo test`; `scripts/test.sh` builds the template and runs them with `--include-ignored`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alcove_agent_client::RunRequest;
use alcove_node::{CreateOptions, Node, NodeConfig, SandboxState};
use alcove_vmm::{QemuVmm, Vm};

fn cache_dir() -> PathBuf {
    std::env::var_os("ALCOVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/alcove"))
}

async fn node(data: &Path) -> Arc<Node> {
    Node::open(NodeConfig {
        data_dir: data.to_path_buf(),
        cache_dir: cache_dir(),
        vmm: QemuVmm::new(alcove_vmm::accel::detect(None)),
        max_sandboxes: 100,
        max_starting: 0,
        admission_wait: alcove_node::ADMISSION_WAIT,
        egress: std::sync::Arc::new(alcove_net::EgressConfig::new(
            alcove_net::Guard::new(&alcove_net::policy::host_addresses(), vec![]),
            alcove_net::egress::host_resolver(),
        )),
    })
    .await
    .expect("node opens")
}

/// Kills any VM still running under a test's data dir when the test ends, passed or failed, so a
/// failing test does not leave QEMU processes behind.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in qemu_pids_under(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn data_dir() -> (tempfile::TempDir, Reaper) {
    let dir = tempfile::tempdir().unwrap();
    let reaper = Reaper(dir.path().to_path_buf());
    (dir, reaper)
}

fn base() -> CreateOptions {
    CreateOptions {
        template: "base".into(),
        ..Default::default()
    }
}

fn sh(cmd: &str) -> RunRequest {
    RunRequest {
        cmd: "/bin/bash".into(),
        args: vec!["-c".into(), cmd.into()],
        ..Default::default()
    }
}

async fn out(node: &Node, id: &str, cmd: &str) -> String {
    let o = node.run(id, sh(cmd)).await.expect("command runs");
    assert_eq!(
        o.exit_code,
        0,
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// QEMU processes whose command line mentions `dir`.
fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

fn files_under(dir: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        1 + if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            0
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn runs_shell_python_and_node() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let mut opts = base();
    opts.envs = BTreeMap::from([("GREETING".to_string(), "hello from the host".to_string())]);
    let (info, _) = node.create(opts).await.unwrap();
    assert_eq!(info.state, SandboxState::Running);

    let o = node
        .run(
            &info.id,
            RunRequest {
                cmd: "/bin/echo".into(),
                args: vec!["hi".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(o.stdout, b"hi\n");
    assert_eq!(o.exit_code, 0);
    assert_eq!(
        out(&node, &info.id, "python3 -c 'print(6*7)'").await,
        "42\n"
    );
    assert_eq!(
        out(
            &node,
            &info.id,
            "node -e 'console.log([1,2,3].map(x => x * 2).join(\",\"))'"
        )
        .await,
        "2,4,6\n"
    );
    assert_eq!(
        out(&node, &info.id, "echo $GREETING").await,
        "hello from the host\n"
    );
    // The default user is `user`, as in E2B, with root through sudo.
    assert_eq!(out(&node, &info.id, "whoami").await, "user\n");
    assert_eq!(out(&node, &info.id, "sudo -n whoami").await, "root\n");
    let failing = node.run(&info.id, sh("exit 3")).await.unwrap();
    assert_eq!(failing.exit_code, 3);
    node.kill(&info.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn siblings_are_isolated_and_unique() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let (a, _) = node.create(base()).await.unwrap();
    let (b, _) = node.create(base()).await.unwrap();

    out(
        &node,
        &a.id,
        "echo secret > /home/user/only-in-a.txt && sync",
    )
    .await;
    assert_eq!(
        out(&node, &a.id, "cat /home/user/only-in-a.txt").await,
        "secret\n"
    );
    let o = node
        .run(
            &b.id,
            sh("test -e /home/user/only-in-a.txt && echo visible || echo absent"),
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "absent\n");

    let rand_a = out(
        &node,
        &a.id,
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
    )
    .await;
    let rand_b = out(
        &node,
        &b.id,
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
    )
    .await;
    assert_eq!(rand_a.len(), 64);
    assert_ne!(
        rand_a, rand_b,
        "two sandboxes from one snapshot produced the same random bytes"
    );
    let py_a = out(
        &node,
        &a.id,
        "python3 -c 'import random; print(random.random())'",
    )
    .await;
    let py_b = out(
        &node,
        &b.id,
        "python3 -c 'import random; print(random.random())'",
    )
    .await;
    assert_ne!(py_a, py_b);

    let host_a = out(&node, &a.id, "hostname").await;
    let host_b = out(&node, &b.id, "hostname").await;
    assert_eq!(host_a.trim(), a.id);
    assert_eq!(host_b.trim(), b.id);
    // The clock was set from the host at restore, not left at the template's build time.
    let guest_now: i64 = out(&node, &a.id, "date +%s").await.trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() < 30,
        "guest clock {guest_now} vs host {host_now}"
    );

    node.kill(&a.id).await.unwrap();
    node.kill(&b.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn kill_leaves_nothing_behind() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let before_procs = qemu_pids_under(data.path()).len();
    let before_files = files_under(data.path());
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(node.create(base()).await.unwrap().0.id);
    }
    assert_eq!(qemu_pids_under(data.path()).len(), before_procs + 3);
    assert!(files_under(data.path()) > before_files);
    for id in &ids {
        node.kill(id).await.unwrap();
    }
    assert_eq!(
        qemu_pids_under(data.path()).len(),
        before_procs,
        "a QEMU process survived kill"
    );
    assert_eq!(
        files_under(data.path()),
        before_files,
        "kill left files behind"
    );
    assert!(node.list().is_empty());
    let err = node.run(&ids[0], sh("true")).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn qemu_killed_from_outside_is_reported_dead_with_reason() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let (info, _) = node.create(base()).await.unwrap();
    let pid = node.vm(&info.id).unwrap().pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut state = node.get(&info.id).unwrap().state;
    for _ in 0..100 {
        if !state.is_live() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = node.get(&info.id).unwrap().state;
    }
    match &state {
        SandboxState::Dead { reason } => assert!(reason.contains("SIGKILL"), "reason: {reason}"),
        other => panic!("expected dead, got {other}"),
    }
    let err = node.run(&info.id, sh("true")).await.unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
    // A new process opening the same data dir sees the same verdict.
    drop(node);
    let node2 = self::node(data.path()).await;
    assert!(matches!(
        node2.get(&info.id).unwrap().state,
        SandboxState::Dead { .. }
    ));
    node2.kill(&info.id).await.unwrap();
    assert_eq!(
        files_under(data.path()),
        1,
        "only the sandboxes/ dir should remain"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn a_restarted_node_reattaches_running_sandboxes() {
    let (data, _reaper) = data_dir();
    let id = {
        let node = node(data.path()).await;
        let (info, _) = node.create(base()).await.unwrap();
        out(&node, &info.id, "echo kept > /tmp/state").await;
        info.id
    };
    let node = node(data.path()).await;
    assert_eq!(node.get(&id).unwrap().state, SandboxState::Running);
    assert_eq!(out(&node, &id, "cat /tmp/state").await, "kept\n");
    node.kill(&id).await.unwrap();
    assert!(qemu_pids_under(data.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn pause_resume_keeps_processes_files_and_survives_a_restart() {
    let (data, _reaper) = data_dir();
    let id = {
        let node = node(data.path()).await;
        let (info, _) = node.create(base()).await.unwrap();
        // A process holding state in memory and an open file, started in the background.
        out(
            &node,
            &info.id,
            "nohup python3 -c 'import time\nf = open(\"/home/user/counter.log\", \"a\")\nn = 0\nwhile True:\n    n += 1\n    f.write(f\"{n}\\n\"); f.flush()\n    time.sleep(0.2)' >/dev/null 2>&1 &",
        )
        .await;
        out(&node, &info.id, "head -c 1000000 /dev/urandom > /home/user/blob && sha256sum /home/user/blob > /home/user/blob.sum").await;
        // Python takes a while to start under TCG; wait for its first line.
        out(&node, &info.id, "for i in $(seq 300); do test -s /home/user/counter.log && exit 0; sleep 0.1; done; exit 1").await;
        info.id
    };
    for round in 0..3 {
        // Each round in a new node, as after a server restart.
        let node = node(data.path()).await;
        let before: u64 = out(&node, &id, "sleep 0.5; tail -n1 /home/user/counter.log")
            .await
            .trim()
            .parse()
            .unwrap();
        let p = node.pause(&id).await.unwrap();
        assert!(matches!(
            node.get(&id).unwrap().state,
            SandboxState::Paused { .. }
        ));
        assert!(
            qemu_pids_under(data.path()).is_empty(),
            "a paused sandbox must not keep a VM process"
        );
        assert!(p.state_bytes > 0);
        drop(node);
        let node = self::node(data.path()).await;
        node.resume(&id).await.unwrap();
        assert_eq!(
            out(&node, &id, "sha256sum -c /home/user/blob.sum").await,
            "/home/user/blob: OK\n",
            "round {round}"
        );
        let after: u64 = out(&node, &id, "sleep 0.6; tail -n1 /home/user/counter.log")
            .await
            .trim()
            .parse()
            .unwrap();
        assert!(
            after > before,
            "round {round}: counter {before} -> {after}: the process did not survive"
        );
        assert_eq!(out(&node, &id, "pgrep -c -f counter.log").await.trim(), "1");
    }
    let node = node(data.path()).await;
    node.kill(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn a_filesystem_only_pause_keeps_the_disk_and_cold_boots_across_a_restart() {
    let (data, _reaper) = data_dir();
    let id = {
        let node = node(data.path()).await;
        let mut opts = base();
        opts.envs.insert("KEPT".into(), "across the boot".into());
        let (info, _) = node.create(opts).await.unwrap();
        out(&node, &info.id, "head -c 1000000 /dev/urandom > /home/user/blob && sha256sum /home/user/blob > /home/user/blob.sum && cat /proc/sys/kernel/random/boot_id > /home/user/boot1").await;
        out(&node, &info.id, "nohup sleep 1000 >/dev/null 2>&1 &").await;
        let p = node.pause_disk_only(&info.id).await.unwrap();
        assert_eq!(p.state_bytes, 0);
        assert!(matches!(
            node.get(&info.id).unwrap().state,
            SandboxState::Paused {
                disk_only: true,
                ..
            }
        ));
        assert!(qemu_pids_under(data.path()).is_empty());
        assert!(
            !data
                .path()
                .join("sandboxes")
                .join(&info.id)
                .join("paused.state")
                .exists()
        );
        info.id
    };
    // Resumed by a new node, as after a server restart.
    let node = node(data.path()).await;
    node.resume(&id).await.unwrap();
    assert_eq!(
        out(&node, &id, "sha256sum -c /home/user/blob.sum").await,
        "/home/user/blob: OK\n"
    );
    assert_ne!(
        out(&node, &id, "cat /proc/sys/kernel/random/boot_id").await,
        out(&node, &id, "cat /home/user/boot1").await,
        "a filesystem-only resume boots anew"
    );
    assert_eq!(
        out(&node, &id, "pgrep -c -x sleep || true").await.trim(),
        "0"
    );
    assert_eq!(out(&node, &id, "echo $KEPT").await, "across the boot\n");
    assert_eq!(out(&node, &id, "hostname").await.trim(), id);
    // A damaged disk is refused before the boot, and left as it is.
    node.pause_disk_only(&id).await.unwrap();
    let disk = data.path().join("sandboxes").join(&id).join("disk.qcow2");
    let good = std::fs::read(&disk).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&disk, &bad).unwrap();
    let err = node.resume(&id).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    std::fs::write(&disk, &good).unwrap();
    // A full pause resumed with `reboot` drops its memory image and boots from the disk.
    node.resume(&id).await.unwrap();
    out(
        &node,
        &id,
        // A full pause keeps the guest's page cache in its image, which a reboot drops.
        "cat /proc/sys/kernel/random/boot_id > /home/user/boot2 && sync",
    )
    .await;
    node.pause(&id).await.unwrap();
    node.resume_with(&id, true).await.unwrap();
    assert_ne!(
        out(&node, &id, "cat /proc/sys/kernel/random/boot_id").await,
        out(&node, &id, "cat /home/user/boot2").await
    );
    assert!(
        !data
            .path()
            .join("sandboxes")
            .join(&id)
            .join("paused.state")
            .exists()
    );
    node.kill(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn sandboxes_from_a_filesystem_only_snapshot_cold_boot_with_its_files() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let mut opts = base();
    opts.envs.insert("FROM_PARENT".into(), "yes".into());
    let (parent, _) = node.create(opts).await.unwrap();
    out(&node, &parent.id, "echo layer > /home/user/in-layer && cat /proc/sys/kernel/random/boot_id > /home/user/parent-boot").await;
    let (meta, _) = node
        .snapshot_with(&parent.id, "fssnap", true)
        .await
        .unwrap();
    assert!(meta.disk_only && meta.disk_sha256.is_some());
    // The parent goes on where it was.
    assert_eq!(
        out(&node, &parent.id, "cat /proc/sys/kernel/random/boot_id").await,
        out(&node, &parent.id, "cat /home/user/parent-boot").await
    );
    let mut child_opts = base();
    child_opts.snapshot = Some("fssnap".into());
    child_opts.envs.insert("OWN".into(), "child".into());
    let (child, _) = node.create(child_opts).await.unwrap();
    assert_eq!(
        out(&node, &child.id, "cat /home/user/in-layer").await,
        "layer\n"
    );
    assert_ne!(
        out(&node, &child.id, "cat /proc/sys/kernel/random/boot_id").await,
        out(&node, &child.id, "cat /home/user/parent-boot").await,
        "a child of a filesystem-only snapshot boots anew"
    );
    assert_eq!(
        out(&node, &child.id, "echo $FROM_PARENT $OWN").await,
        "yes child\n"
    );
    assert_eq!(out(&node, &child.id, "hostname").await.trim(), child.id);
    // A damaged layer is refused.
    node.kill(&child.id).await.unwrap();
    let layer = data
        .path()
        .join("snapshots")
        .join("fssnap")
        .join("disk.qcow2");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&layer, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let good = std::fs::read(&layer).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&layer, &bad).unwrap();
    let mut again = base();
    again.snapshot = Some("fssnap".into());
    let err = node.create(again).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    std::fs::write(&layer, &good).unwrap();
    node.kill(&parent.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn a_corrupt_pause_snapshot_is_refused_and_left_intact() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let (info, _) = node.create(base()).await.unwrap();
    node.pause(&info.id).await.unwrap();
    let state = data
        .path()
        .join("sandboxes")
        .join(&info.id)
        .join("paused.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let err = node.resume(&info.id).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(matches!(
        node.get(&info.id).unwrap().state,
        SandboxState::Paused { .. }
    ));
    assert_eq!(
        std::fs::read(&state).unwrap(),
        bytes,
        "the snapshot must be left as it was"
    );
    assert!(qemu_pids_under(data.path()).is_empty());
    node.kill(&info.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn snapshots_branch_into_independent_children_and_layers_are_collected() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let (parent, _) = node
        .create(CreateOptions {
            access_token: Some("parent-token".into()),
            ..base()
        })
        .await
        .unwrap();
    out(&node, &parent.id, "echo base > /home/user/f && sync").await;
    node.snapshot(&parent.id, "snapa").await.unwrap();
    // The parent goes on, on a new overlay over the frozen layer.
    assert_eq!(out(&node, &parent.id, "cat /home/user/f").await, "base\n");
    out(&node, &parent.id, "echo parent > /home/user/f").await;
    let mut kids = Vec::new();
    for i in 0..2 {
        let (c, _) = node
            .create(CreateOptions {
                snapshot: Some("snapa".into()),
                access_token: Some(format!("kid-{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(out(&node, &c.id, "cat /home/user/f").await, "base\n");
        assert_eq!(out(&node, &c.id, "hostname").await.trim(), c.id);
        out(&node, &c.id, &format!("echo kid{i} > /home/user/f")).await;
        kids.push(c.id);
    }
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(out(&node, k, "cat /home/user/f").await, format!("kid{i}\n"));
    }
    assert_eq!(out(&node, &parent.id, "cat /home/user/f").await, "parent\n");
    // A second-level snapshot of a child sits on the first.
    node.snapshot(&kids[0], "snapb").await.unwrap();
    let metas = node.snapshots();
    let b = metas.iter().find(|m| m.id == "snapb").unwrap();
    assert_eq!(b.parent.as_deref(), Some("snapa"));
    assert!(
        metas.iter().all(|m| m.shared_ram),
        "memory images are re-homed into shared RAM files: {metas:?}"
    );

    // Deleting the parent snapshot keeps its layer while sandboxes and snapb need it.
    node.delete_snapshot("snapa").unwrap();
    assert!(data.path().join("snapshots/snapa/disk.qcow2").exists());
    assert!(!data.path().join("snapshots/snapa/memory.state").exists());
    assert!(
        node.create(CreateOptions {
            snapshot: Some("snapa".into()),
            ..Default::default()
        })
        .await
        .is_err()
    );
    assert_eq!(out(&node, &kids[1], "cat /home/user/f").await, "kid1\n");
    node.kill(&kids[1]).await.unwrap();
    node.kill(&parent.id).await.unwrap();
    // snapb and kids[0] still hold it.
    assert!(data.path().join("snapshots/snapa").exists());
    node.delete_snapshot("snapb").unwrap();
    assert!(
        data.path().join("snapshots/snapa").exists(),
        "kids[0] sits on snapb on snapa"
    );
    node.kill(&kids[0]).await.unwrap();
    assert!(!data.path().join("snapshots/snapa").exists());
    assert!(!data.path().join("snapshots/snapb").exists());
    assert!(qemu_pids_under(data.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn warm_pool_sandboxes_get_their_own_identity_and_leave_nothing_behind() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    node.set_warm_pool("base", 2);
    assert!(
        node.wait_warm_pool(Duration::from_secs(600)).await,
        "{:?}",
        node.warm_pool()
    );
    assert_eq!(qemu_pids_under(data.path()).len(), 2);
    assert!(node.list().is_empty(), "warm VMs are not sandboxes");

    let mut made = Vec::new();
    for name in ["a", "b"] {
        let (info, t) = node
            .create(CreateOptions {
                template: "base".into(),
                envs: BTreeMap::from([("WHO".to_string(), name.to_string())]),
                access_token: Some(format!("token-{name}")),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(t.warm, "the pool was full, so {name} comes from it");
        made.push(info);
    }
    let (a, b) = (&made[0], &made[1]);
    for s in [a, b] {
        assert_eq!(out(&node, &s.id, "hostname").await.trim(), s.id);
        assert_eq!(out(&node, &s.id, "cat /etc/hostname").await.trim(), s.id);
    }
    assert_eq!(out(&node, &a.id, "echo $WHO").await, "a\n");
    assert_eq!(out(&node, &b.id, "echo $WHO").await, "b\n");
    let rand = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert_ne!(out(&node, &a.id, rand).await, out(&node, &b.id, rand).await);
    out(&node, &a.id, "echo secret > /home/user/only-a").await;
    assert!(
        out(&node, &b.id, "ls /home/user/only-a 2>&1 || true")
            .await
            .contains("No such file")
    );
    // The claim set the sandbox's access token: the agent refuses another one.
    let mut wrong = sh("true");
    wrong.access_token = Some("token-b".into());
    assert!(node.run(&a.id, wrong).await.is_err(), "a took b's token");

    // The pool refills to its target; it counts what it served.
    assert!(node.wait_warm_pool(Duration::from_secs(600)).await);
    let pool = node.warm_pool();
    assert_eq!((pool[0].target, pool[0].ready, pool[0].hits), (2, 2, 2));
    assert_eq!(qemu_pids_under(data.path()).len(), 4);

    node.kill(&a.id).await.unwrap();
    node.kill(&b.id).await.unwrap();
    node.drain_warm_pool().await;
    assert!(qemu_pids_under(data.path()).is_empty());
    assert_eq!(
        std::fs::read_dir(data.path().join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "no sandbox or warm VM dir is left"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn a_dead_warm_vm_is_skipped_and_a_new_node_removes_unclaimed_ones() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    node.set_warm_pool("base", 1);
    assert!(node.wait_warm_pool(Duration::from_secs(600)).await);
    // Killed from outside while it waits: a create must not hand it out.
    for pid in qemu_pids_under(data.path()) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (info, t) = node.create(base()).await.unwrap();
    assert!(!t.warm, "the dead warm VM was not used");
    assert_eq!(out(&node, &info.id, "echo ok").await, "ok\n");
    node.kill(&info.id).await.unwrap();

    // A process that goes away with VMs in its pool: the next one opening the data dir removes
    // them (the dropped node already SIGKILLed the ready ones).
    assert!(node.wait_warm_pool(Duration::from_secs(600)).await);
    drop(node);
    let node = self::node(data.path()).await;
    assert!(node.list().is_empty());
    assert!(node.warm_pool().is_empty());
    for _ in 0..50 {
        if qemu_pids_under(data.path()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(qemu_pids_under(data.path()).is_empty());
    assert_eq!(
        std::fs::read_dir(data.path().join("sandboxes"))
            .unwrap()
            .count(),
        0
    );
}

/// The agent refuses `id`'s envd calls without `token` and runs them with it.
async fn token_enforced(node: &Node, id: &str, token: &str) {
    use alcove_agent_client::ClientError;
    use alcove_agent_client::alcove_envd_proto::connect::Code;
    let agent = node.agent(id).await.unwrap();
    for wrong in [None, Some("not-the-token".to_string())] {
        let mut req = sh("echo ran");
        req.access_token = wrong.clone();
        match agent.run(req).await {
            Err(ClientError::Rpc { code, .. }) => assert_eq!(code, Code::Unauthenticated),
            other => panic!("{id}: token {wrong:?} was not refused: {other:?}"),
        }
    }
    let mut req = sh("echo ran");
    req.access_token = Some(token.to_string());
    let o = agent.run(req).await.expect("the right token is accepted");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ran\n");
}

#[tokio::test]
#[ignore = "needs a built base template; run by scripts/test.sh"]
async fn the_access_token_survives_resume_snapshot_and_fork() {
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let (a, _) = node
        .create(CreateOptions {
            access_token: Some("tok-a".into()),
            envs: BTreeMap::from([("SECRET_ENV".to_string(), "in-guest-only".to_string())]),
            ..base()
        })
        .await
        .unwrap();
    token_enforced(&node, &a.id, "tok-a").await;
    node.pause(&a.id).await.unwrap();
    node.resume(&a.id).await.unwrap();
    token_enforced(&node, &a.id, "tok-a").await;
    // A snapshot restarts the parent from its image: still its token.
    node.snapshot(&a.id, "snap-tok").await.unwrap();
    token_enforced(&node, &a.id, "tok-a").await;
    // A fork child has its own token, not the parent's, and keeps the parent's env values
    // although the host never stored them.
    let (child, _) = node
        .create(CreateOptions {
            snapshot: Some("snap-tok".into()),
            access_token: Some("tok-child".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    token_enforced(&node, &child.id, "tok-child").await;
    let agent = node.agent(&child.id).await.unwrap();
    let mut req = sh("true");
    req.access_token = Some("tok-a".into());
    assert!(
        agent.run(req).await.is_err(),
        "the parent's token opens the child"
    );
    assert_eq!(
        out(&node, &child.id, "echo $SECRET_ENV").await,
        "in-guest-only\n"
    );
    node.kill(&child.id).await.unwrap();
    node.kill(&a.id).await.unwrap();
}

/// Asserts that the QEMU `pid` runs jailed: an unprivileged uid/gid, no capabilities in any set,
/// `no_new_privs`, seccomp on, and a root that holds none of the host's files.
fn assert_jailed(pid: u32, data: &Path, what: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{what}: no {name} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    for ids in ["Uid", "Gid"] {
        let v = field(ids);
        assert!(
            v.split_whitespace().all(|id| id != "0"),
            "{what}: {ids} is {v}: QEMU runs as root"
        );
    }
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{what}: {caps}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "{what}: no_new_privs");
    assert_eq!(field("Seccomp"), "2", "{what}: seccomp filter");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert!(
        inside(Path::new("/usr/bin")).exists(),
        "{what}: the jail's root has no /usr (the check below would prove nothing)"
    );
    for host in [
        PathBuf::from("/etc"),
        PathBuf::from("/home"),
        PathBuf::from("/proc/1"),
        PathBuf::from("/root/.bashrc"),
        data.join("alcove.db"),
    ] {
        assert!(
            !inside(&host).exists(),
            "{what}: the jailed QEMU sees the host's {}",
            host.display()
        );
    }
    // Beyond the system's libraries, every file in the jail is a device node of its own, one of
    // the template's files, or in this data dir (its run dir, a snapshot it restores).
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                files(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&root).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !["usr", "lib", "lib64", "lib32", "libx32"].contains(&name.as_str()) {
            files(&e.path(), &mut seen);
        }
    }
    let allowed = [PathBuf::from("/dev"), cache_dir(), data.to_path_buf()];
    for f in &seen {
        let host = Path::new("/").join(f.strip_prefix(&root).unwrap());
        assert!(
            allowed.iter().any(|a| host.starts_with(a)),
            "{what}: the jail holds the host's {}",
            host.display()
        );
    }
    let run_dirs: Vec<_> = std::fs::read_dir(inside(&data.join("sandboxes")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(run_dirs.len(), 1, "{what}: the jail sees {run_dirs:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a built base template; run by scripts/test.sh"]
async fn qemu_runs_jailed_after_boot_resume_and_snapshot_restore() {
    // As `alcove server` runs: everything it creates is owner-only, and the jail still works.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let (data, _reaper) = data_dir();
    let node = node(data.path()).await;
    let (a, _) = node.create(base()).await.unwrap();
    let (b, _) = node.create(base()).await.unwrap();
    let pids = qemu_pids_under(data.path());
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert_jailed(*pid, data.path(), "boot");
    }
    let uid = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .to_string()
    };
    assert_ne!(uid(pids[0]), uid(pids[1]), "two VMs share a uid");
    node.kill(&b.id).await.unwrap();

    out(&node, &a.id, "echo kept > /home/user/f && sync").await;
    node.pause(&a.id).await.unwrap();
    node.resume(&a.id).await.unwrap();
    assert_eq!(out(&node, &a.id, "cat /home/user/f").await, "kept\n");
    let pid = qemu_pids_under(data.path())[0];
    assert_jailed(pid, data.path(), "resume");

    node.snapshot(&a.id, "jailsnap").await.unwrap();
    let (c, _) = node
        .create(CreateOptions {
            snapshot: Some("jailsnap".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(out(&node, &c.id, "cat /home/user/f").await, "kept\n");
    for pid in qemu_pids_under(data.path()) {
        assert_jailed(pid, data.path(), "snapshot restore");
    }
    node.kill(&a.id).await.unwrap();
    node.kill(&c.id).await.unwrap();
}
