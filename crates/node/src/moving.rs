//! Paused sandboxes and snapshots moving between nodes of a cluster: which files one is made
//! of, and taking one in whose files another node wrote into this node's data dir (the
//! cluster's blob store carries them, `alcove_cluster::blobs`, checked by their SHA-256s).
//!
//! A disk leaves flattened onto its template's disk: a sandbox made from a snapshot, or a
//! snapshot of one, has a chain of layers (`snapshots.rs`) that stay on this node, so what
//! leaves is one qcow2 image holding everything above the template, made in a scratch dir by a
//! safe `qemu-img rebase` (it copies each cluster where the chain differs from the template).
//! On arrival the image's backing file is pointed at the template's disk on that node (the
//! template is built there too; its key says it is the same build).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alcove_vmm::Vmm;

use crate::create::qemu_img;
use crate::live::Live;
use crate::node::Node;
use crate::record::{self, Record};
use crate::snapshots::{self, SnapshotMeta};
use crate::{NodeError, SandboxState};

/// Files that leave this node: their paths, and the scratch dir made for them (if any), which
/// the caller removes once they are uploaded.
#[derive(Debug)]
pub struct Outgoing {
    pub files: Vec<(String, PathBuf)>,
    pub scratch: Option<PathBuf>,
}

/// Names the scratch dirs of exports running at once.
static SCRATCH: AtomicU64 = AtomicU64::new(0);

impl<V: Vmm> Node<V> {
    fn scratch_dir(&self, id: &str) -> Result<PathBuf, NodeError> {
        let root = self.cfg.data_dir.join("outgoing");
        crate::private::create_dir_all(&root)
            .map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("{id}.{}.{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::private::create_dir(&dir)
            .map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
        Ok(dir)
    }

    /// Removes what exports of processes that are gone left (another live process, a server
    /// while this is a CLI command, may be exporting).
    pub(crate) fn remove_stale_scratch(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("outgoing")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('.').nth(1).and_then(|p| p.parse::<u32>().ok());
            if !pid.is_some_and(crate::node::other_alcove_process_alive) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// `disk` (a qcow2 layer over `template_key`'s disk, maybe through more layers) as one
    /// image over the template's disk: `disk` itself when it sits on the template directly,
    /// else a flattened copy in `scratch` (made on first need).
    async fn flat_disk(
        &self,
        id: &str,
        disk: &Path,
        layered: bool,
        template_key: &str,
        scratch: &mut Option<PathBuf>,
    ) -> Result<PathBuf, NodeError> {
        if !layered {
            return Ok(disk.to_path_buf());
        }
        let template = self.template_by_key(template_key)?;
        let dir = match scratch {
            Some(d) => d.clone(),
            None => scratch.insert(self.scratch_dir(id)?).clone(),
        };
        let flat = dir.join(snapshots::DISK);
        let (from, to) = (disk.to_path_buf(), flat.clone());
        crate::node::blocking(move || {
            std::fs::copy(&from, &to)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
        })
        .await
        .map_err(|e| NodeError::Io(flat.display().to_string(), e))?;
        // Safe rebase: what the chain holds over the template is copied into the image.
        rebase(&flat, &template.disk, true).await?;
        Ok(flat)
    }

    /// The files another node needs to resume paused sandbox `id`: its record, disk (flattened
    /// if it sits on a snapshot's layer), memory image and the rest of its dir. Refused for one
    /// that mounts volumes (they are this host's).
    pub async fn outgoing_paused(&self, id: &str) -> Result<Outgoing, NodeError> {
        let live = self.live(id)?;
        let info = live.snapshot();
        if !matches!(info.state, SandboxState::Paused { .. }) {
            return Err(NodeError::NotPaused {
                id: id.into(),
                state: info.state.to_string(),
            });
        }
        if !info.volumes.is_empty() {
            return Err(NodeError::Unmovable {
                id: id.into(),
                why: "it mounts volumes".into(),
            });
        }
        let dir = live.dir();
        let mut files = Vec::new();
        let mut scratch = None;
        let made = async {
            for e in
                std::fs::read_dir(dir).map_err(|e| NodeError::Io(dir.display().to_string(), e))?
            {
                let e = e.map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
                let ft = e
                    .file_type()
                    .map_err(|err| NodeError::Io(dir.display().to_string(), err))?;
                // Sockets and the like belong to a VM that is gone.
                if !ft.is_file() {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                let path = if name == "disk.qcow2" {
                    let layered = info.base_snapshot.is_some();
                    self.flat_disk(id, &e.path(), layered, &info.template_key, &mut scratch)
                        .await?
                } else {
                    e.path()
                };
                files.push((name, path));
            }
            Ok::<_, NodeError>(())
        }
        .await;
        if let Err(e) = made {
            if let Some(d) = scratch {
                let _ = std::fs::remove_dir_all(d);
            }
            return Err(e);
        }
        files.sort();
        Ok(Outgoing { files, scratch })
    }

    /// The files another node needs to make sandboxes from snapshot `id`: its disk layer
    /// (flattened onto the template's disk if it sits on a parent snapshot's), its memory
    /// image and its meta.
    pub async fn outgoing_snapshot(&self, id: &str) -> Result<Outgoing, NodeError> {
        if !crate::node::valid_id(id) {
            return Err(NodeError::SnapshotNotFound(id.into()));
        }
        let sdir = snapshots::snapshot_dir(&self.cfg.data_dir, id);
        let meta = snapshots::read_meta(&sdir)
            .filter(|m| !m.deleted)
            .ok_or_else(|| NodeError::SnapshotNotFound(id.into()))?;
        let mut scratch = None;
        let disk = self
            .flat_disk(
                id,
                &sdir.join(snapshots::DISK),
                meta.parent.is_some(),
                &meta.template_key,
                &mut scratch,
            )
            .await?;
        let mut files = vec![
            (snapshots::DISK.to_owned(), disk),
            (snapshots::META.to_owned(), sdir.join(snapshots::META)),
        ];
        for f in [snapshots::MEMORY, snapshots::RAM, snapshots::RAM_STATE] {
            if sdir.join(f).is_file() {
                files.push((f.to_owned(), sdir.join(f)));
            }
        }
        Ok(Outgoing { files, scratch })
    }

    /// Where the files of snapshot `id` coming from another node go before
    /// [`Node::adopt_snapshot`]; `None` when this node has the snapshot already.
    pub fn incoming_snapshot_dir(&self, id: &str) -> Result<Option<PathBuf>, NodeError> {
        if !crate::node::valid_id(id) {
            return Err(NodeError::SnapshotNotFound(id.into()));
        }
        match snapshots::read_meta(&snapshots::snapshot_dir(&self.cfg.data_dir, id)) {
            Some(m) if !m.deleted => Ok(None),
            Some(_) => Err(NodeError::SnapshotNotFound(id.into())),
            None => Ok(Some(self.cfg.data_dir.join("incoming-snapshots").join(id))),
        }
    }

    /// Takes in snapshot `id`, whose files are complete in [`Node::incoming_snapshot_dir`]:
    /// its layer is pointed at the template's disk here, and sandboxes can be made from it.
    pub async fn adopt_snapshot(&self, id: &str) -> Result<(), NodeError> {
        let Some(dir) = self.incoming_snapshot_dir(id)? else {
            return Ok(());
        };
        let refuse = |why: String| NodeError::Unmovable { id: id.into(), why };
        let mut meta: SnapshotMeta =
            snapshots::read_meta(&dir).ok_or_else(|| refuse("its meta did not arrive".into()))?;
        if meta.id != id || meta.deleted {
            return Err(refuse(format!("its meta is of snapshot {}", meta.id)));
        }
        let template = self.template_on_node(&meta.template_key, id)?;
        let disk = dir.join(snapshots::DISK);
        rebase(&disk, &template.disk, false).await?;
        meta.parent = None;
        if meta.disk_sha256.is_some() {
            // The image's header names another backing path now.
            meta.disk_sha256 = Some(crate::node::sha256_blocking(&disk).await?);
        }
        snapshots::write_meta(&dir, &meta)?;
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [snapshots::DISK, snapshots::RAM] {
                let p = dir.join(f);
                if p.exists() {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400))
                        .map_err(|e| NodeError::Io(p.display().to_string(), e))?;
                }
            }
        }
        let root = snapshots::snapshots_root(&self.cfg.data_dir);
        crate::private::create_dir_all(&root)
            .map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        let dest = snapshots::snapshot_dir(&self.cfg.data_dir, id);
        std::fs::rename(&dir, &dest).map_err(|e| NodeError::Io(dest.display().to_string(), e))?;
        tracing::info!(snapshot_id = %id, "took in a snapshot from another node");
        Ok(())
    }

    /// The files another node needs to make sandboxes from template build `key` (one of this
    /// node's cache): its manifest, device state, RAM file, kernel and disk (as a qcow2 image in
    /// a scratch dir: only the blocks the file system uses).
    pub async fn outgoing_template(&self, key: &str) -> Result<Outgoing, NodeError> {
        let t = alcove_image::build::load_template_key(&self.cfg.cache_dir, key)?;
        // Its files' names, checked before anything is made.
        let (state, mem) = (in_dir(&t, &t.state)?, in_dir(&t, &t.mem)?);
        let scratch = self.scratch_dir(key)?;
        let disk = scratch.join(TEMPLATE_DISK);
        let flags = ["convert", "-U", "-f", "raw", "-O", "qcow2"].map(OsStr::new);
        let paths = [t.disk.as_os_str(), disk.as_os_str()];
        if let Err(e) = qemu_img(&disk, flags.into_iter().chain(paths)).await {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        Ok(Outgoing {
            files: vec![
                (state, t.state.clone()),
                (mem, t.mem.clone()),
                (TEMPLATE_MANIFEST.into(), t.dir.join("manifest.json")),
                (KERNEL.into(), t.kernel.clone()),
                (TEMPLATE_DISK.into(), disk),
            ],
            scratch: Some(scratch),
        })
    }

    /// Where the files of template build `key` coming from another node go before
    /// [`Node::adopt_template`]; `None` when this node's cache has it already.
    pub fn incoming_template_dir(&self, key: &str) -> Result<Option<PathBuf>, NodeError> {
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(alcove_image::ImageError::UnknownTemplate(key.into()).into());
        }
        if alcove_image::build::load_template_key(&self.cfg.cache_dir, key).is_ok() {
            return Ok(None);
        }
        Ok(Some(
            self.cfg.cache_dir.join("incoming-templates").join(key),
        ))
    }

    /// Takes in template build `key`, whose files are complete in its incoming dir: laid out as
    /// the build on the other node left it, at the same paths (the build key names the cache
    /// path, so nodes that share templates share that path), every checksum checked, and made
    /// the template its name resolves to here.
    pub async fn adopt_template(&self, key: &str) -> Result<(), NodeError> {
        let Some(dir) = self.incoming_template_dir(key)? else {
            return Ok(());
        };
        let refuse = |why: String| NodeError::Unmovable {
            id: key.into(),
            why,
        };
        let _ = std::fs::rename(dir.join(TEMPLATE_MANIFEST), dir.join("manifest.json"));
        let t = alcove_image::build::load_template_dir(&dir)
            .map_err(|e| refuse(format!("its manifest: {e}")))?;
        let home = self.cfg.cache_dir.join("templates").join(key);
        if t.key != key
            || t.manifest_version != alcove_image::build::manifest_version()
            || t.dir != home
        {
            return Err(refuse(format!(
                "its manifest is of build {} (version {}) in {}, not of this node's cache {}",
                t.key,
                t.manifest_version,
                t.dir.display(),
                home.display()
            )));
        }
        // The disk back to a raw file (sparse), and a new empty overlay over it where it will be.
        let raw = dir.join(in_dir(&t, &t.disk)?);
        let overlay = dir.join(in_dir(&t, &t.overlay)?);
        let sent = dir.join(TEMPLATE_DISK);
        let flags = ["convert", "-f", "qcow2", "-O", "raw"].map(OsStr::new);
        qemu_img(
            &raw,
            flags.into_iter().chain([sent.as_os_str(), raw.as_os_str()]),
        )
        .await?;
        let _ = std::fs::remove_file(&sent);
        let size = std::fs::metadata(&raw)
            .map_err(|e| NodeError::Io(raw.display().to_string(), e))?
            .len()
            .to_string();
        // `-u`: its backing file is not at its place yet.
        let flags = ["create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b"].map(OsStr::new);
        let paths = [t.disk.as_os_str(), overlay.as_os_str(), OsStr::new(&size)];
        qemu_img(&overlay, flags.into_iter().chain(paths)).await?;
        // Checked as a load checks it, at its place-to-be's names.
        let here = alcove_image::build::Template {
            dir: dir.clone(),
            disk: raw,
            mem: dir.join(in_dir(&t, &t.mem)?),
            state: dir.join(in_dir(&t, &t.state)?),
            overlay,
            kernel: dir.join(KERNEL),
            ..t.clone()
        };
        crate::node::blocking(move || here.verify_all())
            .await
            .map_err(|e| refuse(format!("it does not check out: {e}")))?;
        let root = self.cfg.cache_dir.join("templates");
        std::fs::create_dir_all(&root).map_err(|e| NodeError::Io(root.display().to_string(), e))?;
        if home.exists() {
            // A half-taken copy of an earlier try (a complete one would have loaded).
            let _ = std::fs::remove_dir_all(&home);
        }
        std::fs::rename(&dir, &home).map_err(|e| NodeError::Io(home.display().to_string(), e))?;
        // The kernel: where the build names it, unless this node has that one already (a
        // kernel's dir is named by the hash of its own recipe).
        let staged = home.join(KERNEL);
        if t.kernel != staged {
            if t.kernel.exists() {
                let _ = std::fs::remove_file(&staged);
            } else {
                let parent = t
                    .kernel
                    .parent()
                    .ok_or_else(|| refuse("no kernel dir".into()))?;
                std::fs::create_dir_all(parent)
                    .map_err(|e| NodeError::Io(parent.display().to_string(), e))?;
                std::fs::rename(&staged, &t.kernel)
                    .or_else(|_| std::fs::copy(&staged, &t.kernel).map(drop))
                    .map_err(|e| NodeError::Io(t.kernel.display().to_string(), e))?;
                let _ = std::fs::remove_file(&staged);
            }
        }
        // Read-only, and the manifest written again last, as a build leaves it.
        alcove_image::build::write_manifest(&t)?;
        alcove_image::build::set_template_name(&self.cfg.cache_dir, &t.name, key)?;
        tracing::info!(template = %t.name, template_key = key, "took in a template from another node");
        Ok(())
    }

    /// Template build `key`, which a sandbox or snapshot `id` from another node needs here.
    fn template_on_node(
        &self,
        key: &str,
        id: &str,
    ) -> Result<alcove_image::build::Template, NodeError> {
        self.template_by_key(key).map_err(|_| NodeError::Unmovable {
            id: id.into(),
            why: format!(
                "template build {key} is not on this node (build the template here, with the \
                 same recipe as on the other nodes)"
            ),
        })
    }

    /// Where the files of a sandbox coming from another node go before [`Node::adopt_paused`].
    pub fn incoming_dir(&self, id: &str) -> Result<PathBuf, NodeError> {
        if !crate::node::valid_id(id) {
            return Err(NodeError::NotFound(id.into()));
        }
        if self.live(id).is_ok() {
            return Err(NodeError::Unmovable {
                id: id.into(),
                why: "this node has a sandbox of that id already".into(),
            });
        }
        Ok(self.cfg.data_dir.join("sandboxes").join(id))
    }

    /// Takes in the paused sandbox whose files are complete in [`Node::incoming_dir`]: its disk
    /// is pointed at the template's disk here, and from now on it is this node's, resumed like
    /// any other (its memory image checked first).
    pub async fn adopt_paused(self: &Arc<Self>, id: &str) -> Result<(), NodeError> {
        let dir = self.incoming_dir(id)?;
        let refuse = |why: String| NodeError::Unmovable { id: id.into(), why };
        let mut info =
            record::read(&dir).ok_or_else(|| refuse("its record did not arrive".into()))?;
        if info.id != id || !matches!(info.state, SandboxState::Paused { .. }) || info.pooled {
            return Err(refuse(format!(
                "its record is of sandbox {} in state {}",
                info.id, info.state
            )));
        }
        // Its disk's backing file and memory layout are the template's: built here too.
        let template = self.template_on_node(&info.template_key, id)?;
        let disk = dir.join("disk.qcow2");
        rebase(&disk, &template.disk, false).await?;
        // It left flattened: no snapshot's layer is under it here.
        info.base_snapshot = None;
        if let SandboxState::Paused {
            disk_only: true,
            state_sha256,
            ..
        } = &mut info.state
        {
            // What its resume checks is the disk, whose header changed.
            *state_sha256 = crate::node::sha256_blocking(&disk).await?;
        }
        let record = Record::taken_in(&dir, info)?;
        let live = Live::new(record, None, None);
        let mut all = self.sandboxes.lock().expect("sandboxes lock");
        if all.contains_key(id) {
            return Err(refuse("this node has a sandbox of that id already".into()));
        }
        all.insert(id.to_owned(), live);
        tracing::info!(sandbox_id = %id, "took in a paused sandbox from another node");
        Ok(())
    }
}

/// A template's disk as it travels: qcow2, holding only the blocks in use.
const TEMPLATE_DISK: &str = "disk.qcow2";
/// A template's kernel as it travels.
const KERNEL: &str = "vmlinux";
/// A template's manifest as it travels (the blob store's own manifest is `manifest.json`).
const TEMPLATE_MANIFEST: &str = "template.json";

/// The name of template file `p` in the template's dir (its files are directly in it).
fn in_dir(t: &alcove_image::build::Template, p: &Path) -> Result<String, NodeError> {
    match p.strip_prefix(&t.dir).ok().and_then(|r| r.to_str()) {
        // Not nested, and not a name the transport uses for something else.
        Some(name)
            if !name.is_empty()
                && !name.contains('/')
                && ![TEMPLATE_DISK, KERNEL, TEMPLATE_MANIFEST, "manifest.json"].contains(&name) =>
        {
            Ok(name.to_owned())
        }
        _ => Err(NodeError::Unmovable {
            id: t.key.clone(),
            why: format!(
                "its file {} is not one of its dir {}",
                p.display(),
                t.dir.display()
            ),
        }),
    }
}

/// Points qcow2 image `image` at `base` (a template's raw disk). `safe`: first copies into the
/// image every cluster where its current chain reads differently from `base` (what flattens a
/// chain); else only the header changes (the chain was `base`'s content already).
async fn rebase(image: &Path, base: &Path, safe: bool) -> Result<(), NodeError> {
    // Safe: the layers below may be open in running VMs, and they are only read here (`-U`).
    let mode = if safe { "-U" } else { "-u" };
    let flags = ["rebase", "-q", "-f", "qcow2", "-F", "raw", mode, "-b"];
    qemu_img(
        image,
        flags
            .iter()
            .map(OsStr::new)
            .chain([base.as_os_str(), image.as_os_str()]),
    )
    .await
}
