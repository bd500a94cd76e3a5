//! `alcove node ls|drain`: a cluster's nodes, through the control plane's API (admin key).

use std::io::Write;

use clap::Subcommand;

use super::{ClientArgs, str_of, table};

#[derive(Debug, Clone, Subcommand)]
pub enum NodeCommand {
    /// List the cluster's nodes: up or not, draining, sandboxes, free memory.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Drain a node: no new sandboxes go there, its running sandboxes are paused, and each
    /// paused one moves to the blob store, from where its next resume runs on another node.
    Drain {
        /// The node's id (`alcove node ls`).
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn run_node_command(
    cmd: NodeCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u8> {
    match cmd {
        NodeCommand::Ls { client } => {
            let r = client.client()?.nodes().await?;
            if client.json {
                writeln!(out, "{r}")?;
                return Ok(0);
            }
            let rows = r
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    vec![
                        str_of(&n["nodeID"]),
                        if n["up"].as_bool() == Some(true) {
                            "up"
                        } else {
                            "lost"
                        }
                        .into(),
                        if n["draining"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        }
                        .into(),
                        str_of(&n["sandboxes"]),
                        format!("{} MiB", str_of(&n["memoryAvailableMib"])),
                        format!("{} ms ago", str_of(&n["lastHeartbeatMsAgo"])),
                        str_of(&n["url"]),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "NODE",
                    "STATE",
                    "DRAINING",
                    "SANDBOXES",
                    "FREE MEMORY",
                    "HEARTBEAT",
                    "LINK",
                ],
                rows,
            )?;
            Ok(0)
        }
        NodeCommand::Drain { node, client } => {
            let r = client.client()?.drain_node(&node).await?;
            let failed = r["failed"].as_array().map_or(0, |a| a.len());
            if client.json {
                writeln!(out, "{r}")?;
            } else {
                let n = |k: &str| r[k].as_array().map_or(0, |a| a.len());
                writeln!(
                    out,
                    "node {node} drained: {} paused, {} moved off it, {failed} stayed",
                    n("paused"),
                    n("moved")
                )?;
                for f in r["failed"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "  {}: {}",
                        str_of(&f["sandboxID"]),
                        str_of(&f["message"])
                    )?;
                }
            }
            Ok(u8::from(failed > 0))
        }
    }
}
