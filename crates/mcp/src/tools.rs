//! The tools as an LLM sees them (name, description, JSON schema of the input) and their
//! arguments as Rust types, parsed and validated before any call leaves this process.

use std::collections::BTreeMap;
use std::sync::Arc;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::ToolError;

/// The template a sandbox gets when `create_sandbox` names none: it runs `run_code`.
pub const DEFAULT_TEMPLATE: &str = "code-interpreter-v1";
/// `run_command`'s default and largest timeout.
pub const DEFAULT_COMMAND_SECS: u64 = 60;
pub const MAX_COMMAND_SECS: u64 = 3600;
/// `run_code`'s default and largest timeout.
pub const DEFAULT_CODE_SECS: u64 = 120;
pub const MAX_CODE_SECS: u64 = 3600;
/// Largest file `write_file` sends (the content is in the JSON-RPC message already).
pub const MAX_WRITE_BYTES: usize = 16 << 20;
/// Largest `fork_sandbox` count (the API's own bound).
pub const MAX_FORKS: u32 = 100;

pub const TOOL_NAMES: &[&str] = &[
    "create_sandbox",
    "list_sandboxes",
    "kill_sandbox",
    "run_command",
    "command_status",
    "run_code",
    "read_file",
    "write_file",
    "list_files",
    "get_url",
    "pause_sandbox",
    "resume_sandbox",
    "snapshot_sandbox",
    "fork_sandbox",
];

fn sandbox_id_schema() -> Value {
    json!({
        "type": "string",
        "description": "The sandbox's id, as create_sandbox or list_sandboxes returned it."
    })
}

fn schema(properties: Value, required: &[&str]) -> Arc<JsonObject> {
    let v = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("a JSON object literal"),
    }
}

fn tool(
    name: &'static str,
    description: &'static str,
    input: Arc<JsonObject>,
    annotations: ToolAnnotations,
) -> Tool {
    let mut t = Tool::new(name, description, input);
    t.annotations = Some(annotations);
    t
}

fn hints(read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations {
    ToolAnnotations::from_raw(
        None,
        Some(read_only),
        Some(destructive),
        Some(idempotent),
        Some(false),
    )
}

/// Every tool, in [`TOOL_NAMES`] order.
pub fn tool_list() -> Vec<Tool> {
    vec![
        tool(
            "create_sandbox",
            "Create a new isolated Linux sandbox (a microVM) and return its sandboxId, which every \
             other tool takes. With no template it is a 'code-interpreter-v1' sandbox (Python with \
             numpy, pandas, matplotlib; run_code works on it); 'base' is a plain Debian system. \
             The sandbox is killed automatically after timeoutSeconds (default: the server's, \
             usually 300 s); kill it with kill_sandbox when done. Returns JSON with sandboxId \
             and templateId. On error (unknown template, limit reached) the message \
             says what to change.",
            schema(
                json!({
                    "template": {"type": "string", "description": "Template id or alias (e.g. 'base', 'code-interpreter-v1'), or a snapshot id or name to start from. Default: code-interpreter-v1."},
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "description": "Lifetime in seconds before the sandbox is killed automatically."},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "description": "String key/value labels, shown by list_sandboxes and usable to filter it."},
                    "envs": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Environment variables every command and code cell in the sandbox sees."},
                    "internet": {"type": "boolean", "description": "Whether the sandbox may reach the internet (default true). False blocks all outbound traffic."},
                    "allowedDomains": {"type": "array", "items": {"type": "string"}, "description": "If set, outbound traffic is allowed only to these domains (e.g. 'pypi.org', '*.github.com'); everything else is blocked."}
                }),
                &[],
            ),
            hints(false, false, false),
        ),
        tool(
            "list_sandboxes",
            "List this API key's running and paused sandboxes: sandboxId, templateId, state, \
             metadata, start and end time. Use it to find a sandbox id or check a sandbox's state.",
            schema(
                json!({
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Only sandboxes whose metadata has all these key/value pairs."}
                }),
                &[],
            ),
            hints(true, false, true),
        ),
        tool(
            "kill_sandbox",
            "Kill a sandbox now: its processes, files and memory are gone for good (snapshots \
             taken from it stay). Returns a confirmation.",
            schema(json!({"sandboxId": sandbox_id_schema()}), &["sandboxId"]),
            hints(false, true, true),
        ),
        tool(
            "run_command",
            "Run a shell command (bash -l -c) in a sandbox and return its exit code, stdout and \
             stderr. A non-zero exit code is reported as an error result carrying the output. \
             The command is killed after timeoutSeconds (default 60). For servers and other \
             long-running work set background: true: it returns at once with a pid; then use \
             command_status with that pid to read output, wait for it or kill it. Output is \
             capped at the newest 1 MiB per stream.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "command": {"type": "string", "description": "The command line, run by bash (pipes, redirections and && work)."},
                    "cwd": {"type": "string", "description": "Working directory (default: the user's home, /home/user)."},
                    "envs": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Extra environment variables for this command."},
                    "user": {"type": "string", "description": "Run as this user: 'user' (default) or 'root'."},
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": MAX_COMMAND_SECS, "description": "Kill the command after this many seconds (default 60). Ignored with background: true."},
                    "background": {"type": "boolean", "description": "Start the command and return its pid at once instead of waiting for it."}
                }),
                &["sandboxId", "command"],
            ),
            hints(false, true, false),
        ),
        tool(
            "command_status",
            "Follow a command started with run_command background: true. action 'read' returns \
             the output produced since the previous read and whether it has exited; 'wait' waits \
             up to timeoutSeconds for it to exit, then does the same; 'kill' sends SIGKILL and \
             returns the last output.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "pid": {"type": "integer", "minimum": 1, "description": "The pid run_command returned."},
                    "action": {"type": "string", "enum": ["read", "wait", "kill"], "description": "read (default), wait or kill."},
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": MAX_COMMAND_SECS, "description": "How long 'wait' waits (default 60)."}
                }),
                &["sandboxId", "pid"],
            ),
            hints(false, false, false),
        ),
        tool(
            "run_code",
            "Run code in a sandbox's stateful code interpreter (a Jupyter kernel: variables and \
             imports persist between calls) and return stdout, stderr, the cell's results (the \
             last expression's value as text) and, for matplotlib figures, the chart as a PNG \
             image. An exception is returned as an error result with its name, message and \
             traceback. Needs a 'code-interpreter-v1' sandbox (the create_sandbox default).",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "code": {"type": "string", "description": "The code of one cell."},
                    "language": {"type": "string", "description": "python (default), bash or r."},
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": MAX_CODE_SECS, "description": "Interrupt the cell after this many seconds (default 120); the kernel keeps its state."}
                }),
                &["sandboxId", "code"],
            ),
            hints(false, true, false),
        ),
        tool(
            "read_file",
            "Read a file in a sandbox. Returns its text (UTF-8), or for binary files a base64 \
             blob. Files over 1 MiB are refused: read part of them with run_command (head, \
             tail). The same file is also the resource sandbox://{sandboxId}/{path}.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "path": {"type": "string", "description": "Absolute path, or relative to the user's home."},
                    "user": {"type": "string", "description": "Read as this user: 'user' (default) or 'root'."}
                }),
                &["sandboxId", "path"],
            ),
            hints(true, false, true),
        ),
        tool(
            "write_file",
            "Write a file in a sandbox, creating parent directories and replacing any existing \
             file. Content is UTF-8 text, or base64 with encoding: 'base64'. Returns the path \
             and size written.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "path": {"type": "string", "description": "Absolute path, or relative to the user's home."},
                    "content": {"type": "string", "description": "The file's content."},
                    "encoding": {"type": "string", "enum": ["utf8", "base64"], "description": "How content is encoded (default utf8)."},
                    "user": {"type": "string", "description": "Write as this user: 'user' (default) or 'root'."}
                }),
                &["sandboxId", "path", "content"],
            ),
            hints(false, true, true),
        ),
        tool(
            "list_files",
            "List a directory in a sandbox: each entry's name, path, type (file, dir, symlink) \
             and size. depth > 1 lists subdirectories too.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "path": {"type": "string", "description": "Directory path (default: the user's home)."},
                    "depth": {"type": "integer", "minimum": 1, "maximum": 10, "description": "How many levels to list (default 1)."}
                }),
                &["sandboxId"],
            ),
            hints(true, false, true),
        ),
        tool(
            "get_url",
            "Return the public URL of a port in a sandbox, for a server you started there (e.g. \
             `python3 -m http.server 8000` with run_command background: true). The server must \
             listen on 0.0.0.0 or the sandbox's address, not only 127.0.0.1.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "The TCP port the server listens on in the sandbox."}
                }),
                &["sandboxId", "port"],
            ),
            hints(true, false, true),
        ),
        tool(
            "pause_sandbox",
            "Pause a running sandbox: its memory, processes and files are saved and it stops \
             using CPU and its lifetime stops counting. resume_sandbox brings it back exactly as \
             it was.",
            schema(json!({"sandboxId": sandbox_id_schema()}), &["sandboxId"]),
            hints(false, false, true),
        ),
        tool(
            "resume_sandbox",
            "Resume a paused sandbox (same id, processes and files as when paused), with a fresh \
             lifetime of timeoutSeconds.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "description": "New lifetime in seconds (default: the server's)."}
                }),
                &["sandboxId"],
            ),
            hints(false, false, true),
        ),
        tool(
            "snapshot_sandbox",
            "Save a running sandbox's whole state (memory, processes, files) as a snapshot; the \
             sandbox goes on running. Returns the snapshot id: create_sandbox with that id as \
             template starts new sandboxes from it.",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "name": {"type": "string", "description": "Optional name for the snapshot, usable as create_sandbox's template."}
                }),
                &["sandboxId"],
            ),
            hints(false, false, false),
        ),
        tool(
            "fork_sandbox",
            "Fork a running sandbox into count new sandboxes, each an exact copy of its current \
             state (memory, processes, files) that then goes its own way; the original goes on \
             running. Returns the new sandboxIds (and an error for any child that could not \
             start).",
            schema(
                json!({
                    "sandboxId": sandbox_id_schema(),
                    "count": {"type": "integer", "minimum": 1, "maximum": MAX_FORKS, "description": "How many copies (default 1)."},
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "description": "Lifetime of each copy in seconds (default: the server's)."}
                }),
                &["sandboxId"],
            ),
            hints(false, false, false),
        ),
    ]
}

// ---- Arguments -----------------------------------------------------------------------------

/// Parses a tool's arguments (`None`: no arguments, read as `{}`), naming the tool on failure.
pub fn parse<T: DeserializeOwned>(tool: &str, args: Option<JsonObject>) -> Result<T, ToolError> {
    let v = Value::Object(args.unwrap_or_default());
    serde_json::from_value(v).map_err(|e| ToolError::invalid(tool, e.to_string()))
}

/// A sandbox id as the API makes them: short, letters, digits, `-` and `_`.
pub fn check_sandbox_id(tool: &str, id: &str) -> Result<(), ToolError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ToolError::invalid(
            tool,
            format!(
                "sandboxId '{}' is not a sandbox id (ids are letters, digits, '-' and '_'; \
                 list_sandboxes shows them)",
                id.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(())
}

fn check_secs(tool: &str, secs: Option<u64>, max: u64) -> Result<(), ToolError> {
    match secs {
        Some(0) => Err(ToolError::invalid(
            tool,
            "timeoutSeconds must be at least 1",
        )),
        Some(s) if s > max => Err(ToolError::invalid(
            tool,
            format!("timeoutSeconds must be at most {max}"),
        )),
        _ => Ok(()),
    }
}

fn check_user(tool: &str, user: &Option<String>) -> Result<(), ToolError> {
    match user.as_deref() {
        None | Some("user") | Some("root") => Ok(()),
        Some(u)
            if !u.is_empty()
                && u.len() <= 32
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Ok(())
        }
        Some(_) => Err(ToolError::invalid(
            tool,
            "user must be a user name such as 'user' or 'root'",
        )),
    }
}

fn check_path(tool: &str, path: &str) -> Result<(), ToolError> {
    if path.is_empty() {
        return Err(ToolError::invalid(tool, "path must not be empty"));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(ToolError::invalid(
            tool,
            "path must be at most 4096 bytes, with no NUL",
        ));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateArgs {
    pub template: Option<String>,
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub internet: Option<bool>,
    pub allowed_domains: Option<Vec<String>>,
}

impl CreateArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "create_sandbox";
        if let Some(t) = &self.template
            && (t.trim().is_empty() || t.len() > 256)
        {
            return Err(ToolError::invalid(
                T,
                "template must be a template id or alias (leave it out for code-interpreter-v1)",
            ));
        }
        if self.timeout_seconds == Some(0) {
            return Err(ToolError::invalid(T, "timeoutSeconds must be at least 1"));
        }
        if self.internet == Some(false)
            && self.allowed_domains.as_ref().is_some_and(|d| !d.is_empty())
        {
            return Err(ToolError::invalid(
                T,
                "internet: false blocks everything, so allowedDomains would never apply; \
                 leave internet out (or true) to allow only those domains",
            ));
        }
        if let Some(d) = &self.allowed_domains
            && let Some(bad) = d
                .iter()
                .find(|d| d.is_empty() || d.len() > 253 || d.contains(['/', ' ', ':']))
        {
            return Err(ToolError::invalid(
                T,
                format!(
                    "allowedDomains entry '{bad}' is not a domain name (e.g. 'pypi.org', '*.github.com')"
                ),
            ));
        }
        Ok(())
    }

    /// The `POST /v2/sandboxes` body.
    pub fn body(&self) -> Value {
        let mut b = json!({
            "templateID": self.template.as_deref().map(str::trim).unwrap_or(DEFAULT_TEMPLATE),
            "metadata": self.metadata,
            "envVars": self.envs,
        });
        if let Some(t) = self.timeout_seconds {
            b["timeout"] = json!(t);
        }
        if let Some(i) = self.internet {
            b["allow_internet_access"] = json!(i);
        }
        if let Some(d) = &self.allowed_domains
            && !d.is_empty()
        {
            // E2B's form of an allow-list: allow these, deny everything else.
            b["network"] = json!({"allowOut": d, "denyOut": ["0.0.0.0/0"]});
        }
        b
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListArgs {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxArgs {
    pub sandbox_id: String,
}

impl SandboxArgs {
    pub fn validate(&self, tool: &str) -> Result<(), ToolError> {
        check_sandbox_id(tool, &self.sandbox_id)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandArgs {
    pub sandbox_id: String,
    pub command: String,
    pub cwd: Option<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub user: Option<String>,
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub background: bool,
}

impl CommandArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "run_command";
        check_sandbox_id(T, &self.sandbox_id)?;
        if self.command.trim().is_empty() {
            return Err(ToolError::invalid(T, "command must not be empty"));
        }
        if self.command.len() > 1 << 20 {
            return Err(ToolError::invalid(
                T,
                "command is longer than 1 MiB; write a script with write_file and run that",
            ));
        }
        if let Some(c) = &self.cwd {
            check_path(T, c)?;
        }
        check_user(T, &self.user)?;
        check_secs(T, self.timeout_seconds, MAX_COMMAND_SECS)
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StatusAction {
    #[default]
    Read,
    Wait,
    Kill,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusArgs {
    pub sandbox_id: String,
    pub pid: u32,
    #[serde(default)]
    pub action: StatusAction,
    pub timeout_seconds: Option<u64>,
}

impl StatusArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "command_status";
        check_sandbox_id(T, &self.sandbox_id)?;
        check_secs(T, self.timeout_seconds, MAX_COMMAND_SECS)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeArgs {
    pub sandbox_id: String,
    pub code: String,
    pub language: Option<String>,
    pub timeout_seconds: Option<u64>,
}

impl CodeArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "run_code";
        check_sandbox_id(T, &self.sandbox_id)?;
        if self.code.len() > 1 << 20 {
            return Err(ToolError::invalid(
                T,
                "code is longer than 1 MiB; write it to a file with write_file and run that",
            ));
        }
        if let Some(l) = &self.language
            && (l.is_empty() || l.len() > 32)
        {
            return Err(ToolError::invalid(
                T,
                "language must be e.g. python, bash or r",
            ));
        }
        check_secs(T, self.timeout_seconds, MAX_CODE_SECS)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadArgs {
    pub sandbox_id: String,
    pub path: String,
    pub user: Option<String>,
}

impl ReadArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "read_file";
        check_sandbox_id(T, &self.sandbox_id)?;
        check_path(T, &self.path)?;
        check_user(T, &self.user)
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteArgs {
    pub sandbox_id: String,
    pub path: String,
    pub content: String,
    #[serde(default)]
    pub encoding: Encoding,
    pub user: Option<String>,
}

impl WriteArgs {
    /// Validates and returns the bytes to write.
    pub fn bytes(&self) -> Result<Vec<u8>, ToolError> {
        const T: &str = "write_file";
        check_sandbox_id(T, &self.sandbox_id)?;
        check_path(T, &self.path)?;
        check_user(T, &self.user)?;
        let data = match self.encoding {
            Encoding::Utf8 => self.content.as_bytes().to_vec(),
            Encoding::Base64 => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(self.content.trim())
                    .map_err(|e| {
                        ToolError::invalid(T, format!("content is not valid base64: {e}"))
                    })?
            }
        };
        if data.len() > MAX_WRITE_BYTES {
            return Err(ToolError::invalid(
                T,
                format!("content is larger than {MAX_WRITE_BYTES} bytes; write it in parts"),
            ));
        }
        Ok(data)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListFilesArgs {
    pub sandbox_id: String,
    pub path: Option<String>,
    pub depth: Option<u32>,
}

impl ListFilesArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "list_files";
        check_sandbox_id(T, &self.sandbox_id)?;
        if let Some(p) = &self.path {
            check_path(T, p)?;
        }
        match self.depth {
            Some(0) | Some(11..) => Err(ToolError::invalid(T, "depth must be 1 to 10")),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlArgs {
    pub sandbox_id: String,
    pub port: u32,
}

impl UrlArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "get_url";
        check_sandbox_id(T, &self.sandbox_id)?;
        if self.port == 0 || self.port > 65535 {
            return Err(ToolError::invalid(T, "port must be 1 to 65535"));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResumeArgs {
    pub sandbox_id: String,
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotArgs {
    pub sandbox_id: String,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkArgs {
    pub sandbox_id: String,
    pub count: Option<u32>,
    pub timeout_seconds: Option<u64>,
}

impl ForkArgs {
    pub fn validate(&self) -> Result<(), ToolError> {
        const T: &str = "fork_sandbox";
        check_sandbox_id(T, &self.sandbox_id)?;
        match self.count {
            Some(0) => Err(ToolError::invalid(T, "count must be at least 1")),
            Some(n) if n > MAX_FORKS => Err(ToolError::invalid(
                T,
                format!("count must be at most {MAX_FORKS}"),
            )),
            _ => check_secs(T, self.timeout_seconds, u64::MAX),
        }
    }
}

/// `sandbox://{sandboxId}/{path}` → (sandbox id, absolute path).
pub fn parse_resource_uri(uri: &str) -> Result<(String, String), String> {
    let rest = uri
        .strip_prefix(crate::handler::RESOURCE_SCHEME)
        .ok_or_else(|| {
            format!("'{uri}' is not a sandbox:// URI; use sandbox://{{sandboxId}}/{{path}}")
        })?;
    let (id, path) = rest
        .split_once('/')
        .ok_or_else(|| format!("'{uri}' names no file; use sandbox://{{sandboxId}}/{{path}}"))?;
    check_sandbox_id("resources/read", id).map_err(|e| e.message())?;
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| format!("the path in '{uri}' is not UTF-8 once decoded"))?;
    if path.is_empty() {
        return Err(format!(
            "'{uri}' names no file; use sandbox://{{sandboxId}}/{{path}}"
        ));
    }
    check_path("resources/read", &path).map_err(|e| e.message())?;
    Ok((id.to_owned(), format!("/{}", path.trim_start_matches('/'))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Option<JsonObject> {
        match v {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    #[test]
    fn every_tool_is_listed_with_an_object_schema_and_a_description() {
        let tools = tool_list();
        let names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
        assert_eq!(names, TOOL_NAMES);
        for t in &tools {
            assert_eq!(t.input_schema["type"], "object", "{}", t.name);
            assert!(t.description.as_ref().unwrap().len() > 60, "{}", t.name);
            for (p, s) in t.input_schema["properties"].as_object().unwrap() {
                assert!(s.get("description").is_some(), "{}.{p}", t.name);
            }
            for r in t.input_schema["required"].as_array().unwrap() {
                assert!(
                    t.input_schema["properties"]
                        .get(r.as_str().unwrap())
                        .is_some()
                );
            }
        }
    }

    #[test]
    fn unknown_and_mistyped_arguments_are_refused_naming_the_tool() {
        let e = parse::<CommandArgs>(
            "run_command",
            obj(json!({"sandboxId": "a", "command": "ls", "colour": 1})),
        )
        .unwrap_err();
        let m = e.message();
        assert!(m.contains("run_command") && m.contains("colour"), "{m}");
        let e = parse::<CommandArgs>("run_command", obj(json!({"sandboxId": "a"}))).unwrap_err();
        assert!(e.message().contains("command"), "{}", e.message());
        let e =
            parse::<UrlArgs>("get_url", obj(json!({"sandboxId": "a", "port": "80"}))).unwrap_err();
        assert!(e.message().contains("get_url"));
        // No arguments read as {}.
        assert!(parse::<ListArgs>("list_sandboxes", None).is_ok());
    }

    #[test]
    fn sandbox_ids_paths_and_timeouts_are_checked() {
        assert!(check_sandbox_id("t", "i6x3k2abc").is_ok());
        for bad in ["", "../etc", "a/b", "a b", &"x".repeat(200)] {
            assert!(check_sandbox_id("t", bad).is_err(), "{bad}");
        }
        let a = |v: Value| parse::<CommandArgs>("run_command", obj(v)).unwrap();
        assert!(
            a(json!({"sandboxId": "s", "command": "ls"}))
                .validate()
                .is_ok()
        );
        assert!(
            a(json!({"sandboxId": "s", "command": "  "}))
                .validate()
                .is_err()
        );
        assert!(
            a(json!({"sandboxId": "s", "command": "ls", "timeoutSeconds": 0}))
                .validate()
                .is_err()
        );
        assert!(
            a(json!({"sandboxId": "s", "command": "ls", "timeoutSeconds": 999999}))
                .validate()
                .is_err()
        );
        assert!(
            a(json!({"sandboxId": "s", "command": "ls", "user": "r;m"}))
                .validate()
                .is_err()
        );
        let w = |v: Value| parse::<WriteArgs>("write_file", obj(v)).unwrap();
        assert_eq!(
            w(json!({"sandboxId": "s", "path": "/a", "content": "aGk=", "encoding": "base64"}))
                .bytes()
                .unwrap(),
            b"hi"
        );
        assert!(
            w(json!({"sandboxId": "s", "path": "/a", "content": "!!", "encoding": "base64"}))
                .bytes()
                .is_err()
        );
        assert!(
            w(json!({"sandboxId": "s", "path": "", "content": ""}))
                .bytes()
                .is_err()
        );
        let f = |v: Value| parse::<ForkArgs>("fork_sandbox", obj(v)).unwrap();
        assert!(f(json!({"sandboxId": "s", "count": 0})).validate().is_err());
        assert!(
            f(json!({"sandboxId": "s", "count": 101}))
                .validate()
                .is_err()
        );
        assert!(f(json!({"sandboxId": "s"})).validate().is_ok());
        let u = |v: Value| parse::<UrlArgs>("get_url", obj(v)).unwrap();
        assert!(u(json!({"sandboxId": "s", "port": 0})).validate().is_err());
        assert!(
            u(json!({"sandboxId": "s", "port": 70000}))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn create_defaults_to_the_code_interpreter_and_maps_the_network_options() {
        let c = parse::<CreateArgs>("create_sandbox", None).unwrap();
        c.validate().unwrap();
        let b = c.body();
        assert_eq!(b["templateID"], DEFAULT_TEMPLATE);
        assert!(b.get("timeout").is_none() && b.get("network").is_none());
        let c = parse::<CreateArgs>(
            "create_sandbox",
            obj(json!({"template": "base", "timeoutSeconds": 60, "internet": false, "metadata": {"k": "v"}})),
        )
        .unwrap();
        c.validate().unwrap();
        let b = c.body();
        assert_eq!(b["templateID"], "base");
        assert_eq!(b["timeout"], 60);
        assert_eq!(b["allow_internet_access"], false);
        assert_eq!(b["metadata"]["k"], "v");
        let c = parse::<CreateArgs>(
            "create_sandbox",
            obj(json!({"allowedDomains": ["pypi.org"]})),
        )
        .unwrap();
        assert_eq!(
            c.body()["network"],
            json!({"allowOut": ["pypi.org"], "denyOut": ["0.0.0.0/0"]})
        );
        let bad = parse::<CreateArgs>(
            "create_sandbox",
            obj(json!({"internet": false, "allowedDomains": ["pypi.org"]})),
        )
        .unwrap();
        assert!(bad.validate().is_err());
        let bad = parse::<CreateArgs>(
            "create_sandbox",
            obj(json!({"allowedDomains": ["http://x.org/"]})),
        )
        .unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn resource_uris_name_a_sandbox_and_an_absolute_path() {
        assert_eq!(
            parse_resource_uri("sandbox://abc/home/user/a%20b.txt").unwrap(),
            ("abc".into(), "/home/user/a b.txt".into())
        );
        assert!(parse_resource_uri("file:///etc/passwd").is_err());
        assert!(parse_resource_uri("sandbox://abc").is_err());
        assert!(parse_resource_uri("sandbox://abc/").is_err());
        assert!(parse_resource_uri("sandbox://a$c/x").is_err());
    }
}
