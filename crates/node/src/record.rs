//! A sandbox's record: what the node knows about it ([`SandboxInfo`]), in memory and as
//! `record.json` in its dir.
//!
//! Invariant: [`Record::create`] writes a record once, in state `creating` (or
//! [`Record::taken_in`], once, for a paused sandbox arriving from another node); after that
//! [`Record::apply`] is the only writer of the record, in memory and on disk, and it changes
//! nothing that [`crate::lifecycle::transition`] refuses. Every applied event is logged at `info`
//! with the sandbox id, the states before and after, and the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use alcove_net::NetworkConfig;
use serde::{Deserialize, Serialize};

use crate::NodeError;
use crate::lifecycle::{self, Event, SandboxState};

/// What the node knows about one sandbox; persisted as `record.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub template: String,
    pub template_key: String,
    #[serde(flatten)]
    pub state: SandboxState,
    pub created_at_unix_ms: u64,
    pub pid: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the sandbox's disk (records written before this field existed read as 0).
    #[serde(default)]
    pub disk_mib: u32,
    pub hostname: String,
    /// The create's env vars, for its first `/init` only. Never written to `record.json`: the
    /// values can be secrets, and the guest keeps them (records written before read them back).
    #[serde(default, skip_serializing)]
    pub envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Egress rules (E2B's `network` / `allowInternetAccess`), as last set.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The snapshot whose disk layer this sandbox's overlay sits on (none: the template's disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// A warm-pool VM nobody has claimed yet (see `pool.rs`): not a sandbox, never re-attached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
    /// The process whose pool holds this warm VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_owner: Option<u32>,
    /// Volumes mounted in the guest, served again after every restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<alcove_volume::MountSpec>,
}

/// The record of one sandbox (or warm VM) and the dir it is kept in.
#[derive(Debug)]
pub(crate) struct Record {
    dir: PathBuf,
    info: Mutex<SandboxInfo>,
}

impl Record {
    /// Writes the first record of a sandbox being created into `dir`.
    pub(crate) fn create(dir: &Path, info: SandboxInfo) -> Result<Record, NodeError> {
        debug_assert_eq!(info.state, SandboxState::Creating);
        write(dir, &info)?;
        Ok(Record::loaded(dir, info))
    }

    /// The record of a sandbox taken in from another node, as this node has it (its disk
    /// re-pointed here), written over the one that arrived.
    pub(crate) fn taken_in(dir: &Path, info: SandboxInfo) -> Result<Record, NodeError> {
        write(dir, &info)?;
        Ok(Record::loaded(dir, info))
    }

    /// A record read from `dir` (by [`read`]), as it is on disk.
    pub(crate) fn loaded(dir: &Path, info: SandboxInfo) -> Record {
        Record {
            dir: dir.to_path_buf(),
            info: Mutex::new(info),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn info(&self) -> SandboxInfo {
        self.info.lock().expect("record lock").clone()
    }

    /// Applies `event`: the next state (or why there is none), the fields the event carries,
    /// written to disk, then kept in memory. Returns the new record.
    pub(crate) fn apply(&self, event: Event) -> Result<SandboxInfo, NodeError> {
        let mut guard = self.info.lock().expect("record lock");
        let next_state = lifecycle::transition(&guard.state, &event).map_err(|source| {
            NodeError::Transition {
                id: guard.id.clone(),
                source,
            }
        })?;
        let mut next = guard.clone();
        next.state = next_state;
        match &event {
            Event::VmStarted { pid } | Event::Resumed { pid } | Event::Restarted { pid } => {
                next.pid = *pid
            }
            Event::Snapshotted { snapshot_id } => next.base_snapshot = Some(snapshot_id.clone()),
            Event::NetworkSet { network } => next.network = network.clone(),
            Event::Ready
            | Event::Paused { .. }
            | Event::Crashed { .. }
            | Event::Vanished { .. }
            | Event::Killed => {}
        }
        write(&self.dir, &next)?;
        tracing::info!(
            sandbox_id = %next.id,
            from = guard.state.name(),
            to = next.state.name(),
            event = event.name(),
            reason = %event.reason(),
            "sandbox state change"
        );
        *guard = next.clone();
        Ok(next)
    }
}

/// The record in `dir`, if there is a readable one.
pub(crate) fn read(dir: &Path) -> Option<SandboxInfo> {
    std::fs::read(dir.join("record.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn write(dir: &Path, info: &SandboxInfo) -> Result<(), NodeError> {
    let tmp = dir.join("record.json.tmp");
    let path = dir.join("record.json");
    crate::private::write_file(&tmp, &serde_json::to_vec_pretty(info).expect("serialises"))
        .map_err(|e| NodeError::Io(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| NodeError::Io(path.display().to_string(), e))
}

/// Removes everything in a sandbox dir but its record (a dead sandbox keeps only its record).
pub(crate) fn remove_all_but_record(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name() != "record.json" {
                let _ =
                    std::fs::remove_file(e.path()).or_else(|_| std::fs::remove_dir_all(e.path()));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn info() -> SandboxInfo {
        SandboxInfo {
            id: "sbx".into(),
            template: "base".into(),
            template_key: "k".into(),
            state: SandboxState::Creating,
            created_at_unix_ms: 1,
            pid: 0,
            vcpus: 1,
            memory_mib: 128,
            disk_mib: 0,
            hostname: "sbx".into(),
            envs: BTreeMap::new(),
            access_token: None,
            network: NetworkConfig::default(),
            base_snapshot: None,
            pooled: false,
            pool_owner: None,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn apply_writes_what_the_event_carries_and_refuses_illegal_events_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let r = Record::create(dir.path(), info()).unwrap();
        assert_eq!(read(dir.path()).unwrap().state, SandboxState::Creating);

        r.apply(Event::VmStarted { pid: 42 }).unwrap();
        assert_eq!(read(dir.path()).unwrap().pid, 42);
        r.apply(Event::Ready).unwrap();
        r.apply(Event::Snapshotted {
            snapshot_id: "s1".into(),
        })
        .unwrap();
        let on_disk = read(dir.path()).unwrap();
        assert_eq!(on_disk.state, SandboxState::Running);
        assert_eq!(on_disk.base_snapshot.as_deref(), Some("s1"));

        let err = r.apply(Event::Resumed { pid: 7 }).unwrap_err();
        assert!(
            matches!(&err, NodeError::Transition { id, source } if id == "sbx" && source.from == "running" && source.event == "resumed"),
            "{err:?}"
        );
        assert_eq!(
            read(dir.path()).unwrap().pid,
            42,
            "a refused event writes nothing"
        );
        assert_eq!(r.info().pid, 42);

        r.apply(Event::Killed).unwrap();
        assert!(r.apply(Event::Killed).is_err(), "killed is terminal");
        assert!(
            r.apply(Event::NetworkSet {
                network: NetworkConfig::default()
            })
            .is_err()
        );
        assert_eq!(read(dir.path()).unwrap().state, SandboxState::Killed);
    }
}
