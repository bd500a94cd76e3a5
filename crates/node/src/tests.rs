//! The node against the fake VMM (`fake.rs`): every lifecycle operation and failure the node
//! handles, as an ordinary user, with no QEMU. Templates are laid out on disk as a build would
//! leave them (manifest, state, an empty qcow2 overlay made by `qemu-img`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alcove_vmm::Vm;

use crate::fake::{FakeNetwork, FakeVmm};
use crate::record::SandboxInfo;
use crate::{CreateOptions, Node, NodeConfig, NodeError, SandboxState};

const KEY: &str = "ab12cd34";

struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    cache: PathBuf,
    vmm: FakeVmm,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let cache = tmp.path().join("cache");
        let dir = cache.join("templates").join(KEY);
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state");
        std::fs::write(&state, b"fake-state of the template").unwrap();
        std::fs::write(dir.join("mem"), b"ram").unwrap();
        std::fs::write(dir.join("disk.raw"), b"").unwrap();
        let overlay = dir.join("overlay.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&overlay)
            .arg("16M")
            .output()
            .expect("qemu-img runs");
        assert!(out.status.success(), "qemu-img: {out:?}");
        let manifest = serde_json::json!({
            "manifest_version": 1,
            "name": "base",
            "key": KEY,
            "dir": dir,
            "recipe": { "name": "base" },
            "kernel": dir.join("vmlinux"),
            "disk": dir.join("disk.raw"),
            "mem": dir.join("mem"),
            "state": state,
            "overlay": overlay,
            "state_sha256": alcove_image::build::sha256_file(&state).unwrap(),
            "mem_sha256": "",
            "accel": "tcg",
            "built_at_unix": 0,
            "build_secs": 0.0,
            "boot_to_ready_secs": 0.0,
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        let by_name = cache.join("templates").join("by-name");
        std::fs::create_dir_all(&by_name).unwrap();
        std::fs::write(by_name.join("base"), KEY).unwrap();
        Fixture {
            _tmp: tmp,
            data,
            cache,
            vmm: FakeVmm::default(),
        }
    }

    /// A node over the fixture's data dir (again: a restarted process).
    async fn open(&self) -> Arc<Node<FakeVmm>> {
        self.open_starting(0).await
    }

    /// [`Fixture::open`] that restores at most `max_starting` VMs at once.
    async fn open_starting(&self, max_starting: usize) -> Arc<Node<FakeVmm>> {
        Node::open_with(
            NodeConfig {
                data_dir: self.data.clone(),
                cache_dir: self.cache.clone(),
                vmm: self.vmm.clone(),
                max_sandboxes: 10,
                max_starting,
                admission_wait: std::time::Duration::from_secs(2),
                egress: Arc::new(alcove_net::EgressConfig::new(
                    alcove_net::Guard::new(&[], vec![]),
                    "127.0.0.1:53".parse().unwrap(),
                )),
            },
            Arc::new(FakeNetwork),
        )
        .await
        .expect("node opens")
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.data.join("sandboxes").join(id)
    }
}

fn base() -> CreateOptions {
    CreateOptions {
        template: "base".into(),
        ..Default::default()
    }
}

fn on_disk(dir: &Path) -> SandboxInfo {
    serde_json::from_slice(&std::fs::read(dir.join("record.json")).unwrap()).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Polls until the sandbox's state is `name`, for at most 5 s.
async fn state_becomes(node: &Node<FakeVmm>, id: &str, name: &str) -> SandboxState {
    for _ in 0..500 {
        let s = node.get(id).unwrap().state;
        if s.name() == name {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never became {name}: {}", node.get(id).unwrap().state);
}

#[tokio::test]
async fn create_runs_the_sandbox_and_kill_removes_every_trace() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, timings) = node.create(base()).await.unwrap();
    assert_eq!(info.state, SandboxState::Running);
    assert!(!timings.warm);
    let vm = node.vm(&info.id).unwrap();
    assert_eq!(info.pid, vm.pid());
    let rec = on_disk(&f.dir(&info.id));
    assert_eq!(rec.state, SandboxState::Running);
    assert_eq!(rec.pid, vm.pid());
    assert!(f.dir(&info.id).join("disk.qcow2").exists());
    node.agent(&info.id).await.unwrap().health().await.unwrap();
    assert_eq!(node.list().len(), 1);

    node.kill(&info.id).await.unwrap();
    assert!(vm.exit_reason().is_some());
    assert!(!f.dir(&info.id).exists());
    assert!(matches!(node.get(&info.id), Err(NodeError::NotFound(_))));
    assert!(node.list().is_empty());
}

#[tokio::test]
async fn pause_writes_an_image_and_ends_the_vm_and_resume_brings_it_back() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, _) = node.create(base()).await.unwrap();
    let vm = node.vm(&info.id).unwrap();

    let t = node.pause(&info.id).await.unwrap();
    assert!(t.state_bytes > 0);
    assert!(vm.exit_reason().is_some(), "the VM process ends on pause");
    let state = node.get(&info.id).unwrap().state;
    assert!(matches!(state, SandboxState::Paused { .. }), "{state}");
    assert_eq!(on_disk(&f.dir(&info.id)).state, state);
    assert!(f.dir(&info.id).join("paused.state").exists());
    assert!(node.vm(&info.id).is_err());
    assert!(matches!(
        node.pause(&info.id).await,
        Err(NodeError::NotRunning { .. })
    ));

    node.resume(&info.id).await.unwrap();
    let now = node.get(&info.id).unwrap();
    assert_eq!(now.state, SandboxState::Running);
    let vm2 = node.vm(&info.id).unwrap();
    assert_ne!(vm2.pid(), vm.pid());
    assert_eq!(now.pid, vm2.pid());
    assert_eq!(on_disk(&f.dir(&info.id)).pid, vm2.pid());
    assert!(!f.dir(&info.id).join("paused.state").exists());
    node.agent(&info.id).await.unwrap().health().await.unwrap();
    assert!(matches!(
        node.resume(&info.id).await,
        Err(NodeError::NotPaused { .. })
    ));
    node.kill(&info.id).await.unwrap();
}

#[tokio::test]
async fn snapshot_keeps_the_sandbox_running_and_forks_start_from_it() {
    let f = Fixture::new();
    let node = f.open().await;
    let (a, _) = node.create(base()).await.unwrap();
    let before = node.vm(&a.id).unwrap().pid();

    let (meta, _) = node.snapshot(&a.id, "snap1").await.unwrap();
    assert_eq!(meta.sandbox_id, a.id);
    assert!(
        meta.shared_ram,
        "the memory image was re-homed into a RAM file"
    );
    let now = node.get(&a.id).unwrap();
    assert_eq!(now.state, SandboxState::Running);
    assert_eq!(now.base_snapshot.as_deref(), Some("snap1"));
    assert_eq!(
        on_disk(&f.dir(&a.id)).base_snapshot.as_deref(),
        Some("snap1")
    );
    assert_ne!(now.pid, before, "the sandbox goes on in a new VM");
    node.agent(&a.id).await.unwrap().health().await.unwrap();

    let (b, _) = node
        .create(CreateOptions {
            snapshot: Some("snap1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(b.state, SandboxState::Running);
    assert_eq!(b.base_snapshot.as_deref(), Some("snap1"));
    assert_ne!(b.id, a.id);
    node.agent(&b.id).await.unwrap().health().await.unwrap();

    // A deleted snapshot's layer stays while sandboxes sit on it, and goes with the last one.
    node.delete_snapshot("snap1").unwrap();
    assert!(node.snapshots_dir().join("snap1").exists());
    node.kill(&a.id).await.unwrap();
    assert!(node.snapshots_dir().join("snap1").exists());
    node.kill(&b.id).await.unwrap();
    assert!(!node.snapshots_dir().join("snap1").exists());
    assert!(matches!(
        node.create(CreateOptions {
            snapshot: Some("snap1".into()),
            ..Default::default()
        })
        .await,
        Err(NodeError::SnapshotNotFound(_))
    ));
}

#[tokio::test]
async fn a_vm_that_crashes_while_running_is_recorded_dead_with_its_reason() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, _) = node.create(base()).await.unwrap();
    f.vmm.vm_in(&f.dir(&info.id)).unwrap().crash();

    let SandboxState::Dead { reason } = state_becomes(&node, &info.id, "dead").await else {
        unreachable!()
    };
    assert!(reason.contains("signal 11"), "reason: {reason}");
    assert_eq!(on_disk(&f.dir(&info.id)).state.name(), "dead");
    assert_eq!(files(&f.dir(&info.id)), ["record.json"]);
    assert!(matches!(
        node.pause(&info.id).await,
        Err(NodeError::NotRunning { .. })
    ));
    node.kill(&info.id).await.unwrap();
    assert!(!f.dir(&info.id).exists());
}

#[tokio::test]
async fn a_vm_that_dies_during_pause_fails_the_pause_and_is_recorded_dead() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, _) = node.create(base()).await.unwrap();
    f.vmm.crash_on_next_save();

    assert!(node.pause(&info.id).await.is_err());
    let state = node.get(&info.id).unwrap().state;
    let SandboxState::Dead { reason } = &state else {
        panic!("state after a crash during pause: {state}")
    };
    assert!(reason.contains("during a pause"), "reason: {reason}");
    assert_eq!(on_disk(&f.dir(&info.id)).state, state);
    assert!(!f.dir(&info.id).join("paused.state").exists());
    assert!(!f.dir(&info.id).join("paused.state.tmp").exists());
    assert!(matches!(
        node.resume(&info.id).await,
        Err(NodeError::NotPaused { .. })
    ));
    node.kill(&info.id).await.unwrap();
}

#[tokio::test]
async fn resume_refuses_a_missing_or_corrupt_image_and_leaves_the_sandbox_paused() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, _) = node.create(base()).await.unwrap();
    node.pause(&info.id).await.unwrap();
    let image = f.dir(&info.id).join("paused.state");
    let good = std::fs::read(&image).unwrap();

    std::fs::write(&image, b"fake-state, but not the one that was written").unwrap();
    let err = node.resume(&info.id).await.unwrap_err();
    assert!(matches!(err, NodeError::CorruptSnapshot { .. }), "{err}");
    assert_eq!(node.get(&info.id).unwrap().state.name(), "paused");

    std::fs::remove_file(&image).unwrap();
    let err = node.resume(&info.id).await.unwrap_err();
    assert!(matches!(err, NodeError::CorruptSnapshot { .. }), "{err}");
    assert_eq!(node.get(&info.id).unwrap().state.name(), "paused");
    assert_eq!(on_disk(&f.dir(&info.id)).state.name(), "paused");

    // Put back, it resumes: nothing was changed by the failed attempts.
    std::fs::write(&image, good).unwrap();
    node.resume(&info.id).await.unwrap();
    assert_eq!(node.get(&info.id).unwrap().state, SandboxState::Running);
    node.kill(&info.id).await.unwrap();
}

#[tokio::test]
async fn a_restarted_node_reattaches_running_vms_keeps_paused_ones_and_records_vanished_ones() {
    let f = Fixture::new();
    let node = f.open().await;
    let (running, _) = node.create(base()).await.unwrap();
    let (paused, _) = node.create(base()).await.unwrap();
    let (gone, _) = node.create(base()).await.unwrap();
    node.pause(&paused.id).await.unwrap();
    let pid = node.vm(&running.id).unwrap().pid();
    drop(node);
    // While no node watches, one VM ends.
    f.vmm.vm_in(&f.dir(&gone.id)).unwrap().crash();

    let node = f.open().await;
    assert_eq!(node.list().len(), 3);
    let r = node.get(&running.id).unwrap();
    assert_eq!(r.state, SandboxState::Running);
    assert_eq!(node.vm(&running.id).unwrap().pid(), pid);
    node.agent(&running.id)
        .await
        .unwrap()
        .health()
        .await
        .unwrap();

    assert_eq!(node.get(&paused.id).unwrap().state.name(), "paused");
    node.resume(&paused.id).await.unwrap();
    node.agent(&paused.id)
        .await
        .unwrap()
        .health()
        .await
        .unwrap();

    let SandboxState::Dead { reason } = node.get(&gone.id).unwrap().state else {
        panic!("a VM that ended while no node watched is dead")
    };
    assert!(reason.contains("is gone"), "reason: {reason}");
    assert_eq!(on_disk(&f.dir(&gone.id)).state.name(), "dead");

    // The re-attached VM is watched again.
    f.vmm.vm_in(&f.dir(&running.id)).unwrap().crash();
    state_becomes(&node, &running.id, "dead").await;
    for id in [&running.id, &paused.id, &gone.id] {
        node.kill(id).await.unwrap();
    }
    assert!(node.list().is_empty());
}

#[tokio::test]
async fn network_rules_are_kept_in_the_record() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, _) = node.create(base()).await.unwrap();
    let rules = alcove_net::NetworkConfig {
        allow_internet_access: false,
        ..Default::default()
    };
    node.set_network(&info.id, rules.clone()).unwrap();
    assert_eq!(node.network(&info.id).unwrap().0, rules);
    assert_eq!(on_disk(&f.dir(&info.id)).network, rules);
    node.pause(&info.id).await.unwrap();
    node.resume(&info.id).await.unwrap();
    assert_eq!(node.get(&info.id).unwrap().network, rules);
    node.kill(&info.id).await.unwrap();
}

#[tokio::test]
async fn creates_beyond_the_limit_wait_for_a_slot_then_are_refused() {
    let f = Fixture::new();
    let node = f.open().await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(node.create(base()).await.unwrap().0.id);
    }
    // One over the limit waits, and gets the slot a kill frees.
    let waiting = {
        let node = node.clone();
        tokio::spawn(async move { node.create(base()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a create over the limit should wait"
    );
    node.kill(&ids.pop().unwrap()).await.unwrap();
    ids.push(waiting.await.unwrap().expect("the slot freed").0.id);
    // Nothing ends: refused once the fixture's admission wait (2 s) is over.
    let t = std::time::Instant::now();
    assert!(matches!(
        node.create(base()).await,
        Err(NodeError::Capacity(10))
    ));
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    for id in ids {
        node.kill(&id).await.unwrap();
    }
}

#[tokio::test]
async fn a_burst_of_creates_restores_a_few_at_a_time_and_every_one_succeeds() {
    let f = Fixture::new();
    let node = f.open_starting(2).await;
    f.vmm.slow_restores(40);
    let creates: Vec<_> = (0..8)
        .map(|_| {
            let node = node.clone();
            tokio::spawn(async move { node.create(base()).await.map(|(i, _)| i.id) })
        })
        .collect();
    let mut ids = Vec::new();
    for c in creates {
        ids.push(c.await.unwrap().expect("a queued create succeeds"));
    }
    assert_eq!(
        f.vmm.most_restoring(),
        2,
        "restores ran at once beyond the limit"
    );
    // Resumes queue the same way.
    for id in &ids {
        node.pause(id).await.unwrap();
    }
    let resumes: Vec<_> = ids
        .iter()
        .map(|id| {
            let (node, id) = (node.clone(), id.clone());
            tokio::spawn(async move { node.resume(&id).await })
        })
        .collect();
    for r in resumes {
        r.await.unwrap().expect("a queued resume succeeds");
    }
    assert_eq!(f.vmm.most_restoring(), 2);
    for id in ids {
        node.kill(&id).await.unwrap();
    }
}

#[tokio::test]
async fn a_create_claims_a_warm_vm_and_the_claimed_sandbox_lives_like_any_other() {
    let f = Fixture::new();
    let node = f.open().await;
    node.set_warm_pool("base", 1);
    assert!(
        node.wait_warm_pool(Duration::from_secs(10)).await,
        "{:?}",
        node.warm_pool()
    );
    assert!(node.list().is_empty(), "warm VMs are not sandboxes");

    let (info, timings) = node.create(base()).await.unwrap();
    assert!(timings.warm);
    assert_eq!(info.state, SandboxState::Running);
    let vm = node.vm(&info.id).unwrap();
    assert_eq!(info.pid, vm.pid());
    // The record (in the warm VM's own dir) names the sandbox.
    let dir = vm.agent_socket().parent().unwrap().to_path_buf();
    let rec = on_disk(&dir);
    assert_eq!((rec.id.as_str(), rec.pooled), (info.id.as_str(), false));
    assert_eq!(rec.state, SandboxState::Running);
    node.agent(&info.id).await.unwrap().health().await.unwrap();

    node.pause(&info.id).await.unwrap();
    node.resume(&info.id).await.unwrap();
    node.kill(&info.id).await.unwrap();
    assert!(!dir.exists());
    node.drain_warm_pool().await;
}

#[tokio::test]
async fn env_values_are_never_written_to_the_data_dir() {
    let f = Fixture::new();
    let node = f.open().await;
    let (a, _) = node
        .create(CreateOptions {
            envs: [("API_KEY".to_string(), "value-never-on-disk".to_string())].into(),
            access_token: Some("tok-a".into()),
            ..base()
        })
        .await
        .unwrap();
    node.snapshot(&a.id, "snap-env").await.unwrap();
    node.pause(&a.id).await.unwrap();
    node.resume(&a.id).await.unwrap();
    let mut found = Vec::new();
    let mut stack = vec![f.data.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json")
                && String::from_utf8_lossy(&std::fs::read(&p).unwrap())
                    .contains("value-never-on-disk")
            {
                found.push(p);
            }
        }
    }
    assert!(found.is_empty(), "env values written to {found:?}");
    node.kill(&a.id).await.unwrap();
}

#[test]
fn every_init_resends_the_access_token() {
    let info = SandboxInfo {
        access_token: Some("tok".into()),
        envs: [("K".to_string(), "v".to_string())].into(),
        ..crate::record::tests::info()
    };
    let resumed = crate::create::init_request(&info, false, Some("pem"));
    assert_eq!(resumed.access_token.as_deref(), Some("tok"));
    assert!(
        resumed.env_vars.is_none(),
        "a resume does not re-send env values"
    );
    assert!(resumed.egress_ca.is_none(), "a resumed guest has its CA");
    let fresh = crate::create::init_request(&info, true, Some("pem"));
    assert_eq!(fresh.access_token.as_deref(), Some("tok"));
    assert_eq!(fresh.egress_ca.as_deref(), Some("pem"));
}

#[tokio::test]
async fn a_sandbox_keeps_one_private_egress_ca_across_pause_and_resume() {
    let f = Fixture::new();
    let node = f.open().await;
    let (info, _) = node.create(base()).await.unwrap();
    let dir = f.dir(&info.id);
    let pem = std::fs::read_to_string(dir.join(crate::create::EGRESS_CA_CERT)).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    node.pause(&info.id).await.unwrap();
    node.resume(&info.id).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join(crate::create::EGRESS_CA_CERT)).unwrap(),
        pem
    );
    assert!(
        open_to_others(&dir).is_empty(),
        "{:?}",
        open_to_others(&dir)
    );
}

/// Every dir and file under `root` that group or others could read or enter.
fn open_to_others(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let ft = meta.file_type();
        if (ft.is_dir() || ft.is_file()) && !crate::private::is_private(meta.mode()) {
            found.push(format!("{} {:o}", p.display(), meta.mode() & 0o7777));
        }
        if ft.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found
}

#[tokio::test]
async fn the_data_dir_and_everything_in_it_are_owner_only_from_the_first_mkdir() {
    let f = Fixture::new();
    let node = f.open().await;
    let (a, _) = node.create(base()).await.unwrap();
    let (b, _) = node.create(base()).await.unwrap();
    node.snapshot(&a.id, "snap1").await.unwrap();
    node.pause(&b.id).await.unwrap();
    assert!(node.stored_bytes(std::slice::from_ref(&b.id), &["snap1".to_owned()]) > 0);
    assert_eq!(node.stored_bytes(&["nope".into()], &["gone".into()]), 0);
    let open = open_to_others(&f.data);
    assert!(open.is_empty(), "readable by others: {open:#?}");
    node.kill(&a.id).await.unwrap();
    node.kill(&b.id).await.unwrap();
}

#[tokio::test]
async fn racing_creates_and_resumes_pass_exactly_the_hosts_limit() {
    let f = Fixture::new();
    let node = f.open().await;
    let mut paused = Vec::new();
    for _ in 0..3 {
        let (i, _) = node.create(base()).await.unwrap();
        node.pause(&i.id).await.unwrap();
        paused.push(i.id);
    }
    // 0 of 10 slots used; 12 creates and 3 resumes race for them.
    let creates = (0..12).map(|_| {
        let node = node.clone();
        tokio::spawn(async move { node.create(base()).await.map(|_| ()) })
    });
    let resumes = paused.iter().map(|id| {
        let (node, id) = (node.clone(), id.clone());
        tokio::spawn(async move { node.resume(&id).await.map(|_| ()) })
    });
    let all: Vec<_> = creates.chain(resumes).collect();
    let mut ok = 0;
    for h in all {
        match h.await.unwrap() {
            Ok(()) => ok += 1,
            Err(NodeError::Capacity(_)) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(ok, 10);
    let running = node
        .list()
        .into_iter()
        .filter(|s| s.state.is_live())
        .count();
    assert_eq!(running, 10);
}

/// Writes `pattern` over the first 64 KiB at `offset` of qcow2 image `disk` (what a guest's
/// writes leave in its overlay).
fn write_disk(disk: &Path, offset: u64, pattern: u8) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern} {offset} 64k"))
        .arg(disk)
        .output()
        .expect("qemu-io runs");
    assert!(out.status.success(), "qemu-io: {out:?}");
}

/// Whether two disk images (with their chains) read the same.
fn same_content(a: &Path, b: &Path) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-U"])
        .arg(a)
        .arg(b)
        .status()
        .expect("qemu-img runs")
        .success()
}

fn backing_of(disk: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk)
        .output()
        .expect("qemu-img runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Copies what another node exported into where this node takes it in (the blob store's part).
fn carry(out: &crate::Outgoing, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (name, path) in &out.files {
        std::fs::copy(path, to.join(name)).unwrap();
    }
    if let Some(s) = &out.scratch {
        std::fs::remove_dir_all(s).unwrap();
    }
}

#[tokio::test]
async fn snapshots_and_sandboxes_on_snapshot_layers_move_flattened_onto_the_template() {
    let (fa, fb) = (Fixture::new(), Fixture::new());
    let (a_node, b_node) = (fa.open().await, fb.open().await);
    let template_b = b_node.template_by_key(KEY).unwrap();

    // On node A: a sandbox writes, snapshot s1; a sandbox from s1 writes more, snapshot s2
    // (its layer sits on s1's).
    let (a, _) = a_node.create(base()).await.unwrap();
    write_disk(&fa.dir(&a.id).join("disk.qcow2"), 0, 0x11);
    a_node.snapshot(&a.id, "s1").await.unwrap();
    let from_snap = |s: &str| CreateOptions {
        snapshot: Some(s.into()),
        ..Default::default()
    };
    let (b, _) = a_node.create(from_snap("s1")).await.unwrap();
    write_disk(&fa.dir(&b.id).join("disk.qcow2"), 1 << 20, 0x22);
    let (m2, _) = a_node.snapshot(&b.id, "s2").await.unwrap();
    assert_eq!(m2.parent.as_deref(), Some("s1"));
    let a_layer = fa.data.join("snapshots/s2/disk.qcow2");

    // s2 leaves as one image over the template's disk, made in a scratch dir.
    let out = a_node.outgoing_snapshot("s2").await.unwrap();
    let scratch = out.scratch.clone().expect("a layered disk is flattened");
    assert!(scratch.starts_with(fa.data.join("outgoing")));
    let disk = &out.files.iter().find(|(n, _)| n == "disk.qcow2").unwrap().1;
    assert!(same_content(disk, &a_layer));
    let mut names: Vec<_> = out.files.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["disk.qcow2", "ram", "ram.state", "snapshot.json"]);
    let to = b_node.incoming_snapshot_dir("s2").unwrap().unwrap();
    carry(&out, &to);
    assert!(!scratch.exists());
    b_node.adopt_snapshot("s2").await.unwrap();
    // Node B has it: on its own template's disk, the same content, no parent here.
    let b_layer = fb.data.join("snapshots/s2/disk.qcow2");
    assert_eq!(backing_of(&b_layer), template_b.disk.display().to_string());
    assert!(same_content(&b_layer, &a_layer));
    assert!(b_node.incoming_snapshot_dir("s2").unwrap().is_none());
    let meta = b_node
        .snapshots()
        .into_iter()
        .find(|m| m.id == "s2")
        .unwrap();
    assert_eq!(meta.parent, None);
    let (c, _) = b_node.create(from_snap("s2")).await.unwrap();
    assert_eq!(c.base_snapshot.as_deref(), Some("s2"));
    b_node.agent(&c.id).await.unwrap().health().await.unwrap();

    // A paused sandbox on s1's layer moves with its disk flattened, and resumes on B.
    a_node.pause(&b.id).await.unwrap();
    let b_disk = fa.dir(&b.id).join("disk.qcow2");
    let out = a_node.outgoing_paused(&b.id).await.unwrap();
    let disk = &out.files.iter().find(|(n, _)| n == "disk.qcow2").unwrap().1;
    assert_ne!(disk, &b_disk, "its disk leaves flattened");
    assert!(same_content(disk, &b_disk));
    let to = b_node.incoming_dir(&b.id).unwrap();
    carry(&out, &to);
    b_node.adopt_paused(&b.id).await.unwrap();
    let moved = b_node.get(&b.id).unwrap();
    assert_eq!(moved.base_snapshot, None);
    assert_eq!(on_disk(&fb.dir(&b.id)).base_snapshot, None);
    let moved_disk = fb.dir(&b.id).join("disk.qcow2");
    assert_eq!(
        backing_of(&moved_disk),
        template_b.disk.display().to_string()
    );
    assert!(same_content(&moved_disk, &b_disk));
    b_node.resume(&b.id).await.unwrap();
    b_node.agent(&b.id).await.unwrap().health().await.unwrap();

    // A deleted snapshot does not leave; one B has already is not taken in twice.
    a_node.delete_snapshot("s1").unwrap();
    assert!(matches!(
        a_node.outgoing_snapshot("s1").await,
        Err(NodeError::SnapshotNotFound(_))
    ));
    for id in [&a.id, &b.id, &c.id] {
        let _ = a_node.kill(id).await;
        let _ = b_node.kill(id).await;
    }
}

#[tokio::test]
async fn a_template_leaves_and_comes_back_checked_at_its_path() {
    let f = Fixture::new();
    let home = f.cache.join("templates").join(KEY);
    let kernel = f.cache.join("kernel/k1/vmlinux");
    std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
    std::fs::write(&kernel, b"a kernel").unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("manifest.json")).unwrap()).unwrap();
    manifest["kernel"] = serde_json::json!(kernel);
    manifest["mem_sha256"] =
        serde_json::json!(alcove_image::build::sha256_file(&home.join("mem")).unwrap());
    std::fs::write(home.join("manifest.json"), manifest.to_string()).unwrap();
    let node = f.open().await;
    assert!(
        node.incoming_template_dir(KEY).unwrap().is_none(),
        "it is here"
    );

    let out = node.outgoing_template(KEY).await.unwrap();
    let mut names: Vec<_> = out.files.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["disk.qcow2", "mem", "state", "template.json", "vmlinux"]
    );
    let held = f._tmp.path().join("held");
    carry(&out, &held);

    // A node whose cache (at the same path) has neither the template nor its kernel.
    std::fs::remove_dir_all(&home).unwrap();
    std::fs::remove_dir_all(kernel.parent().unwrap()).unwrap();
    std::fs::remove_file(f.cache.join("templates/by-name/base")).unwrap();
    let take_in = |tamper: bool| {
        let to = node.incoming_template_dir(KEY).unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&held).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        if tamper {
            std::fs::write(to.join("state"), b"another state").unwrap();
        }
    };
    take_in(true);
    let e = node.adopt_template(KEY).await.unwrap_err();
    assert!(e.to_string().contains("does not check out"), "{e}");
    assert!(!home.exists());

    take_in(false);
    node.adopt_template(KEY).await.unwrap();
    let t = alcove_image::build::load_template(&f.cache, "base").unwrap();
    assert_eq!(t.key, KEY);
    assert_eq!(std::fs::read(&kernel).unwrap(), b"a kernel");
    assert!(!home.join("vmlinux").exists() && !home.join("disk.qcow2").exists());
    assert_eq!(backing_of(&t.overlay), t.disk.display().to_string());
    t.verify_all().unwrap();
    assert!(node.incoming_template_dir(KEY).unwrap().is_none());
    let (s, _) = node.create(base()).await.unwrap();
    node.agent(&s.id).await.unwrap().health().await.unwrap();
    node.kill(&s.id).await.unwrap();
}
