//! [`ToolError`]: every failure a tool call can meet, turned into an `isError` tool result whose
//! text says what went wrong and what to do next. None of these is a protocol error: an LLM
//! reads tool results, while clients show protocol errors opaquely.

use alcove_client::{ClientError, EnvdError, InterpreterError};
use rmcp::model::{CallToolResult, ContentBlock};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments for {tool}: {detail}")]
    InvalidArguments { tool: String, detail: String },
    #[error("unknown tool {0}")]
    UnknownTool(String),
    #[error("no API key on this request")]
    NoKey,
    #[error("the Alcove API refused the call")]
    Api(#[source] ClientError),
    #[error("{action} failed")]
    Envd {
        action: String,
        #[source]
        source: EnvdError,
    },
    #[error("running the code failed")]
    Interpreter(#[source] InterpreterError),
    #[error("no background command {pid} in sandbox {sandbox}")]
    NoSuchCommand { sandbox: String, pid: u32 },
    #[error("too many background commands")]
    TooManyBackground { limit: usize },
    #[error("file too large")]
    FileTooLarge { path: String, limit: usize },
}

impl ToolError {
    pub fn api(e: ClientError) -> Self {
        ToolError::Api(e)
    }

    pub fn envd(action: impl Into<String>, source: EnvdError) -> Self {
        ToolError::Envd {
            action: action.into(),
            source,
        }
    }

    pub fn invalid(tool: &str, detail: impl Into<String>) -> Self {
        ToolError::InvalidArguments {
            tool: tool.to_owned(),
            detail: detail.into(),
        }
    }

    /// The text an LLM reads: what happened, then what to do.
    pub fn message(&self) -> String {
        match self {
            ToolError::InvalidArguments { tool, detail } => format!(
                "Invalid arguments for {tool}: {detail}. Fix the arguments (see the tool's input \
                 schema) and call it again."
            ),
            ToolError::UnknownTool(name) => format!(
                "There is no tool named '{name}'. Available tools: {}.",
                crate::tools::TOOL_NAMES.join(", ")
            ),
            ToolError::NoKey => "This MCP connection carries no Alcove API key. Reconnect with \
                 the key in the X-API-KEY header (or Authorization: Bearer <key>)."
                .into(),
            ToolError::Api(e) => api_message(e),
            ToolError::Envd { action, source } => envd_message(action, source),
            ToolError::Interpreter(e) => interpreter_message(e),
            ToolError::NoSuchCommand { sandbox, pid } => format!(
                "There is no background command with pid {pid} in sandbox {sandbox} (this MCP \
                 server only knows the ones it started with run_command background: true, and \
                 forgets them when the sandbox is killed). Start it again with run_command."
            ),
            ToolError::TooManyBackground { limit } => format!(
                "{limit} background commands are still running. Wait for or kill some with \
                 command_status (action 'wait' or 'kill') before starting another."
            ),
            ToolError::FileTooLarge { path, limit } => format!(
                "{path} is larger than {limit} bytes, more than this tool returns. Read part of \
                 it with run_command (e.g. `head -c 100000 {path}` or `tail -n 200 {path}`)."
            ),
        }
    }

    pub fn into_result(self) -> CallToolResult {
        tracing::debug!(error = %self, "tool call failed");
        CallToolResult::error(vec![ContentBlock::text(self.message())])
    }
}

fn api_message(e: &ClientError) -> String {
    match e {
        ClientError::Api { status, message } => {
            let next = match *status {
                400 => "Fix the arguments and call again.",
                401 | 403 => {
                    "The Alcove API key was refused: check E2B_API_KEY / --api-key (or the key \
                     this MCP connection sends)."
                }
                404 => {
                    "It does not exist (or no longer does): call list_sandboxes to see the live \
                     sandboxes, or create_sandbox for a new one."
                }
                409 => "Call list_sandboxes to see the sandbox's state, then pick the right tool.",
                429 => {
                    "A limit of this server was reached: kill sandboxes you no longer need \
                     (kill_sandbox) and try again."
                }
                502 => {
                    "The sandbox is not running: resume it with resume_sandbox if it is paused, \
                     otherwise create a new one."
                }
                504 => "The server timed out: try again.",
                s if s >= 500 => {
                    "The server failed: try again; if it keeps failing, the operator should read \
                     the server's log."
                }
                _ => "",
            };
            format!("The Alcove server answered {status}: {message} {next}")
                .trim_end()
                .to_owned()
        }
        ClientError::Connect { url, .. } => format!(
            "Could not reach the Alcove server at {url}. Is it running (`alcove server`)? Check \
             E2B_API_URL / --url, then try again."
        ),
        ClientError::Timeout => {
            "The Alcove server did not answer in time. Try again; a create or resume can take \
             tens of seconds on a busy host."
                .into()
        }
        ClientError::Url(u) => format!(
            "'{u}' is not a usable Alcove URL: it must be plain http://host:port. Fix \
             E2B_API_URL / --url."
        ),
        ClientError::Read(_) | ClientError::NotJson(_) => {
            "The Alcove server's answer could not be read. Try again.".into()
        }
    }
}

fn envd_message(action: &str, e: &EnvdError) -> String {
    match e {
        EnvdError::Status {
            status, message, ..
        } => {
            let next = match *status {
                400 => {
                    "Check the arguments (paths must be absolute or relative to the user's home)."
                }
                401 | 403 => {
                    "The sandbox refused the access: the user may lack permission on that path."
                }
                404 => "No such file or directory: check the path with list_files.",
                409 => {
                    "The path exists with another type (e.g. a directory where a file was expected)."
                }
                502 => {
                    "The sandbox is not running (killed, expired or paused): check list_sandboxes; \
                     resume_sandbox if paused, otherwise create a new sandbox."
                }
                507 => {
                    "The sandbox's disk is full: delete files with run_command, or use a new sandbox."
                }
                _ => "Try again.",
            };
            format!("{action} failed: the sandbox answered {status}: {message}. {next}")
        }
        EnvdError::TooLarge { limit, .. } => format!(
            "{action} failed: the answer is larger than {limit} bytes. Ask for less (e.g. use \
             run_command with head or tail)."
        ),
        EnvdError::Timeout { .. } => {
            format!("{action} timed out: the sandbox did not answer in time. Try again.")
        }
        EnvdError::Connect(_) => format!(
            "{action} failed: could not reach the Alcove server's sandbox proxy. Is the server \
             running? Try again."
        ),
        EnvdError::Read { .. } | EnvdError::Protocol { .. } => format!(
            "{action} failed: the connection to the sandbox broke ({e}). Check the sandbox with \
             list_sandboxes and try again."
        ),
    }
}

fn interpreter_message(e: &InterpreterError) -> String {
    match e {
        InterpreterError::Status {
            status: 502,
            message,
        } => format!(
            "The code interpreter could not be reached: {message}. The sandbox must be a \
             'code-interpreter-v1' sandbox (create_sandbox without a template makes one) and \
             running; otherwise use run_command with `python3 -c ...`."
        ),
        InterpreterError::Status { status, message } => format!(
            "The code interpreter answered {status}: {message}. Fix the request and try again."
        ),
        InterpreterError::Timeout(d) => format!(
            "The code did not finish within {} s and was interrupted (the kernel keeps its \
             state). Raise timeoutSeconds, or run long jobs with run_command background: true.",
            d.as_secs()
        ),
        InterpreterError::TooLarge(n) => format!(
            "The code's output passed {n} bytes and was cut off. Print less, or write results \
             to a file and read part of it."
        ),
        InterpreterError::Connect(_) => "Could not reach the Alcove server's sandbox proxy. Is \
             the server running? Try again."
            .into(),
        InterpreterError::Read(_) | InterpreterError::Protocol(_) => format!(
            "The connection to the code interpreter broke ({e}). Check the sandbox with \
             list_sandboxes and try again."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, message: &str) -> ToolError {
        ToolError::Api(ClientError::Api {
            status,
            message: message.into(),
        })
    }

    #[test]
    fn an_unknown_sandbox_points_at_list_sandboxes() {
        let m = api(404, "Sandbox x was not found").message();
        assert!(m.contains("404"), "{m}");
        assert!(m.contains("Sandbox x was not found"), "{m}");
        assert!(m.contains("list_sandboxes"), "{m}");
    }

    #[test]
    fn each_status_says_what_to_do_next() {
        assert!(api(429, "limit").message().contains("kill_sandbox"));
        assert!(api(502, "not running").message().contains("resume_sandbox"));
        assert!(api(401, "bad key").message().contains("E2B_API_KEY"));
        assert!(api(500, "boom").message().contains("try again"));
        let e = ToolError::envd(
            "reading /nope",
            EnvdError::Status {
                op: "files.read",
                status: 404,
                message: "no such file".into(),
            },
        );
        let m = e.message();
        assert!(m.starts_with("reading /nope failed"), "{m}");
        assert!(m.contains("list_files"), "{m}");
    }

    #[test]
    fn an_error_is_a_tool_result_not_a_protocol_error() {
        let r = ToolError::UnknownTool("nope".into()).into_result();
        assert_eq!(r.is_error, Some(true));
        let text = r.content[0].as_text().unwrap().text.clone();
        assert!(text.contains("run_command"), "{text}");
    }

    #[test]
    fn a_timed_out_cell_says_how_to_go_on() {
        let m =
            ToolError::Interpreter(InterpreterError::Timeout(std::time::Duration::from_secs(5)))
                .message();
        assert!(m.contains("5 s") && m.contains("timeoutSeconds"), "{m}");
    }
}
