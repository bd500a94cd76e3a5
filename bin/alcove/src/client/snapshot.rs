//! `alcove snapshot tree|ls|create|fork|rm`: snapshots and the checkpoint tree, through the API.

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::{ClientArgs, str_of, table};

/// `alcove snapshot ...`.
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotCommand {
    /// Show the checkpoint tree: every snapshot under the one its sandbox came from, with the
    /// live sandboxes on each.
    Tree,
    /// List restorable snapshots (newest first).
    Ls,
    /// Snapshot a running sandbox (it goes on running) and print the snapshot id.
    Create {
        sandbox: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Fork a running sandbox into COUNT children (1-100) and print their ids.
    Fork {
        sandbox: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Delete a snapshot (its files go once no sandbox or other snapshot needs them).
    Rm { snapshot: String },
}

pub async fn run_snapshot(args: SnapshotArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let api = args.client.client()?;
    let json = args.client.json;
    match args.command {
        SnapshotCommand::Tree => {
            let r = api.snapshot_tree().await?;
            if json {
                writeln!(out, "{r}")?;
            } else if r["roots"].as_array().is_none_or(|a| a.is_empty()) {
                writeln!(out, "no snapshots")?;
            } else {
                for root in r["roots"].as_array().into_iter().flatten() {
                    writeln!(out, "{}", str_of(&root["templateID"]))?;
                    print_tree(out, root, "")?;
                }
            }
        }
        SnapshotCommand::Ls => {
            let r = api.snapshots().await?;
            if json {
                writeln!(out, "{r}")?;
            } else {
                let rows = r
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        vec![
                            str_of(&s["snapshotID"]),
                            s["names"]
                                .as_array()
                                .map(|n| n.iter().map(str_of).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(out, &["ID", "NAMES"], rows)?;
            }
        }
        SnapshotCommand::Create { sandbox, name } => {
            let r = api.create_snapshot(&sandbox, name.as_deref()).await?;
            if json {
                writeln!(out, "{r}")?;
            } else {
                writeln!(out, "{}", str_of(&r["snapshotID"]))?;
            }
        }
        SnapshotCommand::Fork { sandbox, count } => {
            let r = api.fork(&sandbox, count).await?;
            if json {
                writeln!(out, "{r}")?;
            } else {
                for c in r["children"].as_array().into_iter().flatten() {
                    match c.get("sandbox") {
                        Some(s) => writeln!(out, "{}", str_of(&s["sandboxID"]))?,
                        None => writeln!(out, "error: {}", str_of(&c["error"]["message"]))?,
                    }
                }
            }
        }
        SnapshotCommand::Rm { snapshot } => {
            api.delete_snapshot(&snapshot).await?;
        }
    }
    Ok(())
}

fn print_tree(out: &mut dyn Write, node: &Value, indent: &str) -> std::io::Result<()> {
    let mut label = str_of(&node["snapshotID"]);
    if let Some(n) = node["name"].as_str() {
        label.push_str(&format!(" ({n})"));
    }
    if node["kind"] == "fork" {
        label.push_str(" [fork]");
    }
    if node["deleted"] == true {
        label.push_str(" [deleted]");
    }
    label.push_str(&format!(" from {}", str_of(&node["sandboxID"])));
    writeln!(out, "{indent}└─ {label}")?;
    let child_indent = format!("{indent}   ");
    for s in node["sandboxes"].as_array().into_iter().flatten() {
        writeln!(out, "{child_indent}• sandbox {}", str_of(s))?;
    }
    for c in node["children"].as_array().into_iter().flatten() {
        print_tree(out, c, &child_indent)?;
    }
    Ok(())
}
