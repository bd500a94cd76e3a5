//! Filesystem work done as the calling user, and envd's `EntryInfo` for a path.
//!
//! [`as_user`] runs a closure on a fresh thread that first takes the user's credentials with
//! raw setgroups/setresgid/setresuid system calls. On Linux those change only the calling
//! thread (glibc's wrappers would change every thread of the agent, which is why they are not
//! used), and the thread ends with the closure. So the kernel applies the user's own
//! permissions to every path (no traversal into places the user cannot reach), and what the
//! closure creates is owned by the user. Work for the agent's own user runs on tokio's blocking
//! pool instead.

pub mod watch;

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use alcove_envd_proto::filesystem::{EntryInfo, FileType};

use crate::users::UserInfo;

/// Extended attributes carrying user metadata live under this prefix (as envd).
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

#[derive(Debug, thiserror::Error)]
pub enum AsUserError {
    #[error("start a worker thread")]
    Spawn(#[source] io::Error),
    #[error("switch to user {user}")]
    Credentials {
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("the worker thread panicked")]
    Panicked,
}

/// Runs `f` with `user`'s credentials (see the module doc).
pub async fn as_user<T, F>(user: &UserInfo, f: F) -> Result<T, AsUserError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if !user.needs_switch() {
        return tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| AsUserError::Panicked);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let groups: Vec<libc::gid_t> = user.groups.iter().map(|g| g.as_raw()).collect();
    let name = user.name.clone();
    std::thread::Builder::new()
        .name("as-user".into())
        .spawn(move || {
            let r = switch_thread_credentials(uid, gid, &groups)
                .map_err(|source| AsUserError::Credentials { user: name, source })
                .map(|()| f());
            let _ = tx.send(r);
        })
        .map_err(AsUserError::Spawn)?;
    rx.await.map_err(|_| AsUserError::Panicked)?
}

fn switch_thread_credentials(uid: u32, gid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: raw system calls with plain integer arguments and a pointer to `groups`, which
    // outlives the call. They change the calling thread's credentials only (the kernel's
    // per-task creds); this thread ends when its closure returns.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Caches uid/gid → name lookups within one request.
#[derive(Debug, Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_else(|| uid.to_string())
            })
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_else(|| gid.to_string())
            })
            .clone()
    }
}

/// envd's EntryInfo for `path` (not following a final symlink, but describing its target's
/// type and mode as envd does).
pub fn entry_info(path: &Path, names: &mut Names) -> io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path)?;
    let is_symlink = meta.file_type().is_symlink();
    let (ty, mode, target) = if is_symlink {
        let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        match std::fs::metadata(path) {
            Ok(t) => (file_type(&t), t.permissions().mode() & 0o777, Some(target)),
            Err(_) => (FileType::Unspecified, 0, Some(target)),
        }
    } else {
        (file_type(&meta), meta.permissions().mode() & 0o777, None)
    };
    let modified = (meta.mtime() != 0 || meta.mtime_nsec() != 0).then(|| pbjson_types::Timestamp {
        seconds: meta.mtime(),
        nanos: meta.mtime_nsec() as i32,
    });
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_owned()),
        r#type: ty as i32,
        path: path.to_string_lossy().into_owned(),
        size: meta.size() as i64,
        mode,
        permissions: permissions_string(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: modified,
        symlink_target: target.map(|t| t.to_string_lossy().into_owned()),
        metadata: read_metadata(path).unwrap_or_default(),
        is_symlink,
    })
}

fn file_type(m: &std::fs::Metadata) -> FileType {
    if m.is_file() {
        FileType::File
    } else if m.is_dir() {
        FileType::Directory
    } else if m.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::Unspecified
    }
}

/// Go's `os.FileMode.String()` for a raw st_mode (envd reports this text): type letters, then
/// rwx triplets, e.g. `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, `dtrwxrwxrwx`.
pub fn permissions_string(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    let mut s = String::new();
    if fmt == libc::S_IFDIR {
        s.push('d');
    }
    if fmt == libc::S_IFLNK {
        s.push('L');
    }
    if fmt == libc::S_IFBLK || fmt == libc::S_IFCHR {
        s.push('D');
    }
    if fmt == libc::S_IFIFO {
        s.push('p');
    }
    if fmt == libc::S_IFSOCK {
        s.push('S');
    }
    if st_mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if st_mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if fmt == libc::S_IFCHR {
        s.push('c');
    }
    if st_mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, c) in RWX.iter().enumerate() {
        let bit = 1 << (8 - i);
        s.push(if st_mode & bit != 0 { *c as char } else { '-' });
    }
    s
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// `user.e2b.*` extended attributes, prefix stripped. Filesystems without xattrs give none.
pub fn read_metadata(path: &Path) -> io::Result<HashMap<String, String>> {
    let p = c_path(path)?;
    let mut names = vec![0u8; 4096];
    // SAFETY: `p` is NUL-terminated and `names` is writable for its length; the kernel writes
    // at most that many bytes.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(HashMap::new());
        }
        return Err(e);
    }
    let mut out = HashMap::new();
    for name in names[..n as usize].split(|&b| b == 0) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 4096];
        // SAFETY: both names are NUL-terminated; `value` is writable for its length.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(key.to_owned(), String::from_utf8_lossy(&value).into_owned());
        }
    }
    Ok(out)
}

/// Stores `metadata` as `user.e2b.<key>` extended attributes, replacing whatever metadata the
/// file had (a write replaces the file whole, its metadata included, as in E2B).
pub fn write_metadata(path: &Path, metadata: &HashMap<String, String>) -> io::Result<()> {
    let p = c_path(path)?;
    for old in read_metadata(path)?.keys() {
        if metadata.contains_key(old) {
            continue;
        }
        let name = CString::new(format!("{METADATA_XATTR_PREFIX}{old}"))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both names are NUL-terminated.
        let rc = unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
        }
    }
    for (k, v) in metadata {
        let name = CString::new(format!("{METADATA_XATTR_PREFIX}{k}"))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: NUL-terminated names; `v` is readable for its length.
        let rc =
            unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Creates `dir` and missing parents (mode 0755, owned by whoever runs this).
pub fn ensure_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

/// Lists `dir` down to `depth` levels (1 = direct children) in lexical depth-first order,
/// reporting paths under `shown` (the path as the caller named it, before symlink resolution),
/// as envd does. Symlinked directories are listed, not descended into.
pub fn walk(dir: &Path, shown: &Path, depth: u32, names: &mut Names) -> io::Result<Vec<EntryInfo>> {
    let mut out = Vec::new();
    walk_into(dir, shown, 1, depth, names, &mut out)?;
    Ok(out)
}

fn walk_into(
    real: &Path,
    shown: &Path,
    level: u32,
    depth: u32,
    names: &mut Names,
    out: &mut Vec<EntryInfo>,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(real)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let mut info = match entry_info(&path, names) {
            Ok(i) => i,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let shown_path = shown.join(e.file_name());
        info.path = shown_path.to_string_lossy().into_owned();
        out.push(info);
        let is_real_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_real_dir && level < depth {
            walk_into(&path, &shown_path, level + 1, depth, names, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_like_go() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(
            permissions_string(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
        assert_eq!(permissions_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
    }

    #[test]
    fn walk_respects_depth() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b/c")).unwrap();
        std::fs::write(d.path().join("a/f"), "x").unwrap();
        let mut names = Names::default();
        let one = walk(d.path(), Path::new("/shown"), 1, &mut names).unwrap();
        assert_eq!(
            one.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["/shown/a"]
        );
        let three = walk(d.path(), Path::new("/shown"), 3, &mut names).unwrap();
        let paths: Vec<_> = three.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/shown/a", "/shown/a/b", "/shown/a/b/c", "/shown/a/f"]
        );
    }
}
