//! End-to-end tests of API template builds (`Node::build_template`) on real microVMs: steps run
//! in a builder VM from the built `base` template, layers are cached as node snapshots, and the
//! result is a template sandboxes are created from by key. Root (jail, namespaces) and the
//! `base` template are needed, so they are `#[ignore]`d for a plain `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alcove_agent_client::RunRequest;
use alcove_node::build::{
    BuildFailure, BuildFrom, BuildLog, BuildLogEntry, BuildSpec, BuiltTemplate, Step, StepKind,
    StepRef,
};
use alcove_node::{CreateOptions, Node, NodeConfig};
use alcove_vmm::QemuVmm;

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
        egress: Arc::new(alcove_net::EgressConfig::new(
            alcove_net::Guard::new(&alcove_net::policy::host_addresses(), vec![]),
            alcove_net::egress::host_resolver(),
        )),
    })
    .await
    .expect("node opens")
}

/// Kills any VM still running under a test's data dir when the test ends.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        for pid in std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        {
            if std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn step(kind: StepKind) -> Step {
    Step { kind, force: false }
}

fn run(cmd: &str, user: Option<&str>) -> Step {
    step(StepKind::Run {
        cmd: cmd.into(),
        user: user.map(Into::into),
    })
}

fn spec(files_dir: &Path, steps: Vec<Step>) -> BuildSpec {
    BuildSpec {
        build_id: format!("b{}", std::process::id()),
        name: "built".into(),
        from: BuildFrom::Template("base".into()),
        steps,
        start_cmd: None,
        ready_cmd: None,
        vcpus: 2,
        memory_mib: 512,
        force: false,
        files_dir: files_dir.to_path_buf(),
        network: Default::default(),
        deadline: Duration::from_secs(1800),
    }
}

/// A build log kept in memory, echoed to stderr (run with --nocapture to watch a build).
fn log() -> (BuildLog, Arc<Mutex<Vec<BuildLogEntry>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    let t0 = Instant::now();
    let log: BuildLog = Arc::new(move |e: BuildLogEntry| {
        eprintln!(
            "[{:7.1}s] [{}] {}",
            t0.elapsed().as_secs_f64(),
            e.step,
            e.message
        );
        l.lock().unwrap().push(e);
    });
    (log, lines)
}

async fn build(
    node: &Arc<Node>,
    spec: BuildSpec,
) -> (
    Result<BuiltTemplate, BuildFailure>,
    Vec<BuildLogEntry>,
    Duration,
) {
    let (log, lines) = log();
    let t = Instant::now();
    let r = node.build_template(spec, log).await;
    let took = t.elapsed();
    eprintln!("build finished in {:.1} s: {r:?}", took.as_secs_f64());
    let lines = lines.lock().unwrap().clone();
    (r, lines, took)
}

fn step_lines(lines: &[BuildLogEntry], i: u32) -> Vec<String> {
    lines
        .iter()
        .filter(|e| e.step == StepRef::Step(i))
        .map(|e| e.message.clone())
        .collect()
}

async fn out(node: &Node, id: &str, cmd: &str, user: Option<&str>) -> String {
    let o = node
        .run(
            id,
            RunRequest {
                cmd: "/bin/bash".into(),
                args: vec!["-c".into(), cmd.into()],
                user: user.map(Into::into),
                ..Default::default()
            },
        )
        .await
        .expect("command runs");
    assert_eq!(
        o.exit_code,
        0,
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A tar of `app/hello.txt` and `app/sub/run.sh` in `files_dir`, named by its SHA-256.
fn make_archive(files_dir: &Path, hello: &str) -> String {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("app/sub")).unwrap();
    std::fs::write(src.path().join("app/hello.txt"), hello).unwrap();
    std::fs::write(src.path().join("app/sub/run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    let tar = files_dir.join("upload.tar");
    let st = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(src.path())
        .arg("app")
        .status()
        .unwrap();
    assert!(st.success());
    let hash = alcove_image::build::sha256_file(&tar).unwrap();
    std::fs::rename(&tar, files_dir.join(&hash)).unwrap();
    hash
}

fn steps(files_hash: &str, last_run: &str) -> Vec<Step> {
    vec![
        // 1: COPY a directory's contents, owned by the current user (`user`).
        step(StepKind::Copy {
            files_hash: files_hash.into(),
            src: "app".into(),
            dest: "/opt/app/".into(),
            owner: None,
            mode: None,
        }),
        // 2: RUN as root.
        run(
            "echo by-root > /etc/built-by-root && id -un && [[ -n $BASH_VERSION ]]",
            Some("root"),
        ),
        // 3, 4: state only.
        step(StepKind::Env {
            vars: vec![("FOO".into(), "bar baz".into())],
        }),
        step(StepKind::Workdir {
            path: "/srv/work".into(),
        }),
        // 5: RUN as the current user, in the WORKDIR, with the ENV.
        run(
            "echo \"$FOO\" > out.txt && id -un >> out.txt && pwd >> out.txt",
            None,
        ),
        // 6, 7, 8: USER switches the user of later steps.
        step(StepKind::User {
            user: "root".into(),
        }),
        run(last_run, None),
        step(StepKind::User {
            user: "user".into(),
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (jail, namespaces), QEMU and the built `base` template"]
async fn a_build_runs_its_steps_in_a_vm_caches_layers_and_reports_failures() {
    let data = tempfile::tempdir().unwrap();
    let _reaper = Reaper(data.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let node = node(data.path()).await;
    let hash = make_archive(files.path(), "hello from copy\n");

    let mut s = spec(files.path(), steps(&hash, "whoami > /tmp/who7"));
    s.start_cmd = Some("python3 -m http.server 8000 --bind 127.0.0.1 --directory /opt/app".into());
    s.ready_cmd = Some("curl -sf http://127.0.0.1:8000/hello.txt".into());
    let (r, lines, first) = build(&node, s.clone()).await;
    let built = r.expect("the build succeeds");
    assert_eq!(built.cached_steps, 0);
    assert_eq!(built.key.len(), 32);
    assert!(built.stored_bytes > 0);
    assert!(
        step_lines(&lines, 2).iter().any(|l| l == "root"),
        "step 2's output is in the log: {:?}",
        step_lines(&lines, 2)
    );
    assert!(node.list().is_empty(), "the builder VM is gone");

    // A sandbox from the key sees every step's effect and the running server.
    let (info, _) = node
        .create(CreateOptions {
            template: built.key.clone(),
            ..Default::default()
        })
        .await
        .expect("a sandbox from the built template");
    let id = &info.id;
    assert_eq!(info.template_key, built.key);
    assert_eq!(
        out(
            &node,
            id,
            "cat /opt/app/hello.txt; stat -c %U /opt/app/hello.txt; /bin/sh /opt/app/sub/run.sh",
            Some("root")
        )
        .await,
        "hello from copy\nuser\nran\n"
    );
    assert_eq!(
        out(&node, id, "cat /etc/built-by-root", Some("root")).await,
        "by-root\n"
    );
    assert_eq!(
        out(&node, id, "cat /srv/work/out.txt", Some("root")).await,
        "bar baz\nuser\n/srv/work\n"
    );
    assert_eq!(
        out(&node, id, "cat /tmp/who7", Some("root")).await,
        "root\n"
    );
    assert_eq!(
        out(&node, id, "curl -sf http://127.0.0.1:8000/hello.txt", None).await,
        "hello from copy\n"
    );
    // The template's user, workdir and env are the defaults of processes that name none.
    assert_eq!(
        out(&node, id, "id -un; pwd; echo \"$FOO\"", None).await,
        "user\n/srv/work\nbar baz\n"
    );
    node.kill(id).await.unwrap();

    // Unchanged: every step is a cache hit and the template is the same.
    let (r, lines, again) = build(&node, s.clone()).await;
    let rebuilt = r.expect("the rebuild succeeds");
    assert_eq!(rebuilt.key, built.key);
    assert_eq!(rebuilt.cached_steps, 8);
    assert!(lines.iter().all(|l| !l.message.starts_with("RUN ")));
    eprintln!(
        "first build {:.1} s, unchanged rebuild {:.1} s",
        first.as_secs_f64(),
        again.as_secs_f64()
    );

    // The last RUN edited: only it (and the state step after the last cached layer) reruns.
    let mut edited = s.clone();
    edited.steps = steps(&hash, "whoami > /tmp/who7; echo v2 > /tmp/v2");
    let (r, lines, _) = build(&node, edited).await;
    let v2 = r.expect("the edited build succeeds");
    assert_ne!(v2.key, built.key);
    assert_eq!(v2.cached_steps, 5);
    for i in [1, 2, 5] {
        assert_eq!(step_lines(&lines, i), ["CACHED"], "step {i}");
    }
    assert!(step_lines(&lines, 7).iter().any(|l| l.starts_with("RUN ")));
    let (info, _) = node
        .create(CreateOptions {
            template: v2.key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        out(&node, &info.id, "cat /tmp/v2 /etc/built-by-root", None).await,
        "v2\nby-root\n"
    );
    node.kill(&info.id).await.unwrap();

    // `force` on the last RUN reruns it though it is cached, into a template of its own; the
    // unforced build then finds its template again.
    let mut forced = s.clone();
    forced.steps = steps(&hash, "whoami > /tmp/who7; echo v2 > /tmp/v2");
    forced.steps[6].force = true;
    let (r, lines, _) = build(&node, forced.clone()).await;
    let f = r.expect("the forced build succeeds");
    assert_eq!(f.cached_steps, 5);
    assert_ne!(f.key, v2.key);
    assert!(step_lines(&lines, 7).iter().any(|l| l.starts_with("RUN ")));
    forced.steps[6].force = false;
    let (r, _, _) = build(&node, forced).await;
    assert_eq!(r.unwrap().key, v2.key);

    // A failing RUN: its index and its output.
    let failing = spec(
        files.path(),
        vec![
            run("true", None),
            run("echo about-to-fail; echo on-stderr >&2; exit 3", None),
        ],
    );
    let (r, _, _) = build(&node, failing).await;
    let f = r.expect_err("the build fails");
    assert_eq!(f.step, StepRef::Step(2));
    assert!(f.message.contains("exited with 3"), "{}", f.message);
    assert!(f.message.contains("about-to-fail"), "{}", f.message);
    assert!(f.message.contains("on-stderr"), "{}", f.message);
    assert!(node.list().is_empty(), "the failed build's VM is gone");

    // A COPY of files never uploaded fails before any VM starts, naming the hash.
    let missing = spec(
        files.path(),
        vec![step(StepKind::Copy {
            files_hash: "0123abcd".into(),
            src: "x".into(),
            dest: "/x".into(),
            owner: None,
            mode: None,
        })],
    );
    let (r, _, _) = build(&node, missing).await;
    let f = r.expect_err("the build fails");
    assert_eq!(f.step, StepRef::Step(1));
    assert!(f.message.contains("0123abcd"), "{}", f.message);

    // A deleted template serves no new sandbox; its files go once nothing uses it.
    node.delete_template(&v2.key).unwrap();
    assert!(
        node.create(CreateOptions {
            template: v2.key.clone(),
            ..Default::default()
        })
        .await
        .is_err()
    );
    assert!(!data.path().join("templates").join(&v2.key).exists());
}

/// The measured case: `base` + one pip package + one copied file. Prints the build's
/// timings (run with --nocapture).
///
/// This machine reaches the internet through a TLS-intercepting proxy whose CA only the host
/// trusts, so the build lends that CA to pip (a COPY and `PIP_CERT`), as an operator behind such a
/// proxy would; on an ordinary network the ENV and COPY of the CA are not needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, the built `base` template and PyPI through the egress proxy"]
async fn a_build_with_pip_and_a_copy() {
    let data = tempfile::tempdir().unwrap();
    let _reaper = Reaper(data.path().to_path_buf());
    let files = tempfile::tempdir().unwrap();
    let node = node(data.path()).await;
    let hash = make_archive(files.path(), "measured\n");
    let ca_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ca_dir.path().join("ca")).unwrap();
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        ca_dir.path().join("ca/host-ca.crt"),
    )
    .unwrap();
    let tar = files.path().join("ca.tar");
    assert!(
        std::process::Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(ca_dir.path())
            .arg("ca")
            .status()
            .unwrap()
            .success()
    );
    let ca_hash = alcove_image::build::sha256_file(&tar).unwrap();
    std::fs::rename(&tar, files.path().join(&ca_hash)).unwrap();

    let s = spec(
        files.path(),
        vec![
            step(StepKind::Copy {
                files_hash: ca_hash,
                src: "ca/host-ca.crt".into(),
                dest: "/etc/alcove-build-ca.crt".into(),
                owner: Some("root".into()),
                mode: Some(0o644),
            }),
            step(StepKind::Env {
                vars: vec![("PIP_CERT".into(), "/etc/alcove-build-ca.crt".into())],
            }),
            run(
                "pip install --break-system-packages --no-cache-dir -q six",
                Some("root"),
            ),
            step(StepKind::Copy {
                files_hash: hash,
                src: "app/hello.txt".into(),
                dest: "/home/user/hello.txt".into(),
                owner: None,
                mode: None,
            }),
        ],
    );
    let (r, _, took) = build(&node, s.clone()).await;
    let built = r.expect("the build succeeds");
    eprintln!("base + pip + copy: {:.1} s", took.as_secs_f64());
    let (info, _) = node
        .create(CreateOptions {
            template: built.key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        out(
            &node,
            &info.id,
            "python3 -c 'import six; print(six.__name__)'; cat /home/user/hello.txt",
            None
        )
        .await,
        "six\nmeasured\n"
    );
    node.kill(&info.id).await.unwrap();
    let (r, _, again) = build(&node, s).await;
    assert_eq!(r.unwrap().key, built.key);
    eprintln!("unchanged rebuild: {:.2} s", again.as_secs_f64());
}
