//! Volumes: persistent directories on the host that outlive sandboxes, mounted into guests and
//! reachable through the volume content API (`docs/volumes.md`).
//!
//! - [`Volumes`]: the registry of one server's volumes under `<data>/volumes/<id>/`, shared by
//!   the API (content calls) and the node (guest mounts) so both see one usage count per volume.
//! - [`Root`]: one volume. Every path a caller or a guest names is resolved beneath the volume's
//!   directory by `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` or `*at` calls on a parent
//!   opened that way, so no `..`, absolute symlink or `/proc` link reaches outside it; sizes and
//!   entry counts are capped per volume ([`Limits`]).
//! - [`wire`]: the frames a guest's FUSE filesystem and the host exchange over one agent stream;
//!   [`serve`]: the host's side of that stream.
//!
//! Everything in [`Root`] is synchronous (plain syscalls); async callers use the blocking pool.

mod path;
mod root;
pub mod serve;
pub mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use path::{MAX_COMPONENT, MAX_PATH, components};
pub use root::{Attr, Entry, Kind, Owner, Root, SetAttr, StatFs};

/// Per-volume caps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total logical size of the volume's regular files.
    pub max_bytes: u64,
    /// Files, directories and links together.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 10 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// A volume to mount in a sandbox: which one, and where in the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountSpec {
    pub volume_id: String,
    pub name: String,
    /// Absolute, normalized path inside the guest.
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VolError {
    #[error("invalid path {0:?}: {1}")]
    InvalidPath(String, &'static str),
    #[error("{0} does not exist in the volume")]
    NotFound(String),
    #[error("{0} already exists in the volume")]
    Exists(String),
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("{0} is a directory")]
    IsADirectory(String),
    #[error("directory {0} is not empty")]
    NotEmpty(String),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("the volume is full: its limit is {limit} bytes; remove files or use another volume")]
    Full { limit: u64 },
    #[error(
        "the team's storage quota is used up (paused sandboxes, snapshots and volumes); nothing \
         may grow this volume until the team frees storage or the operator raises its limit"
    )]
    TeamQuota,
    #[error(
        "the volume holds its maximum of {max} files and directories; remove some or use another volume"
    )]
    TooManyEntries { max: u64 },
    #[error("more than {max} entries; list a subdirectory or a smaller depth")]
    TooMany { max: usize },
    #[error("no volume with id {0}")]
    NoVolume(String),
    #[error("volume filesystem operation failed")]
    Io(#[source] std::io::Error),
}

impl VolError {
    /// The errno a guest's FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            VolError::InvalidPath(..) => rustix::io::Errno::INVAL.raw_os_error(),
            VolError::NotFound(_) | VolError::NoVolume(_) => {
                rustix::io::Errno::NOENT.raw_os_error()
            }
            VolError::Exists(_) => rustix::io::Errno::EXIST.raw_os_error(),
            VolError::NotADirectory(_) => rustix::io::Errno::NOTDIR.raw_os_error(),
            VolError::IsADirectory(_) => rustix::io::Errno::ISDIR.raw_os_error(),
            VolError::NotEmpty(_) => rustix::io::Errno::NOTEMPTY.raw_os_error(),
            VolError::NotAFile(_) => rustix::io::Errno::INVAL.raw_os_error(),
            VolError::Full { .. } | VolError::TooManyEntries { .. } => {
                rustix::io::Errno::NOSPC.raw_os_error()
            }
            VolError::TeamQuota => rustix::io::Errno::DQUOT.raw_os_error(),
            VolError::TooMany { .. } => rustix::io::Errno::NOMEM.raw_os_error(),
            VolError::Io(e) => e.raw_os_error().unwrap_or(libc_eio()),
        }
    }

    /// Maps an errno from a syscall on `path` to the error a caller can act on.
    pub(crate) fn from_errno(e: rustix::io::Errno, path: &str) -> VolError {
        use rustix::io::Errno;
        match e {
            Errno::NOENT => VolError::NotFound(path.to_owned()),
            Errno::EXIST => VolError::Exists(path.to_owned()),
            Errno::NOTDIR => VolError::NotADirectory(path.to_owned()),
            Errno::ISDIR => VolError::IsADirectory(path.to_owned()),
            Errno::NOTEMPTY => VolError::NotEmpty(path.to_owned()),
            // RESOLVE_BENEATH refuses a path that would leave the volume with EXDEV; a
            // symlink loop or a magic link gives ELOOP.
            Errno::XDEV | Errno::LOOP => {
                VolError::InvalidPath(path.to_owned(), "it leads outside the volume")
            }
            other => VolError::Io(other.into()),
        }
    }
}

fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}

/// The volumes of one server: directories under one root, each opened once per process and
/// kept open until destroyed (its usage is counted once, at the first open, then kept up to
/// date by every operation; metering reads it every tick).
#[derive(Debug)]
pub struct Volumes {
    root: PathBuf,
    limits: Limits,
    open: Mutex<HashMap<String, Arc<Root>>>,
}

impl Volumes {
    pub fn new(root: PathBuf, limits: Limits) -> Arc<Volumes> {
        Arc::new(Volumes {
            root,
            limits,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The directory holding volume `id`'s files.
    pub fn dir(&self, volume_id: &str) -> PathBuf {
        self.root.join(volume_id)
    }

    fn check_id(volume_id: &str) -> Result<(), VolError> {
        let ok = !volume_id.is_empty()
            && volume_id.len() <= 64
            && volume_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(VolError::NoVolume(volume_id.to_owned()))
        }
    }

    /// Makes volume `id`'s empty directory. The volumes' parent directory is owner-only; a
    /// volume's own root belongs to the templates' default user (when the server may give it
    /// away), which is who it belongs to in a guest.
    pub fn create(&self, volume_id: &str) -> Result<(), VolError> {
        use std::os::unix::fs::DirBuilderExt;
        Self::check_id(volume_id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(VolError::Io)?;
        let dir = self.dir(volume_id);
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(VolError::Io(e)),
        }
        if rustix::process::geteuid().is_root() {
            rustix::fs::chown(
                &dir,
                Some(rustix::fs::Uid::from_raw(root::DEFAULT_UID)),
                Some(rustix::fs::Gid::from_raw(root::DEFAULT_GID)),
            )
            .map_err(|e| VolError::Io(e.into()))?;
        }
        Ok(())
    }

    /// Opens volume `id` (once per process: every caller shares one [`Root`], its usage and
    /// whether its team's quota lets it grow).
    pub fn open(&self, volume_id: &str) -> Result<Arc<Root>, VolError> {
        Self::check_id(volume_id)?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(root) = open.get(volume_id) {
            return Ok(root.clone());
        }
        let root = Arc::new(Root::open(&self.dir(volume_id), self.limits).map_err(
            |e| match e {
                VolError::NotFound(_) => VolError::NoVolume(volume_id.to_owned()),
                e => e,
            },
        )?);
        open.insert(volume_id.to_owned(), root.clone());
        Ok(root)
    }

    /// Removes volume `id` and everything in it. Missing is fine.
    pub fn destroy(&self, volume_id: &str) -> Result<(), VolError> {
        Self::check_id(volume_id)?;
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume_id);
        match std::fs::remove_dir_all(self.dir(volume_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolError::Io(e)),
        }
    }
}
