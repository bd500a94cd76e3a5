//! The end of a build, and the start of one from an image: `template.json` written in the
//! builder VM and its last layer cached; that layer's disk chain flattened into a raw ext4 disk,
//! cold-booted by the node's jailed VMM (the disk and the start command are the caller's code)
//! and snapshotted as a template under `<data>/templates/<key>/` (`manifest.json` last, beside
//! `build.json`). An OCI image's disk is booted the same way into an intermediate template the
//! steps then start from.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alcove_image::{Recipe, Template};
use alcove_vmm::QemuVmm;
use bytes::Bytes;

use super::run::{Builder, failure};
use super::spec::{
    BuildFailure, BuildLog, BuildLogEntry, BuildSpec, ImageRegistry, LogLevel, StepRef,
};
use super::state::{self, StepState};
use super::{BUILD_RECORD, BuildRecord, Parent, Plan, built_dir};
use crate::node::{Node, error_chain};

/// How long a template's VM may take from boot to the agent's ready line when the build's own
/// deadline leaves less (a build that is late still gets a fair boot).
const MIN_READY: Duration = Duration::from_secs(120);

/// Writes the template's `template.json` into the builder VM, syncs, and stops the VM with its
/// disk flushed. Returns the top of the builder's disk chain.
pub(super) async fn finalize_guest(
    node: &Arc<Node<QemuVmm>>,
    b: &Builder<QemuVmm>,
    plan: &Plan,
) -> Result<std::path::PathBuf, BuildFailure> {
    let step = StepRef::Finalize;
    b.say(step, LogLevel::Info, "writing the template's configuration");
    let st = &plan.final_state;
    let tmp = "/etc/alcove/template.json.new";
    b.exec_ok(
        step,
        "preparing /etc/alcove",
        "mkdir -p /etc/alcove",
        "root",
        Some("/"),
        &[],
    )
    .await?;
    b.upload(step, tmp, Bytes::from(plan.template_json.clone()))
        .await?;
    let mut extra = vec![
        ("ALCOVE_TMP", tmp.to_string()),
        ("ALCOVE_USER", st.user.clone()),
    ];
    extra.push(("ALCOVE_DIR", st.workdir.clone().unwrap_or_default()));
    b.exec_ok(
        step,
        "finalizing the disk",
        r#"set -e
chmod 0644 "$ALCOVE_TMP"
mv -f "$ALCOVE_TMP" /etc/alcove/template.json
id -u "$ALCOVE_USER" >/dev/null || { echo "the template's user $ALCOVE_USER does not exist; add it in a RUN step (useradd)" >&2; exit 1; }
if [ -n "$ALCOVE_DIR" ] && [ ! -d "$ALCOVE_DIR" ]; then mkdir -p "$ALCOVE_DIR"; chown "$ALCOVE_USER:$(id -gn "$ALCOVE_USER")" "$ALCOVE_DIR"; fi
sync"#,
        "root",
        Some("/"),
        &extra,
    )
    .await?;
    // QMP `stop` drains and flushes the disk: the builder's qcow2 chain is complete on the host
    // (a SIGKILL would not flush it). The VM stays stopped until it is killed.
    let vm = node
        .vm(&b.id)
        .map_err(|e| failure(step, format!("the builder VM is gone: {}", error_chain(&e))))?;
    let left = b.remaining(step)?;
    match tokio::time::timeout(left, vm.pause()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(failure(
                step,
                format!("stopping the builder VM failed: {}", error_chain(&e)),
            ));
        }
        Err(_) => {
            return Err(failure(
                step,
                "stopping the builder VM ran past the deadline",
            ));
        }
    }
    node.live(&b.id)
        .map(|l| l.dir().join("disk.qcow2"))
        .map_err(|e| failure(step, format!("the builder VM is gone: {}", error_chain(&e))))
}

/// The new template's dir with the builder's disk chain flattened into its `disk.ext4`.
pub(super) async fn flatten_into_dir(
    node: &Arc<Node<QemuVmm>>,
    plan: &Plan,
    chain: &Path,
    log: &BuildLog,
    deadline: Instant,
) -> Result<std::path::PathBuf, BuildFailure> {
    let step = StepRef::Finalize;
    let dir = built_dir(&node.cfg.data_dir, &plan.template_key);
    let io = |what: &str, e: std::io::Error| {
        failure(
            step,
            format!("{what} {}: {e}; check the node's disk", dir.display()),
        )
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io("removing the half-built", e))?;
    }
    start_dir(&dir).map_err(|e| io("creating", e))?;
    let t = Instant::now();
    let disk = dir.join("disk.ext4");
    if let Err(e) = flatten(chain, &disk, deadline).await {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    log(BuildLogEntry {
        level: LogLevel::Info,
        step,
        message: format!(
            "disk flattened in {:.1} s ({} MiB on the host)",
            t.elapsed().as_secs_f64(),
            crate::node::allocated_bytes(&disk) >> 20
        ),
    });
    Ok(dir)
}

/// The template from its flattened disk: booted (start and ready commands run), snapshotted,
/// recorded.
pub(super) async fn boot_template(
    node: &Arc<Node<QemuVmm>>,
    spec: &BuildSpec,
    parent: &Parent,
    plan: &Plan,
    dir: &Path,
    log: &BuildLog,
    deadline: Instant,
) -> Result<Arc<Template>, BuildFailure> {
    let recipe = Recipe {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disk_mib: parent.template.recipe.disk_mib,
        apt: Vec::new(),
        pip: Vec::new(),
        npm: Vec::new(),
        files: Default::default(),
        env: plan.final_state.env.clone(),
        start_cmd: plan.start_cmd.clone(),
        start_user: None,
        ready_cmd: spec.ready_cmd.clone(),
        run: Vec::new(),
    };
    let record = BuildRecord {
        build_id: spec.build_id.clone(),
        state: plan.final_state.clone(),
        layer_key: plan.finalize_key.clone(),
    };
    let made = boot_into_template(
        node,
        dir,
        &plan.template_key,
        recipe,
        &parent.template.kernel,
        &record,
        log,
        StepRef::Finalize,
        deadline,
    )
    .await;
    match made {
        Ok(t) => Ok(Arc::new(t)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            Err(e)
        }
    }
}

/// Boots `<dir>/disk.ext4` with the node's (jailed) VMM and makes the template of it.
#[allow(clippy::too_many_arguments)]
async fn boot_into_template(
    node: &Arc<Node<QemuVmm>>,
    dir: &Path,
    key: &str,
    recipe: Recipe,
    kernel: &Path,
    record: &BuildRecord,
    log: &BuildLog,
    step: StepRef,
    deadline: Instant,
) -> Result<Template, BuildFailure> {
    let t0 = Instant::now();
    let net = node.net.clone();
    let (ns, _) = tokio::task::spawn_blocking(move || net.create(false))
        .await
        .expect("netns task")
        .map_err(|e| {
            failure(
                step,
                format!("making the template VM's network namespace: {e}"),
            )
        })?;
    let disk = dir.join("disk.ext4");
    let progress: alcove_image::Progress = {
        let log = log.clone();
        Arc::new(move |ev| {
            if let alcove_image::build::ProgressEvent::Line { text } = ev {
                log(BuildLogEntry {
                    level: LogLevel::Info,
                    step,
                    message: text,
                })
            }
        })
    };
    let ready_timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_READY);
    let booted = Instant::now();
    let snap = alcove_image::build::snapshot_disk(&alcove_image::build::SnapshotDisk {
        vmm: &node.cfg.vmm,
        recipe: &recipe,
        kernel,
        dir,
        disk: &disk,
        netns: ns,
        ready_timeout,
        progress: &progress,
        on_snapshot: &|| {},
    })
    .await
    .map_err(|e| {
        failure(
            step,
            format!(
                "booting the built template failed: {}; check the start and ready commands",
                error_chain(&e)
            ),
        )
    })?;
    log(BuildLogEntry {
        level: LogLevel::Info,
        step,
        message: format!(
            "template snapshotted {:.1} s after its boot",
            booted.elapsed().as_secs_f64()
        ),
    });
    let t = Template {
        manifest_version: alcove_image::build::manifest_version(),
        name: recipe.name.clone(),
        key: key.to_string(),
        dir: dir.to_path_buf(),
        recipe,
        kernel: kernel.to_path_buf(),
        disk,
        mem: snap.mem,
        state: snap.state,
        overlay: snap.overlay,
        state_sha256: snap.state_sha256,
        mem_sha256: snap.mem_sha256,
        accel: node.cfg.vmm.accel.accel.as_str().to_string(),
        built_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_secs: t0.elapsed().as_secs_f64(),
        boot_to_ready_secs: snap.boot_to_ready.as_secs_f64(),
    };
    let rec = dir.join(BUILD_RECORD);
    crate::private::write_file(
        &rec,
        &serde_json::to_vec_pretty(record).expect("serialises"),
    )
    .map_err(|e| failure(step, format!("writing {}: {e}", rec.display())))?;
    alcove_image::build::write_manifest(&t).map_err(|e| {
        failure(
            step,
            format!("writing the template's manifest: {}", error_chain(&e)),
        )
    })?;
    let _ = std::fs::remove_file(dir.join(BUILDING));
    Ok(t)
}

/// Names the process building a template dir, so a `Node::open` elsewhere (the CLI beside a
/// server) leaves it alone.
pub(super) const BUILDING: &str = "building";

fn start_dir(dir: &Path) -> std::io::Result<()> {
    crate::private::create_dir_all(dir)?;
    crate::private::write_file(
        &dir.join(BUILDING),
        std::process::id().to_string().as_bytes(),
    )
}

/// `qemu-img convert` of a qcow2 chain into one sparse raw file.
async fn flatten(chain: &Path, out: &Path, deadline: Instant) -> Result<(), BuildFailure> {
    let step = StepRef::Finalize;
    let left = deadline.saturating_duration_since(Instant::now());
    let cmd = tokio::process::Command::new("qemu-img")
        // `-U`: the stopped builder VM still holds its image open (and locked).
        .args(["convert", "-q", "-U", "-O", "raw"])
        .arg(chain)
        .arg(out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(left.max(MIN_READY), cmd).await {
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => Err(failure(
            step,
            format!(
                "flattening the disk failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        )),
        Ok(Err(e)) => Err(failure(step, format!("running qemu-img: {e}"))),
        Err(_) => Err(failure(
            step,
            "flattening the disk ran past the build's deadline",
        )),
    }
}

/// `fromImage`: the image pulled into a disk (the oci module), booted into an intermediate
/// template (no start command) the steps start from. Its `ENV`, `WORKDIR` and `USER` seed the
/// steps' state; its `ENTRYPOINT` + `CMD` become the start command unless the spec has one.
pub(super) async fn image_parent(
    node: &Arc<Node<QemuVmm>>,
    spec: &BuildSpec,
    reference: &str,
    registry: Option<&ImageRegistry>,
    log: &BuildLog,
    deadline: Instant,
) -> Result<Parent, BuildFailure> {
    let step = StepRef::Base;
    let Some(mut opts) = node.oci.lock().expect("oci lock").clone() else {
        return Err(failure(
            step,
            "this node takes no OCI images (the server was started without OCI settings); build from a template instead",
        ));
    };
    let l = log.clone();
    opts.progress = Arc::new(move |ev| {
        if let alcove_image::build::ProgressEvent::Line { text } = ev {
            l(BuildLogEntry {
                level: LogLevel::Info,
                step,
                message: text,
            })
        }
    });
    let req = alcove_image::oci::PullRequest {
        reference: reference.to_string(),
        credentials: registry.map(|r| (r.username.clone(), r.password.clone())),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let image = match tokio::time::timeout(left, alcove_image::oci::image_disk(&req, &opts)).await {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => {
            return Err(failure(
                step,
                format!(
                    "the image {reference} could not be used: {}",
                    error_chain(&e)
                ),
            ));
        }
        Err(_) => {
            return Err(failure(
                step,
                format!("pulling {reference} ran past the build's deadline"),
            ));
        }
    };
    let cfg = &image.config;
    let st = StepState {
        user: cfg
            .user
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into()),
        workdir: cfg.workdir.clone().filter(|w| !w.is_empty()),
        env: cfg.env.iter().cloned().collect(),
    };
    let mut words = cfg.entrypoint.clone();
    words.extend(cfg.cmd.iter().cloned());
    let start_cmd = (!words.is_empty()).then(|| state::shell_join(&words));
    let base = state::base_key(&format!(
        "image\0{}\0{}",
        image.digest,
        image.disk.display()
    ));
    let key = state::template_key(&base, spec.vcpus, spec.memory_mib, None);
    if let Ok(t) = node.built_template(&key) {
        return Ok(Parent {
            template: t,
            state: st,
            start_cmd,
        });
    }
    // Image templates boot the kernel the built-in templates boot.
    let kernel = alcove_image::load_template(&node.cfg.cache_dir, "base")
        .map_err(|e| {
            failure(
                step,
                format!(
                    "no kernel to boot the image with: {}; build the `base` template first",
                    error_chain(&e)
                ),
            )
        })?
        .kernel;
    let dir = built_dir(&node.cfg.data_dir, &key);
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    start_dir(&dir).map_err(|e| failure(step, format!("creating {}: {e}", dir.display())))?;
    let made = async {
        let disk = dir.join("disk.ext4");
        let out = tokio::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&image.disk)
            .arg(&disk)
            .output()
            .await
            .map_err(|e| failure(step, format!("copying the image's disk: {e}")))?;
        if !out.status.success() {
            return Err(failure(
                step,
                format!(
                    "copying the image's disk: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let recipe = Recipe {
            name: format!("image:{reference}"),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: image.disk_mib,
            apt: Vec::new(),
            pip: Vec::new(),
            npm: Vec::new(),
            files: Default::default(),
            env: st.env.clone(),
            start_cmd: None,
            start_user: None,
            ready_cmd: None,
            run: Vec::new(),
        };
        let record = BuildRecord {
            build_id: spec.build_id.clone(),
            state: st.clone(),
            layer_key: base.clone(),
        };
        boot_into_template(
            node, &dir, &key, recipe, &kernel, &record, log, step, deadline,
        )
        .await
    }
    .await;
    match made {
        Ok(t) => Ok(Parent {
            template: Arc::new(t),
            state: st,
            start_cmd,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}
