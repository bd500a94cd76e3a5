//! Unpacking OCI image layers into a root file system on the host. The layers are hostile: every
//! entry's path is checked before anything is written, and nothing here ever follows a link that
//! came from the image.
//!
//! Invariants, for every write under `root`:
//! * an entry's path is made of normal components only (a leading `/` or `./` is dropped, `..`
//!   rejects the image), so it names a place inside `root`;
//! * every parent component already on disk is a real directory (checked with `lstat`; a symlink
//!   or a file there rejects the image), missing ones are created as directories: so no write goes
//!   through a symlink the image planted;
//! * hard links point at a path checked the same way that exists and is not a directory;
//! * device nodes, fifos and sockets are skipped (logged): a guest gets its `/dev` from the kernel;
//! * total file bytes and entry count are capped ([`Limits`]).
//!
//! The unpacker is the only writer of `root` while it runs, so checking then writing a path is
//! not racy. OCI whiteouts: `.wh.<name>` deletes `<name>` from the layers below, `.wh..wh..opq`
//! empties its directory of what the layers below put there.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Caps on what one image may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sum of regular files' sizes over all layers.
    pub max_bytes: u64,
    /// Tar entries over all layers.
    pub max_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(
        "layer {layer}: entry `{path}` leaves the root file system ({why}); the image is malformed or hostile and was not used"
    )]
    Escape {
        layer: usize,
        path: String,
        why: &'static str,
    },
    #[error(
        "the image unpacks to more than {0} bytes of files: use a smaller image or raise the template's disk size"
    )]
    TooBig(u64),
    #[error("the image has more than {0} files: use a smaller image")]
    TooManyEntries(u64),
    #[error(
        "layer {0} is zstd-compressed, which is not supported yet: push the image with gzip or uncompressed layers"
    )]
    Zstd(usize),
    #[error("layer {layer}: reading the tar stream (is the layer corrupt?)")]
    Tar {
        layer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: writing `{path}` on the host")]
    Write {
        layer: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Applies layers, in order, to one root directory.
pub struct Unpacker {
    root: PathBuf,
    limits: Limits,
    bytes: u64,
    entries: u64,
    chown: bool,
    /// Directories' modes, applied once all layers are in (a read-only directory from a lower
    /// layer must not stop an upper one from writing into it when unpacking as non-root).
    dir_modes: Vec<(PathBuf, u32)>,
    /// What was skipped (device nodes, fifos, ...), for the log.
    pub skipped: Vec<String>,
}

const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

impl Unpacker {
    pub fn new(root: &Path, limits: Limits) -> Self {
        Self {
            root: root.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
            chown: nix::unistd::geteuid().is_root(),
            dir_modes: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Unpacks one layer blob: gzip or uncompressed tar (told apart by their magic bytes, as
    /// registries mislabel media types now and then).
    pub fn layer_blob<R: Read>(&mut self, layer: usize, mut blob: R) -> Result<(), UnpackError> {
        let mut magic = [0u8; 4];
        let mut n = 0;
        while n < magic.len() {
            let r = blob
                .read(&mut magic[n..])
                .map_err(|source| UnpackError::Tar { layer, source })?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let head = std::io::Cursor::new(magic[..n].to_vec());
        let stream = head.chain(blob);
        if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            self.layer(layer, flate2::read::MultiGzDecoder::new(stream))
        } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            Err(UnpackError::Zstd(layer))
        } else {
            self.layer(layer, stream)
        }
    }

    /// Unpacks one uncompressed tar stream.
    pub fn layer<R: Read>(&mut self, layer: usize, tar_stream: R) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(tar_stream);
        let tar_err = |source| UnpackError::Tar { layer, source };
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(tar_err)? {
            let mut entry = entry.map_err(tar_err)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries(self.limits.max_entries));
            }
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let rel = clean_path(&raw).map_err(|why| UnpackError::Escape {
                layer,
                path: shown.clone(),
                why,
            })?;
            let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
                continue; // the root itself (`./`): the image does not get to change it
            };
            let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let write_err = |source| UnpackError::Write {
                layer,
                path: shown.clone(),
                source,
            };

            // Whiteouts first: they name something to delete, not something to create.
            if name.as_bytes() == OPAQUE.as_bytes() {
                if let Some(dir) = self.existing_dir(layer, &shown, &parent_rel)? {
                    self.opaque(&dir, &parent_rel, &this_layer)
                        .map_err(write_err)?;
                }
                continue;
            }
            if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT.as_bytes()) {
                if hidden.is_empty() || hidden == b"." || hidden == b".." {
                    continue;
                }
                if let Some(dir) = self.existing_dir(layer, &shown, &parent_rel)? {
                    remove_any(&dir.join(OsStr::from_bytes(hidden))).map_err(write_err)?;
                }
                continue;
            }

            let kind = entry.header().entry_type();
            use tar::EntryType as T;
            if matches!(kind, T::Char | T::Block | T::Fifo) || !is_known(kind) {
                self.skipped
                    .push(format!("layer {layer}: {shown} ({kind:?})"));
                continue;
            }
            let parent = self.make_parents(layer, &shown, &parent_rel, &mut this_layer)?;
            let dest = parent.join(&name);
            this_layer.insert(rel.clone());
            let existing = std::fs::symlink_metadata(&dest).ok();
            let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;

            if kind == T::Directory {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        remove_any(&dest).map_err(write_err)?;
                        std::fs::create_dir(&dest).map_err(write_err)?;
                    }
                    None => std::fs::create_dir(&dest).map_err(write_err)?,
                }
                self.dir_modes.push((dest.clone(), mode));
                self.owner(&entry, &dest).map_err(write_err)?;
                self.xattrs(&mut entry, &dest);
                continue;
            }
            if existing.is_some() {
                remove_any(&dest).map_err(write_err)?;
            }
            match kind {
                T::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    // Created as-is: it is the guest's business where it points, and nothing
                    // here follows it (parents are lstat-checked, files are created O_EXCL).
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                        .map_err(write_err)?;
                    self.owner(&entry, &dest).map_err(write_err)?;
                }
                T::Link => {
                    let target_raw = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let target_rel =
                        clean_path(&target_raw).map_err(|why| UnpackError::Escape {
                            layer,
                            path: shown.clone(),
                            why,
                        })?;
                    let Some(target) = self.existing_file(&target_rel) else {
                        return Err(UnpackError::Escape {
                            layer,
                            path: shown.clone(),
                            why: "a hard link to something that is not a file in the image",
                        });
                    };
                    std::fs::hard_link(&target, &dest).map_err(write_err)?;
                }
                _ => {
                    // Regular (and contiguous, GNU sparse: the tar reader fills the holes).
                    let size = entry.size();
                    self.bytes = self.bytes.saturating_add(size);
                    if self.bytes > self.limits.max_bytes {
                        return Err(UnpackError::TooBig(self.limits.max_bytes));
                    }
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&dest)
                        .map_err(write_err)?;
                    let copied = std::io::copy(&mut (&mut entry).take(size), &mut f)
                        .map_err(|source| UnpackError::Tar { layer, source })?;
                    if copied != size {
                        return Err(UnpackError::Tar {
                            layer,
                            source: std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "file shorter than its header says",
                            ),
                        });
                    }
                    if let Ok(mtime) = entry.header().mtime() {
                        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                        let _ = f.set_modified(t);
                    }
                    drop(f);
                    self.owner(&entry, &dest).map_err(write_err)?;
                    // After chown, which clears setuid/setgid bits.
                    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                        .map_err(write_err)?;
                    self.xattrs(&mut entry, &dest);
                }
            }
        }
        Ok(())
    }

    /// Applies the directories' modes; call once after the last layer.
    pub fn finish(self) -> Vec<String> {
        for (dir, mode) in self.dir_modes.iter().rev() {
            if std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode));
            }
        }
        self.skipped
    }

    /// Bytes of files unpacked so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The host path of `rel`'s directory, creating missing components; every existing component
    /// must be a real directory.
    fn make_parents(
        &self,
        layer: usize,
        shown: &str,
        rel: &Path,
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<PathBuf, UnpackError> {
        let mut cur = self.root.clone();
        let mut cur_rel = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            cur_rel.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) => {
                    return Err(UnpackError::Escape {
                        layer,
                        path: shown.to_string(),
                        why: if m.file_type().is_symlink() {
                            "a parent directory is a symlink"
                        } else {
                            "a parent directory is not a directory"
                        },
                    });
                }
                Err(_) => {
                    std::fs::create_dir(&cur).map_err(|source| UnpackError::Write {
                        layer,
                        path: shown.to_string(),
                        source,
                    })?;
                    this_layer.insert(cur_rel.clone());
                }
            }
        }
        Ok(cur)
    }

    /// The host path of directory `rel` if it exists as a real directory all the way down.
    fn existing_dir(
        &self,
        layer: usize,
        shown: &str,
        rel: &Path,
    ) -> Result<Option<PathBuf>, UnpackError> {
        let mut cur = self.root.clone();
        for c in rel.components() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::Escape {
                        layer,
                        path: shown.to_string(),
                        why: "a whiteout under a symlink",
                    });
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// The host path of `rel` if its parents are real directories and it exists and is not a
    /// directory (a hard link's target).
    fn existing_file(&self, rel: &Path) -> Option<PathBuf> {
        let mut cur = self.root.clone();
        let n = rel.components().count();
        for (i, c) in rel.components().enumerate() {
            cur.push(c);
            let m = std::fs::symlink_metadata(&cur).ok()?;
            if i + 1 < n && !m.is_dir() {
                return None;
            }
            if i + 1 == n && m.is_dir() {
                return None;
            }
        }
        (n > 0).then_some(cur)
    }

    /// Removes what the layers below put in `dir`.
    fn opaque(
        &self,
        dir: &Path,
        dir_rel: &Path,
        this_layer: &HashSet<PathBuf>,
    ) -> std::io::Result<()> {
        for child in std::fs::read_dir(dir)? {
            let child = child?;
            if !this_layer.contains(&dir_rel.join(child.file_name())) {
                remove_any(&child.path())?;
            }
        }
        Ok(())
    }

    fn owner<R: Read>(&self, entry: &tar::Entry<'_, R>, path: &Path) -> std::io::Result<()> {
        if !self.chown {
            return Ok(());
        }
        let h = entry.header();
        let uid = h
            .uid()
            .ok()
            .and_then(|u| u32::try_from(u).ok())
            .unwrap_or(0);
        let gid = h
            .gid()
            .ok()
            .and_then(|g| u32::try_from(g).ok())
            .unwrap_or(0);
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    /// PAX `SCHILY.xattr.*` records: `user.*` and `security.capability` (file capabilities, e.g.
    /// ping's) are kept where the host file system allows; others (`trusted.*`, SELinux labels)
    /// would mean something to the host, not the guest, and are dropped.
    fn xattrs<R: Read>(&self, entry: &mut tar::Entry<'_, R>, path: &Path) {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return;
        };
        for ext in exts.flatten() {
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if !(name.starts_with(b"user.") || name == b"security.capability") {
                continue;
            }
            let _ = set_xattr(path, name, ext.value_bytes());
        }
    }
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: `path` and `name` are NUL-terminated C strings that outlive the call, and `value`
    // is a valid slice whose pointer and length are passed together; lsetxattr does not follow a
    // final symlink and keeps no pointer after returning.
    let r = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn is_known(kind: tar::EntryType) -> bool {
    use tar::EntryType as T;
    matches!(
        kind,
        T::Regular | T::Continuous | T::GNUSparse | T::Directory | T::Symlink | T::Link
    )
}

/// An entry's path as normal components only; a leading `/` or `./` is dropped (tools write
/// both), `..` is refused.
pub fn clean_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.contains(&0) {
        return Err("a NUL byte in the path");
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("a `..` component"),
            Component::Prefix(_) => return Err("a path prefix"),
        }
    }
    Ok(out)
}

/// Removes a file, symlink (not its target) or directory tree (std's `remove_dir_all` does not
/// follow symlinks inside it).
pub(crate) fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar stream built in memory, entry by entry.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }
        fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            // Written raw: `set_path` refuses `..`, and the tests need hostile paths.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h
        }
        fn file(mut self, path: &str, body: &[u8]) -> Self {
            let mut h = Self::header(path, tar::EntryType::Regular, body.len() as u64, 0o644);
            h.set_cksum();
            self.0.append(&h, body).unwrap();
            self
        }
        fn dir(mut self, path: &str, mode: u32) -> Self {
            let mut h = Self::header(path, tar::EntryType::Directory, 0, mode);
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn link(mut self, path: &str, kind: tar::EntryType, target: &str) -> Self {
            let mut h = Self::header(path, kind, 0, 0o777);
            let l = &mut h.as_old_mut().linkname;
            l[..target.len()].copy_from_slice(target.as_bytes());
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn node(mut self, path: &str, kind: tar::EntryType) -> Self {
            let mut h = Self::header(path, kind, 0, 0o666);
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn limits() -> Limits {
        Limits {
            max_bytes: 1 << 20,
            max_entries: 1000,
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn files_dirs_symlinks_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let layer = Tar::new()
            .dir("./etc/", 0o755)
            .file("./etc/hostname", b"box\n")
            .file("/usr/bin/tool", b"#!/bin/sh\n")
            .link("bin", tar::EntryType::Symlink, "/usr/bin")
            .link("etc/link", tar::EntryType::Link, "etc/hostname")
            .dir("secret", 0o700)
            .bytes();
        let mut u = Unpacker::new(&root, limits());
        u.layer_blob(1, &gzip(&layer)[..]).unwrap();
        u.finish();
        assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"box\n");
        assert_eq!(
            std::fs::read(root.join("usr/bin/tool")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert_eq!(
            std::fs::read_link(root.join("bin")).unwrap(),
            Path::new("/usr/bin")
        );
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(root.join("etc/hostname")).unwrap();
        let b = std::fs::metadata(root.join("etc/link")).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
        assert_eq!(
            std::fs::metadata(root.join("secret")).unwrap().mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn whiteouts_and_opaque_dirs_across_layers() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let lower = Tar::new()
            .file("a/keep", b"1")
            .file("a/gone", b"2")
            .file("b/old1", b"3")
            .file("b/sub/old2", b"4")
            .file("c/x", b"5")
            .bytes();
        let upper = Tar::new()
            .file("a/.wh.gone", b"")
            .dir("b", 0o755)
            .file("b/new", b"6")
            .file("b/.wh..wh..opq", b"")
            .file(".wh.c", b"")
            .bytes();
        let mut u = Unpacker::new(root, limits());
        u.layer(1, &lower[..]).unwrap();
        u.layer_blob(2, &upper[..]).unwrap();
        u.finish();
        assert!(root.join("a/keep").exists());
        assert!(!root.join("a/gone").exists());
        assert!(!root.join("a/.wh.gone").exists());
        assert!(root.join("b/new").exists(), "this layer's entry survives");
        assert!(!root.join("b/old1").exists());
        assert!(!root.join("b/sub").exists());
        assert!(!root.join("b/.wh..wh..opq").exists());
        assert!(!root.join("c").exists());
    }

    #[test]
    fn upper_layer_replaces_a_file_with_a_dir_and_back() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mut u = Unpacker::new(root, limits());
        u.layer(1, &Tar::new().file("x", b"f").dir("y", 0o755).bytes()[..])
            .unwrap();
        u.layer(
            2,
            &Tar::new().file("x/inner", b"d").file("y", b"f").bytes()[..],
        )
        .unwrap_err(); // `x` is a file: a parent that is not a directory is refused
        let mut u = Unpacker::new(root, limits());
        u.layer(
            3,
            &Tar::new().dir("x", 0o755).file("y", b"now a file").bytes()[..],
        )
        .unwrap();
        assert!(root.join("x").is_dir());
        assert_eq!(std::fs::read(root.join("y")).unwrap(), b"now a file");
    }

    #[test]
    fn escapes_are_refused_and_write_nothing_outside() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let out = outside.display().to_string();

        let cases: Vec<Vec<u8>> = vec![
            Tar::new().file("../escaped", b"x").bytes(),
            Tar::new().file("a/../../escaped", b"x").bytes(),
            // A symlink to the outside, then a write through it.
            Tar::new()
                .link("evil", tar::EntryType::Symlink, &out)
                .file("evil/escaped", b"x")
                .bytes(),
            // A relative one.
            Tar::new()
                .link("up", tar::EntryType::Symlink, "../outside")
                .file("up/escaped", b"x")
                .bytes(),
            // A hard link to a host file.
            Tar::new()
                .link("h", tar::EntryType::Link, "../outside/target")
                .bytes(),
        ];
        std::fs::write(outside.join("target"), b"host").unwrap();
        for (i, layer) in cases.iter().enumerate() {
            let mut u = Unpacker::new(&root, limits());
            let err = u.layer(i, &layer[..]).unwrap_err();
            assert!(
                matches!(err, UnpackError::Escape { .. }),
                "case {i}: {err:?}"
            );
        }
        let names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("target")]);
        assert!(!t.path().join("escaped").exists());
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"host");

        // A symlink planted by a lower layer is not followed by an upper one either.
        let mut u = Unpacker::new(&root, limits());
        u.layer(
            1,
            &Tar::new()
                .link("etc", tar::EntryType::Symlink, &out)
                .bytes()[..],
        )
        .unwrap();
        let err = u
            .layer(2, &Tar::new().file("etc/passwd", b"x").bytes()[..])
            .unwrap_err();
        assert!(matches!(err, UnpackError::Escape { .. }), "{err:?}");
        assert!(!outside.join("passwd").exists());
    }

    #[test]
    fn device_nodes_and_fifos_are_skipped() {
        let t = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(t.path(), limits());
        u.layer(
            1,
            &Tar::new()
                .node("dev/sda", tar::EntryType::Block)
                .node("dev/null", tar::EntryType::Char)
                .node("fifo", tar::EntryType::Fifo)
                .file("ok", b"1")
                .bytes()[..],
        )
        .unwrap();
        let skipped = u.finish();
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(!t.path().join("dev/sda").exists());
        assert!(!t.path().join("fifo").exists());
        assert!(t.path().join("ok").exists());
    }

    #[test]
    fn caps_on_bytes_and_entries() {
        let t = tempfile::tempdir().unwrap();
        let small = Limits {
            max_bytes: 10,
            max_entries: 3,
        };
        let mut u = Unpacker::new(t.path(), small);
        let err = u
            .layer(1, &Tar::new().file("a", b"0123456789A").bytes()[..])
            .unwrap_err();
        assert!(matches!(err, UnpackError::TooBig(10)), "{err:?}");
        let mut u = Unpacker::new(t.path(), small);
        let err = u
            .layer(
                1,
                &Tar::new()
                    .file("a", b"")
                    .file("b", b"")
                    .file("c", b"")
                    .file("d", b"")
                    .bytes()[..],
            )
            .unwrap_err();
        assert!(matches!(err, UnpackError::TooManyEntries(3)), "{err:?}");
    }

    #[test]
    fn zstd_layers_are_refused_clearly() {
        let t = tempfile::tempdir().unwrap();
        let mut u = Unpacker::new(t.path(), limits());
        let err = u
            .layer_blob(2, &[0x28, 0xb5, 0x2f, 0xfd, 0, 0][..])
            .unwrap_err();
        assert!(err.to_string().contains("zstd"), "{err}");
    }

    #[test]
    fn clean_path_cases() {
        assert_eq!(clean_path(b"./a/b").unwrap(), Path::new("a/b"));
        assert_eq!(clean_path(b"/a//b/").unwrap(), Path::new("a/b"));
        assert!(clean_path(b"a/../b").is_err());
        assert!(clean_path(b"a\0b").is_err());
        assert_eq!(clean_path(b"./").unwrap(), Path::new(""));
    }
}
