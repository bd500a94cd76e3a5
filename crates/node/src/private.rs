//! Owner-only paths: every directory and file the node creates under its data dir is made
//! 0700/0600 by the call that creates it (never created wider and narrowed afterwards), because
//! records hold access tokens and snapshots hold a guest's memory. The one place that decides
//! these modes: a caller that hands a run dir to another uid (the QEMU jail) adapts here.
//!
//! Called by `Node::open` (data dir, `sandboxes/`), creates, the warm pool, pause/snapshot
//! (`snapshots/`), and the record and snapshot-meta writers.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory the node creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the node writes.
pub const FILE_MODE: u32 = 0o600;

/// Whether a mode gives nothing to group or others.
pub fn is_private(mode: u32) -> bool {
    mode & 0o077 == 0
}

/// The mode `mode` narrowed to its owner's bits.
pub fn narrowed(mode: u32) -> u32 {
    mode & !0o077 & 0o7777
}

/// Creates `dir` (0700) and its missing parents (0700 each). An existing `dir` this process
/// owns that is open to group or others is narrowed: a data dir made by an older version.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    narrow_if_owned(dir)
}

/// Creates one directory, 0700; fails if it exists.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(dir)
}

/// Creates (or truncates) a file, 0600 from its creation.
pub fn create_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Writes `bytes` to a new 0600 file at `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = create_file(path)?;
    f.write_all(bytes)?;
    // A file that existed keeps its old mode through `open`: narrow it too.
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
}

fn narrow_if_owned(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.uid() == nix::unistd::geteuid().as_raw() && !is_private(meta.mode()) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(narrowed(meta.mode())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_give_nothing_to_group_or_others() {
        assert!(is_private(DIR_MODE));
        assert!(is_private(FILE_MODE));
        assert!(is_private(0o400));
        assert!(!is_private(0o755));
        assert!(!is_private(0o640));
        assert!(!is_private(0o604));
        assert_eq!(narrowed(0o40755), 0o700);
        assert_eq!(narrowed(0o644), 0o600);
        assert_eq!(narrowed(0o1777), 0o1700);
    }

    #[test]
    fn created_paths_are_private_whatever_the_umask_allows() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(tmp.path().join(d)).unwrap().mode();
            assert!(is_private(mode), "{d}: {mode:o}");
        }
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&open).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o700);
        let f = tmp.path().join("f");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&f, b"new").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
    }
}
