//! [`EnvdClient`]: envd's process service reached through the server's sandbox proxy, exactly as
//! the SDKs reach it (the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers on the API's own address,
//! `X-Access-Token` for secure sandboxes), over HTTP/1.1 with Connect's binary framing; and
//! envd's `/files` and `filesystem.ListDir`. Behind `alcove client sandbox exec|shell` and the
//! MCP server's tools (`crates/mcp`).

use std::time::Duration;

use alcove_envd_proto::connect::{self, Codec, EnvelopeDecoder};
use alcove_envd_proto::filesystem as fs;
/// The filesystem service's message types ([`EnvdClient::list_dir`]'s entries).
pub use alcove_envd_proto::filesystem;
use alcove_envd_proto::process as pb;
/// The process service's message types, for building a [`pb::StartRequest`].
pub use alcove_envd_proto::process;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The port envd serves on in the guest (E2B's), which the proxy routes to.
pub use alcove_guest_contract::ENVD_PORT;

/// Largest single Connect message accepted from the sandbox.
const MAX_MESSAGE: usize = 8 << 20;
/// Bound on unary calls (input, resize) and on opening the stream.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("could not reach the server")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("{op} timed out")]
    Timeout { op: &'static str },
    #[error("{op}: the sandbox answered {status}: {message}")]
    Status {
        op: &'static str,
        status: u16,
        message: String,
    },
    #[error("{op}: reading the response")]
    Read {
        op: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("{op}: the answer is larger than {limit} bytes")]
    TooLarge { op: &'static str, limit: usize },
    #[error("{op}: malformed response from the sandbox: {detail}")]
    Protocol { op: &'static str, detail: String },
}

/// One sandbox's envd, as one user (the sandbox's default user when `None`).
pub struct EnvdClient {
    base: String,
    sandbox_id: String,
    token: Option<String>,
    user: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// What a process produced, as it arrives.
pub enum Output {
    Started(u32),
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    Ended {
        exit_code: i32,
        error: Option<String>,
    },
}

impl EnvdClient {
    /// `base` is the server's URL; `token` the sandbox's `envdAccessToken` (secure sandboxes).
    pub fn new(base: &str, sandbox_id: &str, token: Option<String>, user: Option<String>) -> Self {
        EnvdClient {
            base: base.trim_end_matches('/').to_owned(),
            sandbox_id: sandbox_id.to_owned(),
            token,
            user,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn request(&self, method: &str, content_type: &str, body: Bytes) -> http::Request<Full<Bytes>> {
        self.request_to(
            "POST",
            &format!("/process.Process/{method}"),
            content_type,
            body,
        )
    }

    /// A request to `path` (already encoded) on the sandbox's envd, with the routing, token and
    /// user headers every envd call carries.
    fn request_to(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> http::Request<Full<Bytes>> {
        use base64::Engine;
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .header("connect-protocol-version", "1")
            .header("E2b-Sandbox-Id", &self.sandbox_id)
            .header("E2b-Sandbox-Port", ENVD_PORT.to_string());
        if let Some(t) = &self.token {
            b = b.header("X-Access-Token", t);
        }
        if let Some(u) = &self.user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
            b = b.header("authorization", format!("Basic {basic}"));
        }
        b.body(Full::new(body)).expect("valid request")
    }

    async fn unary<Req>(&self, op: &'static str, method: &str, msg: &Req) -> Result<(), EnvdError>
    where
        Req: prost::Message + serde::Serialize,
    {
        let req = self.request(method, "application/proto", Codec::Proto.encode(msg));
        self.send(op, req, MAX_MESSAGE).await.map(drop)
    }

    /// Sends `req` and reads its whole body (at most `limit` bytes); a non-2xx answer is
    /// [`EnvdError::Status`] with envd's message.
    async fn send(
        &self,
        op: &'static str,
        req: http::Request<Full<Bytes>>,
        limit: usize,
    ) -> Result<Bytes, EnvdError> {
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| EnvdError::Timeout { op })?
            .map_err(EnvdError::Connect)?;
        let status = resp.status();
        // A body past the limit is cut there: a sandbox must not make the host buffer without
        // bound.
        let body = http_body_util::Limited::new(resp.into_body(), limit);
        let body = tokio::time::timeout(CALL_TIMEOUT, body.collect())
            .await
            .map_err(|_| EnvdError::Timeout { op })?
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(source) => EnvdError::Read {
                    op,
                    source: *source,
                },
                Err(_) => EnvdError::TooLarge { op, limit },
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(status_error(op, status.as_u16(), &body));
        }
        Ok(body)
    }

    /// `filesystem.Filesystem/ListDir`: the entries under `path`, `depth` levels deep (1: the
    /// directory's own entries).
    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<fs::EntryInfo>, EnvdError> {
        const OP: &str = "filesystem.ListDir";
        let msg = fs::ListDirRequest {
            path: path.to_owned(),
            depth,
        };
        let req = self.request_to(
            "POST",
            "/filesystem.Filesystem/ListDir",
            "application/proto",
            Codec::Proto.encode(&msg),
        );
        let body = self.send(OP, req, MAX_MESSAGE).await?;
        let resp: fs::ListDirResponse =
            Codec::Proto
                .decode(&body)
                .map_err(|e| EnvdError::Protocol {
                    op: OP,
                    detail: e.to_string(),
                })?;
        Ok(resp.entries)
    }

    /// `GET /files`: a file's bytes, at most `limit` of them ([`EnvdError::TooLarge`] past it).
    pub async fn read_file(&self, path: &str, limit: usize) -> Result<Bytes, EnvdError> {
        let req = self.request_to(
            "GET",
            &format!("/files?path={}", crate::api::enc(path)),
            "application/octet-stream",
            Bytes::new(),
        );
        self.send("files.read", req, limit).await
    }

    /// `POST /files` with a raw body: writes (creates or replaces) the file, making its parent
    /// directories.
    pub async fn write_file(&self, path: &str, data: Bytes) -> Result<(), EnvdError> {
        let req = self.request_to(
            "POST",
            &format!("/files?path={}", crate::api::enc(path)),
            "application/octet-stream",
            data,
        );
        self.send("files.write", req, 64 << 10).await.map(drop)
    }

    /// `process.SendSignal`: SIGKILL (`kill`) or SIGTERM to the process `pid`.
    pub async fn signal(&self, pid: u32, kill: bool) -> Result<(), EnvdError> {
        let msg = pb::SendSignalRequest {
            process: Some(pb::ProcessSelector {
                selector: Some(pb::process_selector::Selector::Pid(pid)),
            }),
            signal: if kill {
                pb::Signal::Sigkill as i32
            } else {
                pb::Signal::Sigterm as i32
            },
        };
        self.unary("process.SendSignal", "SendSignal", &msg).await
    }

    /// Starts a process and calls `on_output` for every event until it ends.
    pub async fn start(
        &self,
        start: pb::StartRequest,
        mut on_output: impl FnMut(Output),
    ) -> Result<(), EnvdError> {
        const OP: &str = "process.Start";
        let body = connect::encode_message(Codec::Proto, &start);
        let req = self.request("Start", "application/connect+proto", body);
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| EnvdError::Timeout { op: OP })?
            .map_err(EnvdError::Connect)?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|source| EnvdError::Read { op: OP, source })?
                .to_bytes();
            return Err(status_error(OP, status.as_u16(), &bytes));
        }
        let mut dec = EnvelopeDecoder::new(MAX_MESSAGE);
        let mut ended = false;
        // The agent sends keepalives while a process is quiet, so a silent stream means the
        // sandbox or the connection is gone.
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(120), body.frame())
            .await
            .map_err(|_| EnvdError::Timeout { op: OP })?
        {
            let frame = frame.map_err(|source| EnvdError::Read { op: OP, source })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            dec.push(&data);
            while let Some(env) = dec.next_envelope().map_err(|e| EnvdError::Protocol {
                op: OP,
                detail: e.to_string(),
            })? {
                if env.is_end_stream() {
                    let end = env.end_stream().map_err(|e| EnvdError::Protocol {
                        op: OP,
                        detail: e.to_string(),
                    })?;
                    if let Some(err) = end.error {
                        return Err(EnvdError::Status {
                            op: OP,
                            status: err.code.http_status(),
                            message: err.message,
                        });
                    }
                    return if ended {
                        Ok(())
                    } else {
                        Err(EnvdError::Protocol {
                            op: OP,
                            detail: "the stream ended before the process did".into(),
                        })
                    };
                }
                let msg: pb::StartResponse =
                    Codec::Proto
                        .decode(&env.payload)
                        .map_err(|e| EnvdError::Protocol {
                            op: OP,
                            detail: e.to_string(),
                        })?;
                use pb::process_event::Event;
                use pb::process_event::data_event::Output as Data;
                match msg.event.and_then(|e| e.event) {
                    Some(Event::Start(s)) => on_output(Output::Started(s.pid)),
                    Some(Event::Data(d)) => match d.output {
                        Some(Data::Stdout(b)) => on_output(Output::Stdout(b)),
                        Some(Data::Stderr(b)) => on_output(Output::Stderr(b)),
                        Some(Data::Pty(b)) => on_output(Output::Pty(b)),
                        None => {}
                    },
                    Some(Event::End(e)) => {
                        ended = true;
                        on_output(Output::Ended {
                            exit_code: e.exit_code,
                            error: e.error,
                        });
                    }
                    _ => {}
                }
            }
        }
        if ended {
            Ok(())
        } else {
            Err(EnvdError::Protocol {
                op: OP,
                detail: "the connection closed before the process ended".into(),
            })
        }
    }

    pub async fn send_pty_input(&self, pid: u32, data: Vec<u8>) -> Result<(), EnvdError> {
        let msg = pb::SendInputRequest {
            process: Some(pb::ProcessSelector {
                selector: Some(pb::process_selector::Selector::Pid(pid)),
            }),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Pty(data.into())),
            }),
        };
        self.unary("process.SendInput", "SendInput", &msg).await
    }

    pub async fn resize(&self, pid: u32, rows: u16, cols: u16) -> Result<(), EnvdError> {
        let msg = pb::UpdateRequest {
            process: Some(pb::ProcessSelector {
                selector: Some(pb::process_selector::Selector::Pid(pid)),
            }),
            pty: Some(pb::Pty {
                size: Some(pb::pty::Size {
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                }),
            }),
        };
        self.unary("process.Update", "Update", &msg).await
    }
}

fn status_error(op: &'static str, status: u16, body: &[u8]) -> EnvdError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
    EnvdError::Status {
        op,
        status,
        message,
    }
}
