//! OCI images against a real registry (Debian's `docker-registry`, started by each test on a free
//! loopback port) with images built and pushed here: pull → disk → config, whiteouts and hard
//! links across layers, hostile layers, credentials, unknown tags, and a boot of the agent from a
//! busybox image's disk. Ignored for a plain `cargo test` (they need the registry package, root
//! for ownership, and the boot test a built kernel); `scripts/test.sh` runs them as root.

#[path = "common/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alcove_image::ImageError;
use alcove_image::oci::{ImageDisk, OciError, OciOptions, PullRequest, image_disk};
use registry::{Layer, Registry};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The agent to inject: the release build when there is one (the boot test needs it), else any
/// dynamically linked glibc binary will do for disk making.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ALCOVE_AGENT_BIN") {
        return p.into();
    }
    let release = workspace().join("target/release/alcove-agent");
    if release.is_file() {
        release
    } else {
        "/usr/bin/env".into()
    }
}

fn opts(cache: &Path, insecure: &str) -> OciOptions {
    OciOptions {
        cache_dir: cache.to_path_buf(),
        agent_bin: agent_bin(),
        mirror: None,
        insecure_registries: vec![insecure.to_string()],
        max_download_bytes: 64 << 20,
        disk_mib: 256,
        progress: {
            let start = std::time::Instant::now();
            // Shown with --nocapture: the steps' timings.
            Arc::new(move |e| eprintln!("{:>6.2}s {e:?}", start.elapsed().as_secs_f64()))
        },
    }
}

fn req(reference: String) -> PullRequest {
    PullRequest {
        reference,
        credentials: None,
    }
}

fn oci_err(e: ImageError) -> OciError {
    match e {
        ImageError::Oci(e) => e,
        other => panic!("expected an OCI error, got {other:?}"),
    }
}

/// `debugfs -R CMD disk`: reads the ext4 image without mounting it.
fn debugfs(disk: &Path, cmd: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", cmd])
        .arg(disk)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cat(d: &ImageDisk, path: &str) -> String {
    debugfs(&d.disk, &format!("cat {path}"))
}

fn exists(d: &ImageDisk, path: &str) -> bool {
    debugfs(&d.disk, &format!("stat {path}")).contains("Inode:")
}

fn inode(d: &ImageDisk, path: &str) -> String {
    let s = debugfs(&d.disk, &format!("stat {path}"));
    s.split("Inode:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no inode for {path}: {s}"))
        .to_string()
}

#[tokio::test]
#[ignore = "needs root: Debian's docker-registry, a local registry (scripts/test.sh)"]
async fn busybox_image_becomes_a_disk_with_its_config() {
    let reg = Registry::start(None);
    registry::push_test_images(&reg.addr, None).await;
    let cache = tempfile::tempdir().unwrap();
    let o = opts(cache.path(), &reg.addr);
    let d = image_disk(
        &req(format!("{}/{}", reg.addr, registry::BUSYBOX_HTTPD)),
        &o,
    )
    .await
    .unwrap();
    assert!(d.digest.starts_with("sha256:"), "{}", d.digest);
    assert_eq!(d.disk_mib, 256);
    assert_eq!(d.config.workdir.as_deref(), Some("/www"));
    assert_eq!(
        d.config.cmd,
        ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
    );
    assert!(
        d.config
            .env
            .contains(&("GREETING".to_string(), "hello".to_string()))
    );
    // The image's files, the agent with its private loader, accounts, resolver, template config.
    assert_eq!(cat(&d, "/www/index.html"), "hello from busybox-httpd\n");
    assert!(exists(&d, alcove_guest_contract::AGENT_GUEST_PATH));
    // `mcp-gateway` is the agent under another name.
    let gw = debugfs(
        &d.disk,
        &format!("stat {}", alcove_guest_contract::MCP_GATEWAY_GUEST_PATH),
    );
    assert!(
        gw.contains("Type: symlink") && gw.contains("\"alcove-agent\""),
        "{gw}"
    );
    assert!(exists(&d, "/usr/local/lib/alcove"));
    assert!(cat(&d, "/etc/passwd").contains("user:x:1000:1000::/home/user:"));
    assert!(cat(&d, "/etc/group").contains("user:x:1000:"));
    assert!(exists(&d, "/home/user"));
    assert!(cat(&d, "/bin/bash").contains("exec /bin/sh"));
    assert_eq!(
        cat(&d, "/etc/resolv.conf"),
        alcove_guest_contract::net::resolv_conf()
    );
    let tj: serde_json::Value =
        serde_json::from_str(&cat(&d, "/etc/alcove/template.json")).unwrap();
    assert_eq!(tj["workdir"], "/www");
    assert_eq!(tj["envs"]["GREETING"], "hello");
    assert!(tj["start_cmd"].is_null());
    // Read-only in the cache, and a second pull reuses it.
    assert!(std::fs::metadata(&d.disk).unwrap().permissions().readonly());
    let again = image_disk(
        &req(format!("{}/{}", reg.addr, registry::BUSYBOX_HTTPD)),
        &o,
    )
    .await
    .unwrap();
    assert_eq!(again.disk, d.disk);
    assert_eq!(again.config, d.config);
    // A mirror stands in for Docker Hub: `alcove-test/busybox-httpd:1` alone means Docker Hub.
    let mut mirrored = o.clone();
    mirrored.mirror = Some(format!("http://{}", reg.addr));
    mirrored.insecure_registries.clear();
    let m = image_disk(&req(registry::BUSYBOX_HTTPD.to_string()), &mirrored)
        .await
        .unwrap();
    assert_eq!(m.digest, d.digest);
}

#[tokio::test]
#[ignore = "needs root: Debian's docker-registry, a local registry (scripts/test.sh)"]
async fn whiteouts_and_hard_links_across_two_layers() {
    let reg = Registry::start(None);
    let lower = Layer::new()
        .file("data/keep", 0o644, b"keep")
        .file("data/gone", 0o644, b"gone")
        .file("opq/old", 0o644, b"old")
        .file("tree/deep/file", 0o640, b"x")
        .file("bin/tool", 0o4755, b"#!/bin/sh\n")
        .gzip();
    let upper = Layer::new()
        .file("data/.wh.gone", 0o644, b"")
        .dir("opq/")
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/new", 0o644, b"new")
        .file(".wh.tree", 0o644, b"")
        .hardlink("data/keep-link", "data/keep")
        .symlink("data/abs", "/etc/passwd")
        .gzip();
    registry::push(
        &reg.addr,
        "alcove-test/layers:1",
        vec![lower, upper],
        &registry::busybox_config(),
        None,
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let d = image_disk(
        &req(format!("{}/alcove-test/layers:1", reg.addr)),
        &opts(cache.path(), &reg.addr),
    )
    .await
    .unwrap();
    assert_eq!(cat(&d, "/data/keep"), "keep");
    assert!(!exists(&d, "/data/gone"));
    assert!(!exists(&d, "/data/.wh.gone"));
    assert!(!exists(&d, "/opq/old"));
    assert_eq!(cat(&d, "/opq/new"), "new");
    assert!(!exists(&d, "/opq/.wh..wh..opq"));
    assert!(!exists(&d, "/tree"));
    assert_eq!(inode(&d, "/data/keep"), inode(&d, "/data/keep-link"));
    assert!(debugfs(&d.disk, "stat /data/abs").contains("Fast link dest: \"/etc/passwd\""));
    // Modes survive, setuid included.
    assert!(debugfs(&d.disk, "stat /bin/tool").contains("Mode:  04755"));
}

#[tokio::test]
#[ignore = "needs root: Debian's docker-registry, a local registry (scripts/test.sh)"]
async fn hostile_layers_leave_the_host_untouched() {
    let reg = Registry::start(None);
    let host = tempfile::tempdir().unwrap();
    let victim = host.path().join("victim");
    std::fs::write(&victim, b"host file").unwrap();
    let h = host.path().display().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            Layer::new()
                .file("../../../../../../../../tmp/alcove-escaped", 0o644, b"x")
                .gzip(),
        ),
        (
            "symlink-parent",
            Layer::new()
                .symlink("evil", &h)
                .file("evil/written", 0o644, b"x")
                .gzip(),
        ),
        (
            "hardlink-out",
            Layer::new()
                .hardlink("stolen", &format!("../../../../..{h}/victim"))
                .gzip(),
        ),
    ];
    let cache = tempfile::tempdir().unwrap();
    for (name, layer) in cases {
        let reference = format!("alcove-test/hostile-{name}:1");
        registry::push(
            &reg.addr,
            &reference,
            vec![layer],
            &registry::busybox_config(),
            None,
        )
        .await;
        let err = image_disk(
            &req(format!("{}/{reference}", reg.addr)),
            &opts(cache.path(), &reg.addr),
        )
        .await
        .unwrap_err();
        let err = oci_err(err);
        assert!(matches!(err, OciError::Unpack { .. }), "{name}: {err:?}");
    }
    assert!(!Path::new("/tmp/alcove-escaped").exists());
    let names: Vec<_> = std::fs::read_dir(host.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file");
    // Nothing half-made is left in the cache.
    let left: Vec<_> = std::fs::read_dir(cache.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Device nodes are skipped, the rest of the image is used.
    registry::push(
        &reg.addr,
        "alcove-test/devices:1",
        vec![
            Layer::new()
                .device("dev/evil-mem")
                .file("ok", 0o644, b"ok")
                .gzip(),
        ],
        &registry::busybox_config(),
        None,
    )
    .await;
    let d = image_disk(
        &req(format!("{}/alcove-test/devices:1", reg.addr)),
        &opts(cache.path(), &reg.addr),
    )
    .await
    .unwrap();
    assert_eq!(cat(&d, "/ok"), "ok");
    assert!(!exists(&d, "/dev/evil-mem"));
}

#[tokio::test]
#[ignore = "needs root: Debian's docker-registry, a local registry (scripts/test.sh)"]
async fn credentials_are_used_and_bad_ones_are_clear() {
    let reg = Registry::start(Some(("alice", "s3cret")));
    registry::push_test_images(&reg.addr, Some(("alice", "s3cret"))).await;
    let cache = tempfile::tempdir().unwrap();
    let o = opts(cache.path(), &reg.addr);
    let reference = format!("{}/{}", reg.addr, registry::PRIVATE);
    for creds in [None, Some(("alice", "wrong"))] {
        let r = PullRequest {
            reference: reference.clone(),
            credentials: creds.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let err = oci_err(image_disk(&r, &o).await.unwrap_err());
        assert!(matches!(err, OciError::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("check the username"), "{err}");
        assert!(
            !err.to_string().contains("wrong"),
            "never echo a password: {err}"
        );
    }
    let r = PullRequest {
        reference,
        credentials: Some(("alice".into(), "s3cret".into())),
    };
    let d = image_disk(&r, &o).await.unwrap();
    assert_eq!(d.config.workdir.as_deref(), Some("/www"));
}

#[tokio::test]
#[ignore = "needs root: Debian's docker-registry, a local registry (scripts/test.sh)"]
async fn unknown_tags_platforms_caps_and_dead_registries_are_clear() {
    let reg = Registry::start(None);
    registry::push_test_images(&reg.addr, None).await;
    let cache = tempfile::tempdir().unwrap();
    let o = opts(cache.path(), &reg.addr);

    for missing in ["alcove-test/busybox-httpd:2", "alcove-test/nope:1"] {
        let err = oci_err(
            image_disk(&req(format!("{}/{missing}", reg.addr)), &o)
                .await
                .unwrap_err(),
        );
        assert!(
            matches!(err, OciError::NotFound { .. }),
            "{missing}: {err:?}"
        );
        assert!(err.to_string().contains("was not found"), "{err}");
    }

    // An index with only an arm64 image.
    registry::push(
        &reg.addr,
        "alcove-test/arm:img",
        vec![Layer::new().file("x", 0o644, b"x").gzip()],
        &registry::busybox_config(),
        None,
    )
    .await;
    let r: oci_client::Reference = format!("{}/alcove-test/arm:img", reg.addr).parse().unwrap();
    let (raw, digest) = registry::client()
        .pull_manifest_raw(
            &r,
            &oci_client::secrets::RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .unwrap();
    let index: oci_client::manifest::OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": raw.len(),
            "platform": {"architecture": "arm64", "os": "linux"}
        }]
    }))
    .unwrap();
    let idx_ref: oci_client::Reference = format!("{}/alcove-test/arm:1", reg.addr).parse().unwrap();
    registry::client()
        .push_manifest_list(
            &idx_ref,
            &oci_client::secrets::RegistryAuth::Anonymous,
            index,
        )
        .await
        .unwrap();
    let err = oci_err(
        image_disk(&req(format!("{}/alcove-test/arm:1", reg.addr)), &o)
            .await
            .unwrap_err(),
    );
    assert!(matches!(err, OciError::NoPlatform { .. }), "{err:?}");
    assert!(err.to_string().contains("linux/arm64"), "{err}");

    // Over the download cap.
    let mut small = o.clone();
    small.max_download_bytes = 1000;
    let err = oci_err(
        image_disk(
            &req(format!("{}/{}", reg.addr, registry::BUSYBOX_HTTPD)),
            &small,
        )
        .await
        .unwrap_err(),
    );
    assert!(matches!(err, OciError::TooBig { .. }), "{err:?}");

    // Nothing listens there.
    let dead = format!("127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let err = oci_err(
        image_disk(&req(format!("{dead}/a/b:1")), &opts(cache.path(), &dead))
            .await
            .unwrap_err(),
    );
    assert!(matches!(err, OciError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("--registry-mirror"), "{err}");
}

/// Boots the busybox image's disk with the real VMM and waits for the agent's ready line: the
/// agent runs from an image that has no glibc.
#[tokio::test]
#[ignore = "needs root: a local registry, QEMU and the built kernel (scripts/test.sh)"]
async fn busybox_image_disk_boots_the_agent() {
    use alcove_vmm::{Disk, DiskFormat, QemuVmm, Vm, VmSpec, Vmm};
    let cache_home = std::env::var_os("ALCOVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/alcove"));
    let kernel = registry::cached_kernel(&cache_home)
        .expect("a built kernel in the cache: run `alcove template build base` first");
    let agent = workspace().join("target/release/alcove-agent");
    assert!(
        agent.is_file(),
        "build the agent: cargo build --release -p alcove-agent"
    );

    let reg = Registry::start(None);
    registry::push_test_images(&reg.addr, None).await;
    let cache = tempfile::tempdir().unwrap();
    let mut o = opts(cache.path(), &reg.addr);
    o.agent_bin = agent;
    let d = image_disk(
        &req(format!("{}/{}", reg.addr, registry::BUSYBOX_HTTPD)),
        &o,
    )
    .await
    .unwrap();

    let run = tempfile::tempdir().unwrap();
    let disk = run.path().join("disk.raw");
    let cp = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&d.disk)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(cp.success());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let run_dir = run.path().join("vm");
    std::fs::create_dir_all(&run_dir).unwrap();
    let spec = VmSpec {
        run_dir,
        kernel,
        cmdline: format!("init={}", alcove_guest_contract::AGENT_GUEST_PATH),
        vcpus: 1,
        mem_mib: 256,
        ram_file: run.path().join("mem"),
        ram_shared: false,
        disk: Disk {
            path: disk,
            format: DiskFormat::Raw,
            read_only: false,
        },
        limits: None,
        agent_port: alcove_guest_contract::AGENT_CHANNEL.to_string(),
        nic: None,
        netns: None,
    };
    let vmm = QemuVmm::new(alcove_vmm::accel::detect(None)).without_jail();
    let vm = vmm.boot(&spec).await.expect("QEMU starts");
    let ready = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(180), vm.console().wait_for(alcove_guest_contract::READY_LINE)) => r.is_ok(),
        _ = vm.wait_exit() => false,
    };
    if !ready {
        let tail = vm.console().tail(40);
        vm.kill().await;
        panic!("no ready line from the agent; console:\n{tail}");
    }
    // Commands come as `/bin/bash -l -c …` (E2B's protocol): the image has no bash, the wrapper
    // hands them to busybox's sh; `user` exists with its home; the image's httpd serves.
    let run = async {
        let stream = tokio::net::UnixStream::connect(vm.agent_socket()).await?;
        let agent = alcove_agent_client::AgentClient::connect_channel(
            stream,
            alcove_agent_client::Timeouts::default(),
        )
        .await
        .map_err(anyhow_like)?;
        agent
            .run(alcove_agent_client::RunRequest {
                cmd: "/bin/bash".into(),
                args: vec![
                    "-l".into(),
                    "-c".into(),
                    // The image's own server (its Cmd, daemonized here) answers on loopback.
                    "echo hi; id -u; echo $HOME; cd /www && busybox httpd -p 8080 -h /www && sleep 1 && wget -qO- http://127.0.0.1:8080/index.html".into(),
                ],
                user: Some("user".into()),
                timeout: Some(Duration::from_secs(60)),
                ..Default::default()
            })
            .await
            .map_err(anyhow_like)
    };
    let out = tokio::time::timeout(Duration::from_secs(90), run).await;
    let tail = vm.console().tail(40);
    vm.kill().await;
    let out = out
        .unwrap_or_else(|_| panic!("command timed out; console:\n{tail}"))
        .unwrap_or_else(|e| panic!("command failed: {e}; console:\n{tail}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n1000\n/home/user\nhello from busybox-httpd\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn anyhow_like(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
