//! A cluster's nodes through the API: listing them, and draining one (its running sandboxes
//! paused through the ordinary pause, so the store, metering and quotas see it, then every
//! paused one moved off the node to the blob store, from where its next resume runs elsewhere).

use super::{Service, api_error};
use crate::backend::{BackendOp, Keep, NodeInfo};
use crate::error::ApiError;
use crate::models::{DrainFailure, DrainReport};
use alcove_store::SandboxState as StoreState;

/// The answer when the backend is one host.
const NOT_A_CLUSTER: &str = "nodes (this server is one host; a cluster's control plane runs `alcove server --cluster-listen`)";

impl Service {
    /// The cluster's nodes, as the control plane sees them.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        self.backend.nodes().ok_or(ApiError::Unsupported {
            feature: NOT_A_CLUSTER,
        })
    }

    /// Drains node `node_id`: no new sandboxes go there; each running one is paused, and each
    /// paused one leaves the node for the blob store. What failed is reported per sandbox and
    /// stays where it was.
    pub async fn drain_node(&self, node_id: &str) -> Result<DrainReport, ApiError> {
        if self.backend.nodes().is_none() {
            return Err(ApiError::Unsupported {
                feature: NOT_A_CLUSTER,
            });
        }
        let on_node = self
            .call(BackendOp::Drain, "", self.backend.drain_node(node_id))
            .await
            .map_err(|e| api_error(BackendOp::Drain, "", e))?;
        let mut report = DrainReport {
            node_id: node_id.to_owned(),
            paused: Vec::new(),
            moved: Vec::new(),
            failed: Vec::new(),
        };
        for l in on_node {
            let id = l.sandbox_id;
            let id2 = id.clone();
            let state = self.db(move |s| s.sandbox(&id2)).await?.map(|r| r.state);
            let fail = |report: &mut DrainReport, e: ApiError| {
                report.failed.push(DrainFailure {
                    sandbox_id: id.clone(),
                    message: e.parts().2,
                })
            };
            match state {
                Some(StoreState::Running) => {
                    match self
                        .pause_record(&id, Keep::Memory, "paused to drain its node")
                        .await
                    {
                        Ok(()) => report.paused.push(id.clone()),
                        Err(e) => {
                            fail(&mut report, e);
                            continue;
                        }
                    }
                }
                Some(StoreState::Paused) => {}
                // Not the API's (killed or lost meanwhile): nothing to keep.
                _ => continue,
            }
            match self
                .call(BackendOp::Evict, &id, self.backend.evict(&id))
                .await
            {
                Ok(()) => report.moved.push(id.clone()),
                Err(e) => fail(&mut report, api_error(BackendOp::Evict, &id, e)),
            }
        }
        tracing::info!(
            node = node_id,
            paused = report.paused.len(),
            moved = report.moved.len(),
            failed = report.failed.len(),
            "node drained"
        );
        Ok(report)
    }
}
