//! The aggregate: one MCP client per stdio server, and one MCP server handler in front of them.
//!
//! Each requested server is a child process spoken to over stdio (rmcp's client). Its tools are
//! listed once at start and exposed under their own names; a name two servers share is exposed as
//! `<server>__<tool>` for both, so no call can reach the wrong server. A tool call is routed to its
//! server with the original name and its result passed through unchanged. Children are killed
//! when the gateway is dropped, and exit on their own when its end of their stdin closes.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ErrorData as McpError, RoleClient, RoleServer, ServerHandler, ServiceExt};
use tokio::io::AsyncReadExt;

use crate::catalog::ServerSpec;

/// How long a server may take to start and answer `initialize` and `tools/list`. The Python
/// servers spend about 10 s of CPU building the `mcp` package's models at import under QEMU's
/// emulation (no KVM), and several times that when the host is busy, so the margin is wide; the
/// SDK's command does not wait this long (see [`crate::READY_WAIT`]).
pub const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one tool call may take before the caller gets a timeout result.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// The end of a server's stderr kept for error messages.
const STDERR_TAIL: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("MCP server `{server}` could not be started ({program})")]
    Spawn {
        server: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("MCP server `{server}` did not answer within {}s{}", START_TIMEOUT.as_secs(), stderr_note(.stderr))]
    Timeout { server: String, stderr: String },
    #[error("MCP server `{server}` failed to start: {detail}{}", stderr_note(.stderr))]
    Handshake {
        server: String,
        detail: String,
        stderr: String,
    },
}

fn stderr_note(s: &str) -> String {
    if s.trim().is_empty() {
        String::new()
    } else {
        format!("; its stderr ends with: {}", s.trim())
    }
}

/// The last bytes a child wrote to stderr (also logged line by line).
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(bytes);
        let extra = q.len().saturating_sub(STDERR_TAIL);
        q.drain(..extra);
    }
    fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let v: Vec<u8> = q.iter().copied().collect();
        String::from_utf8_lossy(&v).into_owned()
    }
}

struct Upstream {
    name: String,
    service: RunningService<RoleClient, ()>,
}

/// Where the gateway is in its start, as requests see it (a `tokio::sync::watch` value).
#[derive(Clone)]
pub enum Phase {
    /// The servers are starting; requests wait.
    Starting,
    /// Every server answered; requests are served.
    Ready(Arc<Gateway>),
    /// A server failed to start: the reason, for every request (the gateway serves nothing else).
    Failed(Arc<str>),
}

/// The running servers and the routing table of their tools.
pub struct Gateway {
    upstreams: Vec<Upstream>,
    tools: Vec<Tool>,
    /// Exposed name → (index in `upstreams`, the server's own name for the tool).
    routes: HashMap<String, (usize, String)>,
}

impl Gateway {
    /// Starts every server (in parallel) and lists their tools. Any failure stops them all and
    /// names the server that failed, with the end of its stderr.
    pub async fn start(specs: &[ServerSpec]) -> Result<Gateway, StartError> {
        let started = futures::future::join_all(specs.iter().map(start_one)).await;
        let mut upstreams = Vec::new();
        let mut listed = Vec::new();
        let mut first_err = None;
        for r in started {
            match r {
                Ok((u, tools)) => {
                    upstreams.push(u);
                    listed.push(tools);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            for u in upstreams {
                let _ = tokio::time::timeout(Duration::from_secs(5), u.service.cancel()).await;
            }
            return Err(e);
        }
        let (tools, routes) = route(&upstreams, listed);
        Ok(Gateway {
            upstreams,
            tools,
            routes,
        })
    }

    /// The tools as exposed, in server order.
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// Server names, in start order.
    pub fn servers(&self) -> Vec<&str> {
        self.upstreams.iter().map(|u| u.name.as_str()).collect()
    }

    async fn call(&self, req: CallToolRequestParams) -> Result<CallToolResponse, McpError> {
        let Some((idx, original)) = self.routes.get(req.name.as_ref()) else {
            return Err(McpError::invalid_params(
                format!(
                    "unknown tool `{}`: call tools/list for the tools this gateway serves",
                    req.name.chars().take(128).collect::<String>()
                ),
                None,
            ));
        };
        let up = &self.upstreams[*idx];
        let mut fwd = CallToolRequestParams::new(original.clone());
        fwd.arguments = req.arguments;
        fwd.meta = req.meta;
        fwd.input_responses = req.input_responses;
        fwd.request_state = req.request_state;
        match tokio::time::timeout(CALL_TIMEOUT, up.service.peer().call_tool_once(fwd)).await {
            Ok(Ok(r)) => Ok(r),
            // The server's own JSON-RPC error (bad arguments...): passed through as it said it.
            Ok(Err(rmcp::ServiceError::McpError(e))) => Err(e),
            Ok(Err(e)) => Ok(tool_error(format!(
                "MCP server `{}` did not complete the call ({e}); if it exited, start a new sandbox with the same mcp config",
                up.name
            ))),
            Err(_) => Ok(tool_error(format!(
                "MCP server `{}` did not answer within {}s; the call was abandoned",
                up.name,
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Stops every server: closes its stdin, waits briefly, then kills it.
    pub async fn shutdown(self) {
        for u in self.upstreams {
            let _ = tokio::time::timeout(Duration::from_secs(5), u.service.cancel()).await;
        }
    }
}

fn tool_error(text: String) -> CallToolResponse {
    CallToolResponse::Complete(CallToolResult::error(vec![ContentBlock::text(text)]))
}

/// Builds the exposed tool list: own names where unique, `<server>__<tool>` where shared.
fn route(
    upstreams: &[Upstream],
    listed: Vec<Vec<Tool>>,
) -> (Vec<Tool>, HashMap<String, (usize, String)>) {
    let mut count: HashMap<String, usize> = HashMap::new();
    for t in listed.iter().flatten() {
        *count.entry(t.name.to_string()).or_default() += 1;
    }
    let mut tools = Vec::new();
    let mut routes = HashMap::new();
    for (idx, list) in listed.into_iter().enumerate() {
        for mut t in list {
            let original = t.name.to_string();
            let exposed = if count[&original] > 1 {
                format!("{}__{}", upstreams[idx].name, original)
            } else {
                original.clone()
            };
            if routes.contains_key(&exposed) {
                // Only possible when a server itself lists one name twice: the first wins.
                tracing::warn!(tool = %exposed, "duplicate tool name dropped");
                continue;
            }
            t.name = exposed.clone().into();
            routes.insert(exposed, (idx, original));
            tools.push(t);
        }
    }
    (tools, routes)
}

async fn start_one(spec: &ServerSpec) -> Result<(Upstream, Vec<Tool>), StartError> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .current_dir("/")
        .kill_on_drop(true);
    let (transport, stderr) = TokioChildProcess::builder(cmd)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| StartError::Spawn {
            server: spec.name.clone(),
            program: spec.program.clone(),
            source,
        })?;
    let tail = Tail::default();
    if let Some(mut err) = stderr {
        let (tail, name) = (tail.clone(), spec.name.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.push(&buf[..n]);
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    tracing::info!(server = %name, "{line}");
                }
            }
        });
    }
    let handshake = async {
        let service = ().serve(transport).await.map_err(|e| e.to_string())?;
        let tools = service
            .peer()
            .list_all_tools()
            .await
            .map_err(|e| format!("tools/list failed: {e}"))?;
        Ok::<_, String>((service, tools))
    };
    let (service, tools) = match tokio::time::timeout(START_TIMEOUT, handshake).await {
        Ok(Ok(v)) => v,
        Ok(Err(detail)) => {
            // Let the child's last words reach the tail before they are quoted.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Err(StartError::Handshake {
                server: spec.name.clone(),
                detail,
                stderr: tail.text(),
            });
        }
        Err(_) => {
            return Err(StartError::Timeout {
                server: spec.name.clone(),
                stderr: tail.text(),
            });
        }
    };
    tracing::info!(server = %spec.name, tools = tools.len(), "MCP server started");
    Ok((
        Upstream {
            name: spec.name.clone(),
            service,
        },
        tools,
    ))
}

/// The MCP server side: one per HTTP request (stateless), all sharing the gateway.
#[derive(Clone)]
pub struct Handler(pub Arc<Gateway>);

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions(format!(
                "Alcove's MCP gateway in this sandbox, serving the tools of: {}.",
                self.0.servers().join(", ")
            ));
        info.server_info = Implementation::new("alcove-mcp-gateway", env!("CARGO_PKG_VERSION"));
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.0.tools.clone()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        self.0.call(request).await
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.0.tools.iter().find(|t| t.name == name).cloned()
    }
}
