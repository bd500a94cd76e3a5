//! Paused sandboxes moving between nodes of a cluster: which files one is made of, and taking
//! one in whose files another node wrote into this node's data dir (the cluster's blob store
//! carries them, `alcove_cluster::blobs`, checked by their SHA-256s).

use std::path::PathBuf;
use std::sync::Arc;

use alcove_vmm::Vmm;

use crate::live::Live;
use crate::node::Node;
use crate::record::{self, Record};
use crate::{NodeError, SandboxState};

impl<V: Vmm> Node<V> {
    /// The files another node needs to resume paused sandbox `id` (name, path): its record,
    /// disk overlay, memory image and the rest of its dir. Refused for one whose disk sits on a
    /// snapshot's layers (they stay on this node) or that mounts volumes.
    pub fn paused_files(&self, id: &str) -> Result<Vec<(String, PathBuf)>, NodeError> {
        let live = self.live(id)?;
        let info = live.snapshot();
        if !matches!(info.state, SandboxState::Paused { .. }) {
            return Err(NodeError::NotPaused {
                id: id.into(),
                state: info.state.to_string(),
            });
        }
        let refuse = |why: String| NodeError::Unmovable { id: id.into(), why };
        if let Some(s) = &info.base_snapshot {
            return Err(refuse(format!(
                "its disk sits on snapshot {s}'s layers, which are kept on this node"
            )));
        }
        if !info.volumes.is_empty() {
            return Err(refuse("it mounts volumes".into()));
        }
        let dir = live.dir();
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| NodeError::Io(dir.display().to_string(), e))? {
            let e = e.map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
            let ft = e
                .file_type()
                .map_err(|err| NodeError::Io(dir.display().to_string(), err))?;
            // Sockets and the like belong to a VM that is gone.
            if ft.is_file() {
                files.push((e.file_name().to_string_lossy().into_owned(), e.path()));
            }
        }
        files.sort();
        Ok(files)
    }

    /// Where the files of a sandbox coming from another node go before [`Node::adopt_paused`].
    pub fn incoming_dir(&self, id: &str) -> Result<PathBuf, NodeError> {
        if !crate::node::valid_id(id) {
            return Err(NodeError::NotFound(id.into()));
        }
        if self.live(id).is_ok() {
            return Err(NodeError::Unmovable {
                id: id.into(),
                why: "this node has a sandbox of that id already".into(),
            });
        }
        Ok(self.cfg.data_dir.join("sandboxes").join(id))
    }

    /// Takes in the paused sandbox whose files are complete in [`Node::incoming_dir`]: from now
    /// on it is this node's, resumed like any other (its memory image checked first).
    pub fn adopt_paused(self: &Arc<Self>, id: &str) -> Result<(), NodeError> {
        let dir = self.incoming_dir(id)?;
        let refuse = |why: String| NodeError::Unmovable { id: id.into(), why };
        let info = record::read(&dir).ok_or_else(|| refuse("its record did not arrive".into()))?;
        if info.id != id || !matches!(info.state, SandboxState::Paused { .. }) || info.pooled {
            return Err(refuse(format!(
                "its record is of sandbox {} in state {}",
                info.id, info.state
            )));
        }
        // Its disk's backing file and memory layout are the template's: built here too.
        self.template_by_key(&info.template_key).map_err(|_| {
            refuse(format!(
                "template build {} is not on this node (build the template here, with the same \
                 cache dir path as the other nodes)",
                info.template_key
            ))
        })?;
        let live = Live::new(Record::loaded(&dir, info), None, None);
        let mut all = self.sandboxes.lock().expect("sandboxes lock");
        if all.contains_key(id) {
            return Err(refuse("this node has a sandbox of that id already".into()));
        }
        all.insert(id.to_owned(), live);
        tracing::info!(sandbox_id = %id, "took in a paused sandbox from another node");
        Ok(())
    }
}
