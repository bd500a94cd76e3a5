//! [`AlcoveMcp`]: the [`ServerHandler`] — lists the tools and the file resource template, runs
//! tool calls through `ops` as the right key's [`Conn`], and reads `sandbox://` resources.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListResourceTemplatesResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, ResourceTemplate, ServerCapabilities, ServerConfig,
    Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};

use crate::conn::{Conn, Conns, Target, key_of};
use crate::error::ToolError;
use crate::ops;

/// The scheme of the file resources: `sandbox://{sandboxId}/{path}`.
pub const RESOURCE_SCHEME: &str = "sandbox://";

const INSTRUCTIONS: &str = "Alcove runs code in isolated Linux sandboxes (microVMs). Start with \
create_sandbox (no template: a Python code-interpreter sandbox), then run_command / run_code / \
read_file / write_file on its sandboxId. Use run_command with background: true for servers and \
get_url for their public URL. Kill sandboxes with kill_sandbox when done. Files are also \
resources at sandbox://{sandboxId}/{path}.";

/// The MCP server. Cheap to clone: the HTTP transport makes one per request.
#[derive(Clone)]
pub struct AlcoveMcp {
    conns: Arc<Conns>,
    tools: Arc<Vec<Tool>>,
}

impl AlcoveMcp {
    /// Every call as `key` (stdio).
    pub fn with_key(target: Target, key: &str) -> Result<Self, alcove_client::ClientError> {
        Ok(Self::new(Conns::Fixed(Arc::new(Conn::new(target, key)?))))
    }

    /// Every call as the key its HTTP request carried (`/mcp`).
    pub fn per_request_key(target: Target) -> Self {
        Self::new(Conns::PerKey {
            target,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn new(conns: Conns) -> Self {
        AlcoveMcp {
            conns: Arc::new(conns),
            tools: Arc::new(crate::tools::tool_list()),
        }
    }

    fn conn(&self, ctx: &RequestContext<RoleServer>) -> Result<Arc<Conn>, ToolError> {
        let key = ctx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| key_of(&p.headers));
        self.conns.for_key(key.as_deref())
    }

    /// Runs a tool; every failure becomes an `isError` result.
    pub async fn run_tool(
        &self,
        conn: &Conn,
        name: &str,
        args: Option<rmcp::model::JsonObject>,
    ) -> rmcp::model::CallToolResult {
        match ops::call(conn, name, args).await {
            Ok(r) => r,
            Err(e) => e.into_result(),
        }
    }
}

impl ServerHandler for AlcoveMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_resources()
                .enable_tools()
                .build(),
        )
        .with_server_info(Implementation::new("alcove", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    // No `get_tool`: the SDK would then check arguments against the schema and answer a
    // protocol error, which clients show opaquely. `tools::parse` checks them instead and
    // answers an `isError` result the model can read and act on.

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let name = request.name.to_string();
        let result = match self.conn(&context) {
            Ok(conn) => self.run_tool(&conn, &name, request.arguments).await,
            Err(e) => e.into_result(),
        };
        tracing::debug!(tool = %name, is_error = ?result.is_error, "tool call");
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        // Files are reached through the template; there is no fixed list.
        Ok(ListResourcesResult::with_all_items(Vec::new()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let t = ResourceTemplate::new(
            format!("{RESOURCE_SCHEME}{{sandboxId}}/{{+path}}"),
            "sandbox-file",
        )
        .with_title("A file in a sandbox")
        .with_description(
            "The content of a file in a running sandbox: text, or a base64 blob for binary \
             files (at most 4 MiB). path is absolute without its leading slash, e.g. \
             sandbox://<id>/home/user/notes.txt.",
        );
        Ok(ListResourceTemplatesResult::with_all_items(vec![t]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        // Resources have no error result: failures are protocol errors, with the same texts.
        let (id, path) = crate::tools::parse_resource_uri(&request.uri)
            .map_err(|m| ErrorData::invalid_params(m, None))?;
        let conn = self
            .conn(&context)
            .map_err(|e| ErrorData::invalid_params(e.message(), None))?;
        let data = ops::fetch_file(&conn, &id, &path, None, ops::MAX_RESOURCE_BYTES)
            .await
            .map_err(|e| ErrorData::resource_not_found(e.message(), None))?;
        Ok(ReadResourceResult::new(vec![ops::file_contents(&request.uri, &data)]).into())
    }
}
