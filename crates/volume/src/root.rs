//! One volume: every operation resolves its path beneath the volume's directory.
//!
//! Parents are opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` and the last name
//! is acted on with `*at` calls that do not follow it, so neither `..`, an absolute or escaping
//! symlink, nor a `/proc` magic link can reach outside the volume, whatever the guest or the
//! caller put in it. Files are opened for I/O the same way, non-blocking (a FIFO never hangs the
//! host) and must be regular files.
//!
//! Usage: the logical size of regular files and the number of entries, counted once when the
//! volume is opened and kept up to date by every operation here (an estimate under concurrent
//! writers to one file, corrected by the size after each write).

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, ResolveFlags, Stat, Timespec, Timestamps,
    Uid,
};
use rustix::io::Errno;

use crate::path::{components, display};
use crate::{Limits, VolError};

/// Files and directories made without an owner belong to the templates' default user.
pub const DEFAULT_UID: u32 = 1000;
pub const DEFAULT_GID: u32 = 1000;
/// Mode bits a volume keeps: permissions and sticky; never set-user-ID or set-group-ID.
const MODE_MASK: u32 = 0o1777;
/// Directories deeper than this are not walked (usage count, recursive removal).
const MAX_DEPTH: usize = 512;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Directory,
    Symlink,
    Unknown,
}

/// What a guest's FUSE filesystem needs of an entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attr {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (`MODE_MASK`), no file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
}

/// An entry as the volume content API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// `/a/b`, from the volume's root.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// A symlink's target.
    pub target: Option<String>,
}

/// The owner of something new; `None` is [`DEFAULT_UID`] / [`DEFAULT_GID`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A FUSE `setattr`: each field set is changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// `(seconds, nanoseconds)`; `Some((0, u32::MAX))` means now.
    pub atime: Option<(i64, u32)>,
    pub mtime: Option<(i64, u32)>,
}

/// Space as the guest's `df` shows it: the volume's limits, or less if the host is fuller.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
}

#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    limits: Limits,
    used_bytes: AtomicU64,
    entries: AtomicU64,
    /// Set while the volume's team is over its storage quota: nothing may grow the volume
    /// (shrinking, reading and renaming still work).
    frozen: AtomicBool,
    /// Only root may give files away; otherwise new entries keep the server's owner.
    can_chown: bool,
}

fn err(path: &str) -> impl Fn(Errno) -> VolError + '_ {
    move |e| VolError::from_errno(e, path)
}

fn ts(s: i64, ns: u64) -> (i64, u32) {
    (s, ns.min(999_999_999) as u32)
}

impl Attr {
    fn from_stat(st: &Stat) -> Attr {
        let kind = match FileType::from_raw_mode(st.st_mode as _) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Directory,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Unknown,
        };
        #[allow(clippy::unnecessary_cast)] // field widths differ between architectures
        Attr {
            kind,
            size: st.st_size.max(0) as u64,
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink as u32,
            blocks: st.st_blocks as u64,
            atime: ts(st.st_atime as i64, st.st_atime_nsec as u64),
            mtime: ts(st.st_mtime as i64, st.st_mtime_nsec as u64),
            ctime: ts(st.st_ctime as i64, st.st_ctime_nsec as u64),
        }
    }
}

fn system_time((s, ns): (i64, u32)) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(ns.into())
    }
}

impl Entry {
    fn new(names: &[&str], attr: Attr, target: Option<String>) -> Entry {
        Entry {
            name: names.last().copied().unwrap_or("").to_owned(),
            kind: attr.kind,
            path: display(names),
            size: attr.size,
            mode: attr.mode,
            uid: attr.uid,
            gid: attr.gid,
            atime: system_time(attr.atime),
            mtime: system_time(attr.mtime),
            ctime: system_time(attr.ctime),
            target,
        }
    }
}

/// A parent directory and the name in it an operation acts on.
struct At<'a> {
    parent: OwnedFd,
    name: &'a str,
    shown: String,
}

impl Root {
    /// Opens the volume at `dir` and counts what it holds.
    pub fn open(dir: &Path, limits: Limits) -> Result<Root, VolError> {
        let shown = dir.display().to_string();
        let fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| VolError::from_errno(e, &shown))?;
        let root = Root {
            dir: fd,
            limits,
            used_bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
            can_chown: rustix::process::geteuid().is_root(),
        };
        let top = root.open_dir_fd(&[], "/")?;
        let (bytes, entries) = count(top, 0);
        root.used_bytes.store(bytes, Ordering::Relaxed);
        root.entries.store(entries, Ordering::Relaxed);
        Ok(root)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The logical size of the volume's regular files.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    /// Stops (`true`) or lets again (`false`) anything grow the volume's bytes: the server's
    /// storage quota, applied to every writer of the volume (guests and the content API).
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }

    pub fn frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    /// Files, directories and links in the volume.
    pub fn used_entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    fn open_dir_fd(&self, names: &[&str], shown: &str) -> Result<OwnedFd, VolError> {
        let joined = if names.is_empty() {
            ".".to_owned()
        } else {
            names.join("/")
        };
        rustix::fs::openat2(
            self.dir.as_fd(),
            joined.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(err(shown))
    }

    fn at<'a>(&self, path: &'a str) -> Result<At<'a>, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let Some((&name, parents)) = names.split_last() else {
            return Err(VolError::InvalidPath(
                path.to_owned(),
                "the volume's root itself cannot be changed this way",
            ));
        };
        let parent = self.open_dir_fd(parents, &shown)?;
        Ok(At {
            parent,
            name,
            shown,
        })
    }

    fn lstat_at(at: &At<'_>) -> Result<Attr, VolError> {
        rustix::fs::statat(&at.parent, at.name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| Attr::from_stat(&st))
            .map_err(err(&at.shown))
    }

    /// Opens a regular file beneath the root for I/O (never blocks on a FIFO, never follows a
    /// link out of the volume).
    fn open_file(&self, names: &[&str], shown: &str, flags: OFlags) -> Result<OwnedFd, VolError> {
        if names.is_empty() {
            return Err(VolError::IsADirectory(shown.to_owned()));
        }
        let fd = rustix::fs::openat2(
            self.dir.as_fd(),
            names.join("/").as_str(),
            flags | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(err(shown))?;
        let st = rustix::fs::fstat(&fd).map_err(err(shown))?;
        match FileType::from_raw_mode(st.st_mode as _) {
            FileType::RegularFile => Ok(fd),
            FileType::Directory => Err(VolError::IsADirectory(shown.to_owned())),
            _ => Err(VolError::NotAFile(shown.to_owned())),
        }
    }

    fn grow_bytes(&self, delta: i64) -> Result<(), VolError> {
        if delta <= 0 {
            self.shrink_bytes(delta.unsigned_abs());
            return Ok(());
        }
        if self.frozen() {
            return Err(VolError::TeamQuota);
        }
        let delta = delta as u64;
        let before = self.used_bytes.fetch_add(delta, Ordering::Relaxed);
        if before.saturating_add(delta) > self.limits.max_bytes {
            self.used_bytes.fetch_sub(delta, Ordering::Relaxed);
            return Err(VolError::Full {
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    fn shrink_bytes(&self, n: u64) {
        let _ = self
            .used_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    fn add_entry(&self) -> Result<(), VolError> {
        let before = self.entries.fetch_add(1, Ordering::Relaxed);
        if before >= self.limits.max_entries {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            return Err(VolError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn drop_entry(&self) {
        let _ = self
            .entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// What removing `attr` frees.
    fn forget(&self, attr: &Attr) {
        if attr.kind == Kind::File && attr.nlink <= 1 {
            self.shrink_bytes(attr.size);
        }
        self.drop_entry();
    }

    fn chown_at(&self, at: &At<'_>, owner: Owner) -> Result<(), VolError> {
        if !self.can_chown {
            return Ok(());
        }
        rustix::fs::chownat(
            &at.parent,
            at.name,
            Some(Uid::from_raw(owner.uid.unwrap_or(DEFAULT_UID))),
            Some(Gid::from_raw(owner.gid.unwrap_or(DEFAULT_GID))),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(err(&at.shown))
    }

    // ---- what a guest's FUSE filesystem calls -------------------------------------------

    /// `lstat` of a path (the root included).
    pub fn lstat(&self, path: &str) -> Result<Attr, VolError> {
        let names = components(path)?;
        if names.is_empty() {
            let st = rustix::fs::fstat(&self.dir).map_err(err("/"))?;
            return Ok(Attr::from_stat(&st));
        }
        Self::lstat_at(&self.at(path)?)
    }

    /// A directory's entries (not `.` or `..`) with their attributes, at most `max`.
    pub fn readdir(&self, path: &str, max: usize) -> Result<Vec<(String, Attr)>, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let fd = self.open_dir_fd(&names, &shown)?;
        read_dir(&fd, &shown, max)
    }

    pub fn read(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let fd = self.open_file(&names, &shown, OFlags::RDONLY)?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match rustix::io::pread(&fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(VolError::from_errno(e, &shown)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Writes `data` at `offset`; the volume's size limit applies to what the file grows by.
    pub fn write(&self, path: &str, offset: u64, data: &[u8]) -> Result<usize, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let fd = self.open_file(&names, &shown, OFlags::WRONLY)?;
        let old = rustix::fs::fstat(&fd).map_err(err(&shown))?.st_size.max(0) as u64;
        let end = offset.saturating_add(data.len() as u64);
        let predicted = end.saturating_sub(old);
        self.grow_bytes(predicted as i64)?;
        let mut done = 0;
        let result = loop {
            if done == data.len() {
                break Ok(done);
            }
            match rustix::io::pwrite(&fd, &data[done..], offset + done as u64) {
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(e) => break Err(VolError::from_errno(e, &shown)),
            }
        };
        // Correct the estimate by what the file really grew by.
        let now = rustix::fs::fstat(&fd)
            .map(|st| st.st_size.max(0) as u64)
            .unwrap_or(old + predicted);
        let actual = now.saturating_sub(old);
        if actual < predicted {
            self.shrink_bytes(predicted - actual);
        } else if actual > predicted {
            // Already written: counted whatever the limits say.
            self.used_bytes
                .fetch_add(actual - predicted, Ordering::Relaxed);
        }
        result
    }

    /// Creates a regular file (`exclusive`: fail if it exists) and returns its attributes.
    pub fn create(
        &self,
        path: &str,
        mode: u32,
        owner: Owner,
        exclusive: bool,
    ) -> Result<Attr, VolError> {
        let at = self.at(path)?;
        let existing = Self::lstat_at(&at);
        match existing {
            Ok(_) if exclusive => return Err(VolError::Exists(at.shown)),
            Ok(attr) if attr.kind == Kind::File => return Ok(attr),
            Ok(attr) if attr.kind == Kind::Directory => {
                return Err(VolError::IsADirectory(at.shown));
            }
            Ok(_) => return Err(VolError::NotAFile(at.shown)),
            Err(VolError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.add_entry()?;
        let mode = Mode::from_raw_mode((mode & MODE_MASK & !0o6000) as _);
        let made = rustix::fs::openat(
            &at.parent,
            at.name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        );
        let fd = match made {
            Ok(fd) => fd,
            Err(e) => {
                self.drop_entry();
                return Err(VolError::from_errno(e, &at.shown));
            }
        };
        // The mode asked for, not the server's umask's cut of it.
        rustix::fs::fchmod(&fd, mode).map_err(err(&at.shown))?;
        self.chown_at(&at, owner)?;
        Self::lstat_at(&at)
    }

    pub fn mkdir(&self, path: &str, mode: u32, owner: Owner) -> Result<Attr, VolError> {
        let at = self.at(path)?;
        self.add_entry()?;
        let mode = Mode::from_raw_mode((mode & MODE_MASK & !0o6000) as _);
        if let Err(e) = rustix::fs::mkdirat(&at.parent, at.name, mode) {
            self.drop_entry();
            return Err(VolError::from_errno(e, &at.shown));
        }
        let fd = rustix::fs::openat(
            &at.parent,
            at.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(&at.shown))?;
        rustix::fs::fchmod(&fd, mode).map_err(err(&at.shown))?;
        self.chown_at(&at, owner)?;
        Self::lstat_at(&at)
    }

    pub fn symlink(&self, path: &str, target: &str, owner: Owner) -> Result<Attr, VolError> {
        if target.is_empty() || target.len() > crate::MAX_PATH || target.contains('\0') {
            return Err(VolError::InvalidPath(
                target.to_owned(),
                "a link target must be 1 to 4096 bytes without NUL",
            ));
        }
        let at = self.at(path)?;
        self.add_entry()?;
        if let Err(e) = rustix::fs::symlinkat(target, &at.parent, at.name) {
            self.drop_entry();
            return Err(VolError::from_errno(e, &at.shown));
        }
        self.chown_at(&at, owner)?;
        Self::lstat_at(&at)
    }

    pub fn readlink(&self, path: &str) -> Result<String, VolError> {
        let at = self.at(path)?;
        let target =
            rustix::fs::readlinkat(&at.parent, at.name, Vec::new()).map_err(err(&at.shown))?;
        Ok(String::from_utf8_lossy(target.as_bytes()).into_owned())
    }

    pub fn unlink(&self, path: &str) -> Result<(), VolError> {
        let at = self.at(path)?;
        let attr = Self::lstat_at(&at)?;
        if attr.kind == Kind::Directory {
            return Err(VolError::IsADirectory(at.shown));
        }
        rustix::fs::unlinkat(&at.parent, at.name, AtFlags::empty()).map_err(err(&at.shown))?;
        self.forget(&attr);
        Ok(())
    }

    pub fn rmdir(&self, path: &str) -> Result<(), VolError> {
        let at = self.at(path)?;
        rustix::fs::unlinkat(&at.parent, at.name, AtFlags::REMOVEDIR).map_err(err(&at.shown))?;
        self.drop_entry();
        Ok(())
    }

    /// `renameat2`; `flags` are Linux's `RENAME_NOREPLACE` (1) and `RENAME_EXCHANGE` (2).
    pub fn rename(&self, from: &str, to: &str, flags: u32) -> Result<(), VolError> {
        let src = self.at(from)?;
        let dst = self.at(to)?;
        let flags = RenameFlags::from_bits(flags).ok_or(VolError::InvalidPath(
            to.to_owned(),
            "unsupported rename flags",
        ))?;
        let replaced = if flags.is_empty() {
            Self::lstat_at(&dst).ok()
        } else {
            None
        };
        rustix::fs::renameat_with(&src.parent, src.name, &dst.parent, dst.name, flags)
            .map_err(err(&src.shown))?;
        if let Some(attr) = replaced {
            self.forget(&attr);
        }
        Ok(())
    }

    pub fn setattr(&self, path: &str, set: &SetAttr) -> Result<Attr, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        if names.is_empty() {
            // The root's owner and mode are the server's to set.
            return self.lstat(path);
        }
        let at = self.at(path)?;
        let attr = Self::lstat_at(&at)?;
        if attr.kind == Kind::Symlink {
            if (set.uid.is_some() || set.gid.is_some()) && self.can_chown {
                rustix::fs::chownat(
                    &at.parent,
                    at.name,
                    set.uid.map(Uid::from_raw),
                    set.gid.map(Gid::from_raw),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(err(&shown))?;
            }
            return Self::lstat_at(&at);
        }
        // A regular file or a directory: act on an fd of it, opened without following.
        let fd = rustix::fs::openat(
            &at.parent,
            at.name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(&shown))?;
        if let Some(size) = set.size {
            if attr.kind != Kind::File {
                return Err(VolError::NotAFile(shown));
            }
            let wfd = self.open_file(&names, &shown, OFlags::WRONLY)?;
            self.grow_bytes(size as i64 - attr.size as i64)?;
            if let Err(e) = rustix::fs::ftruncate(&wfd, size) {
                self.grow_bytes(attr.size as i64 - size as i64)?;
                return Err(VolError::from_errno(e, &shown));
            }
        }
        if let Some(mode) = set.mode {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode((mode & MODE_MASK & !0o6000) as _))
                .map_err(err(&shown))?;
        }
        if (set.uid.is_some() || set.gid.is_some()) && self.can_chown {
            rustix::fs::fchown(&fd, set.uid.map(Uid::from_raw), set.gid.map(Gid::from_raw))
                .map_err(err(&shown))?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let spec = |t: Option<(i64, u32)>| match t {
                None => Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                Some((0, u32::MAX)) => Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_NOW,
                },
                Some((s, ns)) => Timespec {
                    tv_sec: s,
                    tv_nsec: ns.min(999_999_999).into(),
                },
            };
            rustix::fs::futimens(
                &fd,
                &Timestamps {
                    last_access: spec(set.atime),
                    last_modification: spec(set.mtime),
                },
            )
            .map_err(err(&shown))?;
        }
        Self::lstat_at(&at)
    }

    pub fn fsync(&self, path: &str) -> Result<(), VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let fd = self.open_file(&names, &shown, OFlags::RDONLY)?;
        rustix::fs::fsync(&fd).map_err(err(&shown))
    }

    pub fn statfs(&self) -> Result<StatFs, VolError> {
        const BLOCK: u64 = 4096;
        let host = rustix::fs::fstatvfs(&self.dir).map_err(err("/"))?;
        let host_free = host.f_bavail.saturating_mul(host.f_frsize) / BLOCK;
        let blocks = self.limits.max_bytes / BLOCK;
        let free = blocks
            .saturating_sub(self.used_bytes().div_ceil(BLOCK))
            .min(host_free);
        let files = self.limits.max_entries;
        Ok(StatFs {
            block_size: BLOCK as u32,
            blocks,
            blocks_free: free,
            files,
            files_free: files.saturating_sub(self.used_entries()),
        })
    }

    // ---- what the volume content API calls ----------------------------------------------

    /// An entry (not followed if it is a link).
    pub fn stat(&self, path: &str) -> Result<Entry, VolError> {
        let names = components(path)?;
        let attr = self.lstat(path)?;
        let target = if attr.kind == Kind::Symlink {
            self.readlink(path).ok()
        } else {
            None
        };
        Ok(Entry::new(&names, attr, target))
    }

    /// What a directory holds, `depth` levels down (1 = its own entries), at most `max`.
    pub fn list(&self, path: &str, depth: u32, max: usize) -> Result<Vec<Entry>, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let attr = self.lstat(path)?;
        if attr.kind != Kind::Directory {
            return Err(VolError::NotADirectory(shown));
        }
        let mut out = Vec::new();
        let mut todo: Vec<(Vec<String>, u32)> =
            vec![(names.iter().map(|s| s.to_string()).collect(), 1)];
        while let Some((dir, level)) = todo.pop() {
            let dir_names: Vec<&str> = dir.iter().map(String::as_str).collect();
            let dir_shown = display(&dir_names);
            let fd = self.open_dir_fd(&dir_names, &dir_shown)?;
            let left = max.saturating_sub(out.len());
            for (name, attr) in read_dir(&fd, &dir_shown, left).map_err(|e| match e {
                VolError::TooMany { .. } => VolError::TooMany { max },
                e => e,
            })? {
                let mut child = dir_names.clone();
                child.push(&name);
                let target = if attr.kind == Kind::Symlink {
                    rustix::fs::readlinkat(&fd, name.as_str(), Vec::new())
                        .ok()
                        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned())
                } else {
                    None
                };
                let is_dir = attr.kind == Kind::Directory;
                out.push(Entry::new(&child, attr, target));
                if is_dir && level < depth {
                    todo.push((child.iter().map(|s| s.to_string()).collect(), level + 1));
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Makes a directory; `parents` also makes missing parents and accepts an existing one.
    pub fn make_dir(
        &self,
        path: &str,
        parents: bool,
        owner: Owner,
        mode: Option<u32>,
    ) -> Result<Entry, VolError> {
        let names = components(path)?;
        if names.is_empty() {
            return Err(VolError::Exists("/".to_owned()));
        }
        let mode = mode.unwrap_or(0o755);
        if parents {
            for i in 1..names.len() {
                let prefix = display(&names[..i]);
                match self.mkdir(&prefix, mode, owner) {
                    Ok(_) => {}
                    Err(VolError::Exists(_)) => match self.lstat(&prefix)? {
                        a if a.kind == Kind::Directory => {}
                        _ => return Err(VolError::NotADirectory(prefix)),
                    },
                    Err(e) => return Err(e),
                }
            }
        }
        match self.mkdir(path, mode, owner) {
            Ok(attr) => Ok(Entry::new(&names, attr, None)),
            Err(VolError::Exists(p)) if parents => match self.lstat(path)? {
                a if a.kind == Kind::Directory => Ok(Entry::new(&names, a, None)),
                _ => Err(VolError::Exists(p)),
            },
            Err(e) => Err(e),
        }
    }

    /// Opens a regular file for reading.
    pub fn open_read(&self, path: &str) -> Result<std::fs::File, VolError> {
        let names = components(path)?;
        let shown = display(&names);
        let fd = self.open_file(&names, &shown, OFlags::RDONLY)?;
        // Reads of the returned file block as files do.
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(err(&shown))?;
        rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(err(&shown))?;
        Ok(std::fs::File::from(fd))
    }

    /// Writes a whole file from `data`: into a hidden file beside it, renamed over the old one
    /// when complete, so a failed or refused upload leaves the old content. `parents` makes
    /// missing parent directories.
    pub fn write_file(
        &self,
        path: &str,
        parents: bool,
        owner: Owner,
        mode: Option<u32>,
        data: &mut dyn Read,
    ) -> Result<Entry, VolError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let names = components(path)?;
        let Some((last, dirs)) = names.split_last() else {
            return Err(VolError::IsADirectory("/".to_owned()));
        };
        if parents && !dirs.is_empty() {
            self.make_dir(&display(dirs), true, owner, None)?;
        } else if !dirs.is_empty() {
            // Errors name the caller's path, not the hidden upload file's.
            match self.lstat(&display(dirs))? {
                a if a.kind == Kind::Directory => {}
                _ => return Err(VolError::NotADirectory(display(dirs))),
            }
        }
        if let Ok(a) = self.lstat(path)
            && a.kind == Kind::Directory
        {
            return Err(VolError::IsADirectory(display(&names)));
        }
        let tmp_name = format!(
            ".alcove-upload.{}.{}.{last}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let tmp_name = if tmp_name.len() > crate::MAX_COMPONENT {
            tmp_name[..crate::MAX_COMPONENT].to_owned()
        } else {
            tmp_name
        };
        let mut tmp_names = dirs.to_vec();
        tmp_names.push(&tmp_name);
        let tmp = display(&tmp_names);
        self.create(&tmp, mode.unwrap_or(0o644), owner, true)?;
        let copied = (|| {
            let mut buf = vec![0u8; 256 << 10];
            let mut offset = 0u64;
            loop {
                let n = match data.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(VolError::Io(e)),
                };
                self.write(&tmp, offset, &buf[..n])?;
                offset += n as u64;
            }
        })();
        if let Err(e) = copied {
            let _ = self.unlink(&tmp);
            return Err(e);
        }
        if let Some(mode) = mode {
            self.setattr(
                &tmp,
                &SetAttr {
                    mode: Some(mode),
                    ..SetAttr::default()
                },
            )?;
        }
        if let Err(e) = self.rename(&tmp, path, 0) {
            let _ = self.unlink(&tmp);
            return Err(e);
        }
        self.stat(path)
    }

    /// Removes a file, a link, or a directory with everything in it.
    pub fn remove(&self, path: &str) -> Result<(), VolError> {
        let at = self.at(path)?;
        let attr = Self::lstat_at(&at)?;
        if attr.kind != Kind::Directory {
            return self.unlink(path);
        }
        let fd = rustix::fs::openat(
            &at.parent,
            at.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err(&at.shown))?;
        self.empty_dir(&fd, &at.shown, 0)?;
        self.rmdir(path)
    }

    fn empty_dir(&self, dir: &OwnedFd, shown: &str, depth: usize) -> Result<(), VolError> {
        if depth > MAX_DEPTH {
            return Err(VolError::InvalidPath(
                shown.to_owned(),
                "directories nest too deep to remove",
            ));
        }
        for (name, attr) in read_dir(dir, shown, usize::MAX)? {
            let child_shown = format!("{}/{name}", shown.trim_end_matches('/'));
            if attr.kind == Kind::Directory {
                let fd = rustix::fs::openat(
                    dir,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(err(&child_shown))?;
                self.empty_dir(&fd, &child_shown, depth + 1)?;
                rustix::fs::unlinkat(dir, name.as_str(), AtFlags::REMOVEDIR)
                    .map_err(err(&child_shown))?;
                self.drop_entry();
            } else {
                rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty())
                    .map_err(err(&child_shown))?;
                self.forget(&attr);
            }
        }
        Ok(())
    }

    /// Changes owner and mode bits.
    pub fn set_meta(
        &self,
        path: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> Result<Entry, VolError> {
        self.setattr(
            path,
            &SetAttr {
                mode,
                uid,
                gid,
                ..SetAttr::default()
            },
        )?;
        self.stat(path)
    }
}

/// A directory's entries with their attributes (not following links), at most `max`.
fn read_dir(fd: &OwnedFd, shown: &str, max: usize) -> Result<Vec<(String, Attr)>, VolError> {
    let dir = rustix::fs::Dir::read_from(fd).map_err(err(shown))?;
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(err(shown))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if out.len() >= max {
            return Err(VolError::TooMany { max });
        }
        let name_os = OsStr::from_bytes(name);
        match rustix::fs::statat(fd, name_os, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => out.push((
                String::from_utf8_lossy(name).into_owned(),
                Attr::from_stat(&st),
            )),
            // Removed since it was listed.
            Err(Errno::NOENT) => {}
            Err(e) => return Err(VolError::from_errno(e, shown)),
        }
    }
    Ok(out)
}

/// Bytes of regular files and entries beneath a directory (not counting itself).
fn count(dir: OwnedFd, depth: usize) -> (u64, u64) {
    let Ok(entries) = read_dir(&dir, "/", usize::MAX) else {
        return (0, 0);
    };
    let mut bytes = 0;
    let mut n = 0;
    for (name, attr) in entries {
        n += 1;
        match attr.kind {
            Kind::File => bytes += attr.size,
            Kind::Directory if depth < MAX_DEPTH => {
                if let Ok(fd) = rustix::fs::openat(
                    &dir,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    let (b, e) = count(fd, depth + 1);
                    bytes += b;
                    n += e;
                }
            }
            _ => {}
        }
    }
    (bytes, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(limits: Limits) -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path(), limits).unwrap();
        (dir, root)
    }

    #[test]
    fn files_dirs_links_and_listing() {
        let (_d, v) = vol(Limits::default());
        v.make_dir("/a/b", true, Owner::default(), None).unwrap();
        let e = v
            .write_file(
                "/a/b/f.txt",
                false,
                Owner::default(),
                Some(0o600),
                &mut &b"hello"[..],
            )
            .unwrap();
        assert_eq!(
            (e.kind, e.size, e.mode, e.path.as_str()),
            (Kind::File, 5, 0o600, "/a/b/f.txt")
        );
        assert_eq!(v.read("a/b/f.txt", 1, 3).unwrap(), b"ell");
        assert_eq!(v.used_bytes(), 5);
        v.symlink("/a/l", "b/f.txt", Owner::default()).unwrap();
        assert_eq!(v.stat("/a/l").unwrap().target.as_deref(), Some("b/f.txt"));
        let all: Vec<String> = v
            .list("/", 3, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(all, ["/a", "/a/b", "/a/b/f.txt", "/a/l"]);
        let top: Vec<String> = v
            .list("/", 1, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(top, ["/a"]);
        assert!(matches!(v.list("/", 3, 2), Err(VolError::TooMany { .. })));
        v.rename("/a/b/f.txt", "/a/g.txt", 0).unwrap();
        assert!(matches!(v.stat("/a/b/f.txt"), Err(VolError::NotFound(_))));
        v.remove("/a").unwrap();
        assert_eq!((v.used_bytes(), v.used_entries()), (0, 0));
    }

    #[test]
    fn nothing_leaves_the_volume() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let (d, v) = vol(Limits::default());
        std::os::unix::fs::symlink(outside.path(), d.path().join("out")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", d.path().join("up")).unwrap();
        for p in [
            "out/secret",
            "abs/passwd",
            "up/etc/passwd",
            "../x",
            "/../../etc/passwd",
        ] {
            assert!(v.read(p, 0, 10).is_err(), "{p} was read");
            assert!(v.write(p, 0, b"y").is_err(), "{p} was written");
            assert!(
                v.create(&format!("{p}2"), 0o644, Owner::default(), true)
                    .is_err()
            );
        }
        assert!(v.readdir("out", 10).is_err());
        // The links themselves are ordinary entries and can go.
        v.remove("out").unwrap();
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"x");
        // Set-id bits are dropped; the server's umask does not cut modes.
        let old = rustix::process::umask(Mode::from_raw_mode(0o077));
        v.create("f", 0o6755, Owner::default(), true).unwrap();
        v.mkdir("dm", 0o755, Owner::default()).unwrap();
        rustix::process::umask(old);
        assert_eq!(v.lstat("f").unwrap().mode, 0o755);
        assert_eq!(v.lstat("dm").unwrap().mode, 0o755);
        // A FIFO never blocks the host.
        rustix::fs::mknodat(
            &v.dir,
            "fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(matches!(v.read("fifo", 0, 1), Err(VolError::NotAFile(_))));
    }

    #[test]
    fn limits_refuse_and_uploads_keep_old_content() {
        let (_d, v) = vol(Limits {
            max_bytes: 10,
            max_entries: 3,
        });
        v.write_file("f", false, Owner::default(), None, &mut &b"12345"[..])
            .unwrap();
        let big = [0u8; 20];
        assert!(matches!(
            v.write_file("f", false, Owner::default(), None, &mut &big[..]),
            Err(VolError::Full { limit: 10 })
        ));
        assert_eq!(v.read("f", 0, 100).unwrap(), b"12345");
        assert_eq!(v.used_bytes(), 5);
        assert!(matches!(
            v.write("f", 8, b"abc"),
            Err(VolError::Full { .. })
        ));
        v.write("f", 5, b"abcde").unwrap();
        assert_eq!(v.used_bytes(), 10);
        v.setattr(
            "f",
            &SetAttr {
                size: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(v.used_bytes(), 2);
        v.mkdir("d1", 0o755, Owner::default()).unwrap();
        v.mkdir("d2", 0o755, Owner::default()).unwrap();
        assert!(matches!(
            v.mkdir("d3", 0o755, Owner::default()),
            Err(VolError::TooManyEntries { max: 3 })
        ));
        let fs = v.statfs().unwrap();
        assert_eq!(fs.files_free, 0);
    }

    #[test]
    fn a_frozen_volume_shrinks_but_never_grows() {
        let (_d, v) = vol(Limits::default());
        v.write_file("f", false, Owner::default(), None, &mut &b"12345"[..])
            .unwrap();
        v.set_frozen(true);
        assert!(matches!(v.write("f", 5, b"x"), Err(VolError::TeamQuota)));
        assert_eq!(VolError::TeamQuota.errno(), Errno::DQUOT.raw_os_error());
        assert!(matches!(
            v.write_file("g", false, Owner::default(), None, &mut &b"1"[..]),
            Err(VolError::TeamQuota)
        ));
        assert!(v.lstat("g").is_err(), "a refused upload leaves nothing");
        // Overwriting within the file's size, truncating and removing still work.
        v.write("f", 0, b"ab").unwrap();
        v.setattr(
            "f",
            &SetAttr {
                size: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(v.used_bytes(), 1);
        v.set_frozen(false);
        v.write("f", 1, b"cd").unwrap();
        assert_eq!(v.used_bytes(), 3);
    }
}
