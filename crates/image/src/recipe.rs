//! Template recipes (TOML). Built-in recipes live in the repository's `templates/` and are embedded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ImageError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_disk")]
    pub disk_mib: u32,
    /// Extra Debian packages, installed with apt in the rootfs.
    #[serde(default)]
    pub apt: Vec<String>,
    /// Python packages, installed system-wide with pip.
    #[serde(default)]
    pub pip: Vec<String>,
    /// npm packages, installed globally.
    #[serde(default)]
    pub npm: Vec<String>,
    /// Files to place in the rootfs: guest path → contents.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Environment of every process the agent starts.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A command the agent starts at boot, before the snapshot (e.g. a server to keep warm).
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// Who runs `start_cmd` and `ready_cmd` (default: `user`, the template's user). Left out of
    /// the canonical form when unset, so recipes without it keep their content hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_user: Option<String>,
    /// Polled until it exits 0 before the template is snapshotted.
    #[serde(default)]
    pub ready_cmd: Option<String>,
    /// Shell commands run in the rootfs (chroot, as root) after packages are installed.
    #[serde(default)]
    pub run: Vec<String>,
}

fn default_vcpus() -> u32 {
    2
}
fn default_memory() -> u32 {
    512
}
fn default_disk() -> u32 {
    4096
}

const BUILTIN: &[(&str, &str)] = &[
    ("base", include_str!("../../../templates/base.toml")),
    (
        "code-interpreter-v1",
        include_str!("../../../templates/code-interpreter-v1.toml"),
    ),
    ("minimal", include_str!("../../../templates/minimal.toml")),
    (
        "mcp-gateway",
        include_str!("../../../templates/mcp-gateway.toml"),
    ),
    ("desktop", include_str!("../../../templates/desktop.toml")),
];

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe, ImageError> {
        let r: Recipe = toml::from_str(text).map_err(|e| ImageError::Recipe(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    pub fn builtin(name: &str) -> Result<Recipe, ImageError> {
        BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| Recipe::parse(text))
            .unwrap_or_else(|| Err(ImageError::UnknownTemplate(name.to_string())))
    }

    pub fn builtin_names() -> impl Iterator<Item = &'static str> {
        BUILTIN.iter().map(|(n, _)| *n)
    }

    fn validate(&self) -> Result<(), ImageError> {
        let bad = |m: String| Err(ImageError::Recipe(m));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return bad(format!(
                "name `{}` must be 1-64 chars of a-z, 0-9, - and _",
                self.name
            ));
        }
        if !(1..=16).contains(&self.vcpus) {
            return bad(format!("vcpus = {} is out of range 1..=16", self.vcpus));
        }
        if !(128..=65536).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib = {} is out of range 128..=65536",
                self.memory_mib
            ));
        }
        if !(1024..=1_048_576).contains(&self.disk_mib) {
            return bad(format!(
                "disk_mib = {} is out of range 1024..=1048576",
                self.disk_mib
            ));
        }
        for path in self.files.keys() {
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return bad(format!(
                    "file path `{path}` must be absolute and must not contain `..`"
                ));
            }
        }
        Ok(())
    }

    /// Canonical bytes for the content hash.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a recipe serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_parses() {
        let r = Recipe::builtin("base").unwrap();
        assert_eq!(r.name, "base");
        assert!(r.memory_mib >= 256);
    }

    #[test]
    fn minimal_is_the_smallest_machine() {
        let r = Recipe::builtin("minimal").unwrap();
        assert_eq!((r.vcpus, r.memory_mib), (1, 128));
        assert!(r.start_cmd.is_none());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = Recipe::parse("name = \"x\"\nvcpu = 2\n").unwrap_err();
        assert!(e.to_string().contains("vcpu"), "{e}");
    }

    #[test]
    fn traversal_in_files_is_refused() {
        let e = Recipe::parse("name = \"x\"\n[files]\n\"/etc/../x\" = \"\"\n").unwrap_err();
        assert!(e.to_string().contains(".."), "{e}");
    }

    #[test]
    fn canonical_is_stable_and_sensitive() {
        let a = Recipe::builtin("base").unwrap();
        let mut b = a.clone();
        assert_eq!(a.canonical(), b.canonical());
        b.pip.push("numpy".into());
        assert_ne!(a.canonical(), b.canonical());
    }

    #[test]
    fn unknown_template_names_the_fix() {
        let e = Recipe::builtin("nope").unwrap_err();
        assert!(e.to_string().contains("alcove template build nope"), "{e}");
    }
}
