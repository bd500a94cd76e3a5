//! The REST client commands: `alcove client sandbox …`, `alcove client template ls` and
//! `alcove snapshot …`, over [`alcove_client`] against a running server.
//!
//! Output goes to the writer the caller passes (stdout in `main`); `--json` prints the API's JSON
//! as is, for scripts and agents, and nothing else goes to that writer (logs go to stderr).

mod audit;
pub mod build;
mod exec;
mod nodes;
mod sandbox;
mod snapshot;
mod template;
mod terminal;
mod usage;

use std::io::Write;
use std::path::PathBuf;

use alcove_client::ApiClient;
use anyhow::Context;
use clap::Args;
use serde_json::Value;

pub use audit::{AuditArgs, run_audit};
pub use nodes::{NodeCommand, run_node_command};
pub use sandbox::{SandboxArgs, run_sandbox};
pub use snapshot::{SnapshotArgs, run_snapshot};
pub use template::{TemplateArgs, run_template};
pub use usage::{TeamsArgs, UsageArgs, run_teams, run_usage};

use crate::config::{DEFAULT_API_URL, default_data_dir};

/// Connection to a running server, for the client commands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the Alcove API.
    #[arg(long, env = "E2B_API_URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// API key (default: the `api-key` file in the data directory).
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the API's JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        api_client(
            &self.api_url,
            self.api_key.as_deref(),
            &self.data_dir.clone().unwrap_or_else(default_data_dir),
        )
    }
}

/// A client for `url` with `key`, else the `api-key` file in `data_dir` (the server's own).
pub fn api_client(
    url: &str,
    key: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<ApiClient> {
    let key = resolve_key(key, data_dir)?;
    Ok(ApiClient::new(url, &key)?)
}

/// `key`, else the `api-key` file in `data_dir` (the server's own admin key).
pub fn resolve_key(key: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<String> {
    Ok(match key {
        Some(k) => k.to_owned(),
        None => {
            let path = data_dir.join(alcove_api::API_KEY_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no API key: set E2B_API_KEY or --api-key (tried {})",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    })
}

/// `KEY=VALUE`, for `--metadata` and `--env`.
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

/// A JSON value as a table cell: strings bare, anything else as JSON.
fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// Left-aligned columns two spaces apart, under a header row.
pub(crate) fn table(
    out: &mut dyn Write,
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    )?;
    for r in rows {
        writeln!(out, "{}", line(r))?;
    }
    Ok(())
}
