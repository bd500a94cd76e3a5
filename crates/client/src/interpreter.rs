//! [`InterpreterClient`]: the code interpreter's `POST /execute` (guest port 49999) through the
//! server's sandbox proxy, as `e2b-code-interpreter` calls it, with its NDJSON stream folded into
//! one [`Execution`]. Behind the MCP server's `run_code` tool.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

pub use alcove_guest_contract::CODE_INTERPRETER_PORT;

/// Largest one NDJSON line (a result with a big PNG) and the whole stream's bound.
const MAX_LINE: usize = 16 << 20;
const MAX_TOTAL: usize = 64 << 20;
/// Bound on opening the request (the proxy answers at once for an unknown sandbox).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum InterpreterError {
    #[error("could not reach the server")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("the code did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the sandbox answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("reading the response")]
    Read(#[source] hyper::Error),
    #[error("the interpreter's output passed {0} bytes")]
    TooLarge(usize),
    #[error("malformed output from the interpreter: {0}")]
    Protocol(String),
}

/// What a cell produced: output streams, rich results (the interpreter's JSON objects, `png`
/// as base64 among them) and the error, if it raised one.
#[derive(Debug, Default, Clone)]
pub struct Execution {
    pub stdout: String,
    pub stderr: String,
    pub results: Vec<Value>,
    /// `{name, value, traceback}`.
    pub error: Option<Value>,
    /// Whether `end_of_execution` arrived.
    pub finished: bool,
}

impl Execution {
    /// Folds one NDJSON line of `/execute` into the execution.
    pub fn push_line(&mut self, line: &[u8]) -> Result<(), InterpreterError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let v: Value =
            serde_json::from_slice(line).map_err(|e| InterpreterError::Protocol(e.to_string()))?;
        let text = || v.get("text").and_then(Value::as_str).unwrap_or_default();
        match v.get("type").and_then(Value::as_str) {
            Some("stdout") => self.stdout.push_str(text()),
            Some("stderr") => self.stderr.push_str(text()),
            Some("result") => self.results.push(v),
            Some("error") => self.error = Some(v),
            Some("end_of_execution") => self.finished = true,
            _ => {}
        }
        Ok(())
    }
}

pub struct InterpreterClient {
    base: String,
    sandbox_id: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl InterpreterClient {
    /// `base` is the server's URL; `token` the sandbox's `envdAccessToken`.
    pub fn new(base: &str, sandbox_id: &str, token: Option<String>) -> Self {
        InterpreterClient {
            base: base.trim_end_matches('/').to_owned(),
            sandbox_id: sandbox_id.to_owned(),
            token,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Runs `code` in `language`'s default context (Python when `None`), waiting at most
    /// `timeout` for the cell; past it the request is dropped, which interrupts the kernel.
    pub async fn execute(
        &self,
        code: &str,
        language: Option<&str>,
        timeout: Duration,
    ) -> Result<Execution, InterpreterError> {
        let mut body = json!({ "code": code });
        if let Some(l) = language {
            body["language"] = json!(l);
        }
        let mut b = http::Request::builder()
            .method("POST")
            .uri(format!("{}/execute", self.base))
            .header("content-type", "application/json")
            .header("E2b-Sandbox-Id", &self.sandbox_id)
            .header("E2b-Sandbox-Port", CODE_INTERPRETER_PORT.to_string());
        if let Some(t) = &self.token {
            b = b.header("X-Access-Token", t);
        }
        let req = b
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid request");
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = tokio::time::timeout(OPEN_TIMEOUT.min(timeout), self.http.request(req))
            .await
            .map_err(|_| InterpreterError::Timeout(timeout))?
            .map_err(InterpreterError::Connect)?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = http_body_util::Limited::new(body, 64 << 10)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(500).collect());
            return Err(InterpreterError::Status {
                status: status.as_u16(),
                message,
            });
        }
        let mut exec = Execution::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut total = 0usize;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(InterpreterError::Timeout(timeout)),
                Ok(None) => break,
                Ok(Some(f)) => f.map_err(InterpreterError::Read)?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len();
            if total > MAX_TOTAL {
                return Err(InterpreterError::TooLarge(MAX_TOTAL));
            }
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                exec.push_line(&line)?;
            }
            if pending.len() > MAX_LINE {
                return Err(InterpreterError::TooLarge(MAX_LINE));
            }
        }
        exec.push_line(&pending)?;
        Ok(exec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines_fold_into_an_execution() {
        let mut e = Execution::default();
        for l in [
            r#"{"type":"number_of_executions","execution_count":1}"#,
            r#"{"type":"stdout","text":"a\n","timestamp":1}"#,
            r#"{"type":"stderr","text":"w\n","timestamp":1}"#,
            r#"{"type":"result","text":"2","is_main_result":true}"#,
            r#"{"type":"error","name":"ValueError","value":"x","traceback":"tb"}"#,
            r#"{"type":"end_of_execution"}"#,
            "",
        ] {
            e.push_line(l.as_bytes()).unwrap();
        }
        assert_eq!(e.stdout, "a\n");
        assert_eq!(e.stderr, "w\n");
        assert_eq!(e.results.len(), 1);
        assert_eq!(e.error.unwrap()["name"], "ValueError");
        assert!(e.finished);
        assert!(Execution::default().push_line(b"{not json").is_err());
    }
}
