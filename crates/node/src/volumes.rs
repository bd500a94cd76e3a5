//! Volumes in sandboxes: after every new agent connection of a sandbox that mounts volumes
//! (create, warm claim, resume, the restart that ends a snapshot, a reconnect after a server
//! restart), the node opens the agent's volume session, names the mounts, checks the guest
//! mounted them, and serves the guest's requests from the host's volume directories
//! (`alcove_volume::serve`) until that connection ends.

use std::sync::Arc;
use std::time::Duration;

use alcove_agent_client::AgentClient;
use alcove_vmm::Vmm;
use alcove_volume::serve::{Served, serve};
use alcove_volume::wire::{self, Hello, HelloMount, HelloReply};
use tokio::io::AsyncWriteExt;

use crate::NodeError;
use crate::node::Node;
use crate::record::SandboxInfo;

/// How long the guest may take to mount a sandbox's volumes.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

impl<V: Vmm> Node<V> {
    /// Where volumes live on this host; until set, creates with volume mounts are refused.
    /// Running sandboxes re-attached after a restart that mount volumes get their agent
    /// connection (and so their volume session) now rather than at their next call, so their
    /// guests' volume requests wait no longer than the restart.
    pub fn set_volumes(self: &Arc<Self>, volumes: Arc<alcove_volume::Volumes>) {
        *self.volumes.lock().expect("volumes lock") = Some(volumes);
        let ids: Vec<String> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .map(|live| live.snapshot())
            .filter(|info| info.state == crate::SandboxState::Running && !info.volumes.is_empty())
            .map(|info| info.id)
            .collect();
        for id in ids {
            let node = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = node.agent(&id).await {
                    tracing::warn!(sandbox_id = %id, error = %crate::node::error_chain(&e), "could not serve a re-attached sandbox's volumes");
                }
            });
        }
    }

    /// Opens `info`'s volume session on `agent` (a no-op without mounts) and serves it in the
    /// background; fails if a volume is missing or the guest could not mount it.
    pub(crate) async fn attach_volumes(
        &self,
        info: &SandboxInfo,
        agent: &AgentClient,
    ) -> Result<(), NodeError> {
        if info.volumes.is_empty() {
            return Ok(());
        }
        let registry = self
            .volumes
            .lock()
            .expect("volumes lock")
            .clone()
            .ok_or_else(|| NodeError::Volume("this node has no volume store".into()))?;
        let mut served = Vec::new();
        for m in &info.volumes {
            let root = registry
                .open(&m.volume_id)
                .map_err(|e| NodeError::Volume(format!("volume {}: {e}", m.name)))?;
            served.push(Served { root });
        }
        let hello = Hello {
            mounts: info
                .volumes
                .iter()
                .map(|spec| HelloMount { spec: spec.clone() })
                .collect(),
        };
        let session = async {
            let tunnel = agent.volume_session(info.access_token.as_deref()).await?;
            let (mut from_guest, mut to_guest) = tokio::io::split(tunnel);
            to_guest
                .write_all(&wire::encode(&hello, &[]))
                .await
                .map_err(|e| NodeError::Io("volume session".into(), e))?;
            // The guest is hostile: its answer is bounded like its requests.
            let reply =
                wire::read_frame::<_, HelloReply>(&mut from_guest, wire::MAX_REQUEST_HEADER, 0)
                    .await
                    .map_err(|e| NodeError::Volume(format!("the guest's volume answer: {e}")))?
                    .ok_or_else(|| NodeError::Volume("the guest closed the volume session".into()))?
                    .0;
            for (m, why) in info.volumes.iter().zip(reply.mounts.iter()) {
                if let Some(why) = why {
                    return Err(NodeError::Volume(format!(
                        "mounting volume {} at {} in the sandbox failed: {why}",
                        m.name, m.path
                    )));
                }
            }
            if reply.mounts.len() != info.volumes.len() {
                return Err(NodeError::Volume(
                    "the guest answered for a different number of volumes".into(),
                ));
            }
            Ok((from_guest, to_guest))
        };
        let (from_guest, mut to_guest) = tokio::time::timeout(MOUNT_TIMEOUT, session)
            .await
            .map_err(|_| NodeError::AgentTimeout(MOUNT_TIMEOUT))??;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if to_guest.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let id = info.id.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(served, from_guest, tx).await {
                tracing::warn!(sandbox_id = %id, error = %crate::node::error_chain(&e), "volume session ended");
            }
        });
        Ok(())
    }
}
