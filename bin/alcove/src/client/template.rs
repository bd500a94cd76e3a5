//! `alcove client template ls` (the REST side; building templates is `alcove template build`).

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::{ClientArgs, str_of, table};

/// `alcove client template ...`.
#[derive(Debug, Clone, Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TemplateCommand {
    /// List templates the server can create sandboxes from.
    Ls,
}

pub async fn run_template(args: TemplateArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let api = args.client.client()?;
    match args.command {
        TemplateCommand::Ls => {
            let r = api.templates().await?;
            if args.client.json {
                writeln!(out, "{r}")?;
            } else {
                let rows = r
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let aliases = t["aliases"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        vec![
                            str_of(&t["templateID"]),
                            aliases,
                            t["cpuCount"].to_string(),
                            t["memoryMB"].to_string(),
                            str_of(&t["envdVersion"]),
                        ]
                    })
                    .collect();
                table(out, &["ID", "ALIASES", "CPUS", "MEMORY_MB", "ENVD"], rows)?;
            }
        }
    }
    Ok(())
}
