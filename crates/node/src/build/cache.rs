//! The layer cache: which node snapshot holds the builder VM as it was after a step.
//!
//! `<data>/build-cache/<key>.json` names the snapshot (`<data>/snapshots/<id>/`: the frozen disk
//! layer and memory image) of the layer with that key (see `state.rs` for the keys). A cached
//! layer is an ordinary, undeleted node snapshot, so the node's snapshot collection never removes
//! it, nor the layers under it (its parents are held by the chain). Eviction deletes the snapshot
//! (`Node::delete_snapshot`): its memory image goes at once, its disk layer once nothing sits on
//! it. The index is capped at [`CACHE_CAP_BYTES`]; least recently used entries go first.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::NodeError;

/// Bytes of snapshots the cache keeps before evicting least recently used ones (disk layers and
/// memory images together). 16 GiB: a few dozen layers of a 512 MiB template.
pub const CACHE_CAP_BYTES: u64 = 16 << 30;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub snapshot: String,
    pub bytes: u64,
    pub created_at_unix_ms: u64,
    pub used_at_unix_ms: u64,
}

pub(crate) fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("build-cache")
}

fn path(data_dir: &Path, key: &str) -> Option<PathBuf> {
    (!key.is_empty() && key.len() <= 128 && key.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| root(data_dir).join(format!("{key}.json")))
}

pub(crate) fn get(data_dir: &Path, key: &str) -> Option<Entry> {
    let p = path(data_dir, key)?;
    let e: Entry = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    (e.key == key).then_some(e)
}

pub(crate) fn put(data_dir: &Path, entry: &Entry) -> Result<(), NodeError> {
    let dir = root(data_dir);
    crate::private::create_dir_all(&dir)
        .map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
    let p = path(data_dir, &entry.key).ok_or_else(|| {
        NodeError::Io(
            entry.key.clone(),
            std::io::Error::other("invalid layer cache key"),
        )
    })?;
    let tmp = p.with_extension("json.tmp");
    crate::private::write_file(&tmp, &serde_json::to_vec(entry).expect("serialises"))
        .map_err(|e| NodeError::Io(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, &p).map_err(|e| NodeError::Io(p.display().to_string(), e))
}

pub(crate) fn remove(data_dir: &Path, key: &str) {
    if let Some(p) = path(data_dir, key) {
        let _ = std::fs::remove_file(p);
    }
}

pub(crate) fn all(data_dir: &Path) -> Vec<Entry> {
    let mut out: Vec<Entry> = std::fs::read_dir(root(data_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            get(data_dir, name.strip_suffix(".json")?)
        })
        .collect();
    out.sort_by_key(|e| e.used_at_unix_ms);
    out
}

/// The entries to evict so the rest fit in `cap` bytes: least recently used first, never one in
/// `keep` (the layers of the build in progress).
pub fn to_evict(entries: &[Entry], cap: u64, keep: &[String]) -> Vec<String> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.used_at_unix_ms);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut out = Vec::new();
    for e in sorted {
        if total <= cap {
            break;
        }
        if keep.contains(&e.key) {
            continue;
        }
        total = total.saturating_sub(e.bytes);
        out.push(e.key.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, bytes: u64, used: u64) -> Entry {
        Entry {
            key: key.into(),
            snapshot: format!("s-{key}"),
            bytes,
            created_at_unix_ms: 0,
            used_at_unix_ms: used,
        }
    }

    #[test]
    fn eviction_takes_the_least_recently_used_until_under_the_cap() {
        let e = [entry("aa", 10, 3), entry("bb", 10, 1), entry("cc", 10, 2)];
        assert!(to_evict(&e, 30, &[]).is_empty());
        assert_eq!(to_evict(&e, 25, &[]), ["bb"]);
        assert_eq!(to_evict(&e, 10, &[]), ["bb", "cc"]);
        // The build's own layers stay.
        assert_eq!(to_evict(&e, 10, &["bb".into()]), ["cc", "aa"]);
    }

    #[test]
    fn the_index_round_trips_and_refuses_odd_keys() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry("abc123", 5, 7);
        put(dir.path(), &e).unwrap();
        assert_eq!(get(dir.path(), "abc123"), Some(e.clone()));
        assert_eq!(all(dir.path()), [e]);
        assert!(get(dir.path(), "../x").is_none());
        assert!(put(dir.path(), &entry("../x", 1, 1)).is_err());
        remove(dir.path(), "abc123");
        assert!(get(dir.path(), "abc123").is_none());
    }
}
