//! Path resolution as envd does it: `~` is the user's home, an empty path is the default
//! workdir (or home), relative paths are relative to the home, `..` is resolved lexically.
//! Access control is not done here: file operations run with the user's own credentials
//! (see `fs::as_user`), so the kernel decides what a user may touch.

use std::path::{Component, Path, PathBuf};

use crate::users::UserInfo;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("cannot expand '{0}': only '~' and '~/...' (the user's own home) are supported")]
    OtherUsersHome(String),
    #[error("path contains a NUL byte")]
    Nul,
}

pub fn resolve(
    path: &str,
    user: &UserInfo,
    default_workdir: Option<&Path>,
) -> Result<PathBuf, PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    if path.is_empty() {
        return Ok(clean(default_workdir.unwrap_or(&user.home)));
    }
    let expanded = if let Some(rest) = path.strip_prefix('~') {
        if !(rest.is_empty() || rest.starts_with('/')) {
            return Err(PathError::OtherUsersHome(path.to_owned()));
        }
        user.home.join(rest.trim_start_matches('/'))
    } else {
        PathBuf::from(path)
    };
    if expanded.is_absolute() {
        Ok(clean(&expanded))
    } else {
        Ok(clean(&user.home.join(expanded)))
    }
}

/// Lexical cleanup: drops `.`, resolves `..` against the preceding component, never above `/`.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{Gid, Uid};

    fn user() -> UserInfo {
        UserInfo {
            name: "user".into(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            groups: vec![],
            home: "/home/user".into(),
        }
    }

    #[test]
    fn resolves_like_envd() {
        let u = user();
        assert_eq!(resolve("", &u, None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(
            resolve("", &u, Some(Path::new("/work"))).unwrap(),
            PathBuf::from("/work")
        );
        assert_eq!(
            resolve("a/b", &u, None).unwrap(),
            PathBuf::from("/home/user/a/b")
        );
        assert_eq!(
            resolve("~/x", &u, None).unwrap(),
            PathBuf::from("/home/user/x")
        );
        assert_eq!(resolve("~", &u, None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(
            resolve("/tmp/../etc", &u, None).unwrap(),
            PathBuf::from("/etc")
        );
        assert_eq!(
            resolve("../../../../root", &u, None).unwrap(),
            PathBuf::from("/root")
        );
        assert!(resolve("~root/x", &u, None).is_err());
    }
}
