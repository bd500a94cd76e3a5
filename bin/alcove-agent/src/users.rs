//! Sandbox users: who a call runs as (E2B passes it as `Authorization: Basic base64("name:")`),
//! resolved to uid, gid, supplementary groups and home from the guest's passwd/group files.

use std::ffi::CString;
use std::path::PathBuf;

use base64::Engine;
use nix::unistd::{Gid, Uid, User};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups (primary group included), as initgroups(3) would set them.
    pub groups: Vec<Gid>,
    pub home: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user '{0}' does not exist in the sandbox; use 'root' or 'user'")]
    Unknown(String),
    #[error("look up user '{name}'")]
    Lookup {
        name: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("malformed Authorization header: expected 'Basic base64(<user>:)'")]
    BadAuthorization,
}

impl UserInfo {
    pub fn lookup(name: &str) -> Result<UserInfo, UserError> {
        let user = User::from_name(name)
            .map_err(|source| UserError::Lookup {
                name: name.to_owned(),
                source,
            })?
            .ok_or_else(|| UserError::Unknown(name.to_owned()))?;
        let groups = CString::new(name)
            .ok()
            .and_then(|c| nix::unistd::getgrouplist(&c, user.gid).ok())
            .unwrap_or_else(|| vec![user.gid]);
        Ok(UserInfo {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
        })
    }

    /// The user this agent process runs as (host tests run unprivileged users this way).
    pub fn current() -> Result<UserInfo, UserError> {
        let uid = nix::unistd::geteuid();
        let user = User::from_uid(uid)
            .map_err(|source| UserError::Lookup {
                name: uid.to_string(),
                source,
            })?
            .ok_or_else(|| UserError::Unknown(uid.to_string()))?;
        UserInfo::lookup(&user.name)
    }

    /// Whether running as this user needs a credential switch from the agent's own.
    pub fn needs_switch(&self) -> bool {
        nix::unistd::geteuid() != self.uid
    }
}

/// The user named by an `Authorization: Basic` header, if there is one.
pub fn user_from_authorization(value: Option<&str>) -> Result<Option<String>, UserError> {
    let Some(value) = value else { return Ok(None) };
    let encoded = value
        .strip_prefix("Basic ")
        .ok_or(UserError::BadAuthorization)?
        .trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| UserError::BadAuthorization)?;
    let decoded = String::from_utf8(decoded).map_err(|_| UserError::BadAuthorization)?;
    let name = decoded.split(':').next().unwrap_or("");
    Ok((!name.is_empty()).then(|| name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_names_the_user() {
        // base64("user:")
        assert_eq!(
            user_from_authorization(Some("Basic dXNlcjo=")).unwrap(),
            Some("user".to_owned())
        );
        assert_eq!(user_from_authorization(None).unwrap(), None);
        assert!(user_from_authorization(Some("Bearer x")).is_err());
    }

    #[test]
    fn root_resolves() {
        let root = UserInfo::lookup("root").unwrap();
        assert_eq!(root.uid.as_raw(), 0);
        assert!(matches!(
            UserInfo::lookup("no-such-user-alcove"),
            Err(UserError::Unknown(_))
        ));
    }
}
