//! Snapshots on one host: frozen disk layers and memory images, and the reference counting that
//! decides when their files can go.
//!
//! `<data>/snapshots/<id>/` holds `disk.qcow2` (the sandbox's overlay at snapshot time, frozen
//! read-only; its backing file is the layer below it: the template's disk or the parent
//! snapshot's layer), `memory.state` (device state and every non-zero page of guest RAM, the
//! format `Vmm::restore` loads) or, once re-homed, `ram` (guest RAM as a file restores map
//! copy-on-write) and `ram.state` (device state only), and `snapshot.json` ([`SnapshotMeta`]). Sandboxes made from a
//! snapshot get a fresh qcow2 overlay whose backing file is the snapshot's layer, so disks are
//! copy-on-write chains: storage grows with what each sandbox writes, not with how many there are.
//!
//! Invariant: a layer is never written after it is frozen, and its files stay as long as a live
//! sandbox's overlay or another kept snapshot's layer sits on it ([`collectable`]). Deleting a
//! snapshot removes its memory image at once (it can no longer be restored) and its layer once
//! nothing needs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::NodeError;

/// What the node records about one snapshot; persisted as `snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub id: String,
    /// The sandbox it was taken from.
    pub sandbox_id: String,
    /// The snapshot whose layer this one's disk layer sits on (none: the template's disk).
    pub parent: Option<String>,
    pub template: String,
    pub template_key: String,
    /// SHA-256 of `memory.state`, verified before every restore.
    pub state_sha256: String,
    pub state_bytes: u64,
    /// The envd access token the guest had at snapshot time: restoring needs it to re-`/init`.
    pub access_token: Option<String>,
    pub created_at_unix_ms: u64,
    /// Deleted by the user: not restorable; the layer stays while something sits on it.
    #[serde(default)]
    pub deleted: bool,
    /// The memory image was re-homed into a shared RAM file (`ram`, read-only) plus a small
    /// device-state file (`ram.state`, whose SHA-256 is `state_sha256`): sandboxes made from
    /// the snapshot map `ram` copy-on-write, as they map a template's, instead of each loading
    /// the whole image into private memory.
    #[serde(default)]
    pub shared_ram: bool,
    /// A filesystem-only snapshot: sandboxes made from it cold-boot from its layer (the memory
    /// image stays only for the sandbox it was taken of, which goes on from it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_only: bool,
    /// SHA-256 of the frozen layer (`disk.qcow2`), verified before a cold boot from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_sha256: Option<String>,
}

impl SnapshotMeta {
    /// The file a restore loads (device state, plus all of RAM unless `shared_ram`).
    pub fn state_file(&self, dir: &Path) -> PathBuf {
        dir.join(if self.shared_ram { RAM_STATE } else { MEMORY })
    }
}

pub(crate) const DISK: &str = "disk.qcow2";
pub(crate) const MEMORY: &str = "memory.state";
pub(crate) const RAM: &str = "ram";
pub(crate) const RAM_STATE: &str = "ram.state";
pub(crate) const META: &str = "snapshot.json";

pub(crate) fn snapshots_root(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

pub(crate) fn snapshot_dir(data_dir: &Path, id: &str) -> PathBuf {
    snapshots_root(data_dir).join(id)
}

pub(crate) fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), NodeError> {
    let tmp = dir.join("snapshot.json.tmp");
    let path = dir.join(META);
    crate::private::write_file(&tmp, &serde_json::to_vec_pretty(meta).expect("serialises"))
        .map_err(|e| NodeError::Io(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| NodeError::Io(path.display().to_string(), e))
}

pub(crate) fn read_meta(dir: &Path) -> Option<SnapshotMeta> {
    std::fs::read(dir.join(META))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Every snapshot recorded under `data_dir`, deleted ones included.
pub(crate) fn all(data_dir: &Path) -> Vec<SnapshotMeta> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(snapshots_root(data_dir)) {
        for e in rd.flatten() {
            if let Some(m) = read_meta(&e.path()) {
                out.push(m);
            }
        }
    }
    out.sort_by_key(|m| m.created_at_unix_ms);
    out
}

/// The snapshots whose files can be removed: deleted ones that no sandbox overlay (`bases`: the
/// snapshot each live sandbox's disk sits on) and no kept snapshot's layer depends on. Removing
/// one can free its parent, so this runs to a fixed point.
pub fn collectable(snapshots: &[SnapshotMeta], bases: &[String]) -> Vec<String> {
    let mut refs: HashMap<&str, usize> = snapshots.iter().map(|s| (s.id.as_str(), 0)).collect();
    for b in bases {
        if let Some(n) = refs.get_mut(b.as_str()) {
            *n += 1;
        }
    }
    for s in snapshots {
        if let Some(p) = &s.parent
            && let Some(n) = refs.get_mut(p.as_str())
        {
            *n += 1;
        }
    }
    let by_id: HashMap<&str, &SnapshotMeta> =
        snapshots.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut gone = Vec::new();
    let mut queue: Vec<&str> = snapshots
        .iter()
        .filter(|s| s.deleted && refs[s.id.as_str()] == 0)
        .map(|s| s.id.as_str())
        .collect();
    while let Some(id) = queue.pop() {
        gone.push(id.to_string());
        if let Some(p) = by_id[id].parent.as_deref()
            && let Some(n) = refs.get_mut(p)
        {
            *n -= 1;
            if *n == 0 && by_id.get(p).is_some_and(|m| m.deleted) {
                queue.push(p);
            }
        }
    }
    gone
}

/// Bytes actually allocated on disk under `path` (a file or a directory tree).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if md.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| allocated_bytes(&e.path())).sum())
            .unwrap_or(0)
    } else {
        md.blocks() * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, parent: Option<&str>, deleted: bool) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            sandbox_id: "s".into(),
            parent: parent.map(Into::into),
            template: "base".into(),
            template_key: "k".into(),
            state_sha256: String::new(),
            state_bytes: 0,
            access_token: None,
            created_at_unix_ms: 0,
            deleted,
            shared_ram: false,
            disk_only: false,
            disk_sha256: None,
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn kept_snapshots_are_never_collected() {
        let snaps = [snap("a", None, false), snap("b", Some("a"), false)];
        assert!(collectable(&snaps, &[]).is_empty());
    }

    #[test]
    fn a_deleted_parent_stays_while_children_need_its_layer() {
        // a (deleted) <- b (kept): a's layer is under b's.
        let snaps = [snap("a", None, true), snap("b", Some("a"), false)];
        assert!(collectable(&snaps, &[]).is_empty());
        // a (deleted) with a live sandbox on it: kept.
        let snaps = [snap("a", None, true)];
        assert!(collectable(&snaps, &["a".to_string()]).is_empty());
        // Nothing on it any more: collected.
        assert_eq!(collectable(&snaps, &[]), ["a"]);
    }

    #[test]
    fn collecting_a_leaf_frees_a_deleted_chain_above_it_but_not_a_shared_node() {
        // a (deleted) <- b (deleted) <- c (deleted); a <- d (kept).
        let snaps = [
            snap("a", None, true),
            snap("b", Some("a"), true),
            snap("c", Some("b"), true),
            snap("d", Some("a"), false),
        ];
        assert_eq!(sorted(collectable(&snaps, &[])), ["b", "c"]);
        // With a sandbox on c nothing goes.
        assert!(collectable(&snaps, &["c".to_string()]).is_empty());
        // d deleted too: the whole tree goes.
        let mut all = snaps.to_vec();
        all[3].deleted = true;
        assert_eq!(sorted(collectable(&all, &[])), ["a", "b", "c", "d"]);
        // Unknown bases (sandboxes made from templates) change nothing.
        assert_eq!(
            sorted(collectable(&all, &["zzz".to_string()])),
            ["a", "b", "c", "d"]
        );
    }

    #[test]
    fn many_children_each_hold_the_parent() {
        let mut snaps = vec![snap("p", None, true)];
        for i in 0..5 {
            snaps.push(snap(&format!("c{i}"), Some("p"), i != 0));
        }
        // c0 is kept, so p stays; c1..c4 go.
        assert_eq!(sorted(collectable(&snaps, &[])), ["c1", "c2", "c3", "c4"]);
    }
}
