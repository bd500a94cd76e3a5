//! `alcove mcp`: Alcove as an MCP server on stdio, for LLM clients (Claude Desktop, Cursor,
//! agent frameworks) that spawn it. Thin: finds the server and key as the client commands do,
//! then hands over to `alcove_mcp`. stdout carries the protocol; logs go to stderr.

use std::path::PathBuf;

use clap::Args;

use crate::config::{DEFAULT_API_URL, default_data_dir};

#[derive(Debug, Clone, Args)]
pub struct McpArgs {
    /// Base URL of the Alcove API the tools call.
    #[arg(long = "url", visible_alias = "api-url", env = "E2B_API_URL", default_value = DEFAULT_API_URL)]
    pub url: String,
    /// API key (default: the `api-key` file in the data directory).
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Where sandbox traffic goes, when a proxy splits it from the API (default: --url).
    #[arg(long, env = "E2B_SANDBOX_URL")]
    pub sandbox_url: Option<String>,
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

pub async fn run(args: McpArgs) -> anyhow::Result<()> {
    // An empty E2B_API_KEY (a config template left blank) means "not set", not "no key".
    let key = crate::client::resolve_key(
        args.api_key.as_deref().filter(|k| !k.trim().is_empty()),
        &args.data_dir.clone().unwrap_or_else(default_data_dir),
    )?;
    let target = alcove_mcp::Target::new(&args.url, args.sandbox_url.as_deref());
    tracing::info!(url = %target.api_url, "serving MCP on stdio");
    alcove_mcp::serve_stdio(target, &key).await?;
    Ok(())
}
