//! alcove-mcp: Alcove as a Model Context Protocol server, so an LLM client (Claude Desktop,
//! Cursor, an agent framework) drives sandboxes with tools.
//!
//! The server is a client of a running Alcove server: REST for the lifecycle, envd (through the
//! sandbox proxy) for commands and files, the code interpreter's `/execute` for `run_code`, all
//! via `alcove-client`. It never touches VMs itself, so the same code serves
//!
//! - `alcove mcp` (stdio): one user, one key, given by `--url`/`--api-key` or `E2B_API_URL`/
//!   `E2B_API_KEY` ([`serve_stdio`]);
//! - `/mcp` on `alcove server`'s own listener (Streamable HTTP, [`http_service`]): the caller's
//!   own key, already checked by the API's auth layer, is used for every call it makes against
//!   the server's REST API on loopback, so an MCP caller can do exactly what its key can.
//!
//! Layout: `tools` (the tool list: names, descriptions, input schemas, argument parsing and
//! validation), `handler` (the [`rmcp::ServerHandler`]: dispatch, resources), `ops` (one function
//! per tool), `conn` (clients per key, sandbox tokens, background commands), `error` (every
//! failure an LLM can cause as an `isError` tool result that says what to do next).

mod conn;
mod error;
mod handler;
mod ops;
mod tools;

use std::sync::Arc;

pub use conn::Target;
pub use error::ToolError;
pub use handler::AlcoveMcp;
pub use tools::{TOOL_NAMES, tool_list};

use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

/// The path `alcove server` serves the Streamable HTTP transport at.
pub const HTTP_PATH: &str = "/mcp";

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("invalid Alcove URL or key")]
    Client(#[source] alcove_client::ClientError),
    #[error("starting the MCP session on stdio")]
    Start(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the MCP session ended with an error")]
    Session(#[source] tokio::task::JoinError),
}

/// Serves MCP on stdin/stdout until the client closes it. Logs must go to stderr: stdout carries
/// the protocol.
pub async fn serve_stdio(target: Target, api_key: &str) -> Result<(), McpError> {
    let handler = AlcoveMcp::with_key(target, api_key).map_err(McpError::Client)?;
    let running = handler
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Start(Box::new(e)))?;
    running.waiting().await.map_err(McpError::Session)?;
    Ok(())
}

/// The Streamable HTTP transport as a tower service, for the server to mount at [`HTTP_PATH`]
/// behind its API-key check. Stateless (every POST carries one JSON-RPC message and gets its
/// answer as JSON), so no stream outlives its request and the listener's request deadlines
/// apply; background commands live in `target`'s per-key state, not in a session.
/// `max_body_bytes` is the REST API's own body limit.
pub fn http_service(
    target: Target,
    max_body_bytes: usize,
) -> StreamableHttpService<AlcoveMcp, NeverSessionManager> {
    let handler = AlcoveMcp::per_request_key(target);
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(max_body_bytes)
        // The API key is the gate: a rebinding page cannot send it. The server may be reached by
        // any name (`--domain`, a proxy in front), so the Host check would only get in the way.
        .disable_allowed_hosts();
    StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}
