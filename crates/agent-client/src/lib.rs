//! Host-side client for alcove-agent, used by the node layer.
//!
//! The host connects to QEMU's unix socket for the `alcove.agent` virtio-serial port
//! ([`alcove_guest_contract::AGENT_CHANNEL`]) (or any
//! other byte stream reaching the agent) and hands the stream to [`AgentClient::connect`], which
//! runs the HTTP/2 (prior knowledge) handshake and spawns the connection task. On top of that:
//! typed `health`, `init` and `run` (process.Start over Connect, binary codec), and a raw
//! [`AgentClient::send`] passthrough the sandbox HTTP proxy uses for SDK traffic.
//!
//! Every await that crosses the channel is bounded by a timeout from [`Timeouts`]: the guest is
//! untrusted and may also simply be gone (paused, killed).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use alcove_envd_proto::connect::{self, Code, Codec, EnvelopeDecoder, ErrorBody, Framing};
use alcove_envd_proto::process::{self as pb, process_event, process_input, process_selector};

pub use alcove_envd_proto;

pub mod channel;
mod http_tunnel;
mod tunnel;

pub use http_tunnel::{OpenTunnel, PortClient, is_upgrade};
pub use tunnel::Tunnel;

/// Request body type of [`AgentClient::send`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type AgentBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest Connect message accepted from the agent.
const MAX_MESSAGE: usize = 16 << 20;
/// Largest body of a control answer (`/health`, `/init`): they carry at most an error message.
const MAX_CONTROL_BODY: usize = 64 << 10;
/// Largest header block accepted from the agent (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
const MAX_HEADER_LIST: u32 = 64 << 10;
/// Stdin is sent in pieces of this size (each a SendInput call).
const STDIN_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP/2 handshake with the agent")]
    Handshake(#[source] hyper::Error),
    #[error("timed out waiting for the agent ({0}); the guest may be paused, overloaded or gone")]
    Timeout(&'static str),
    #[error("send {0} to the agent")]
    Request(&'static str, #[source] hyper::Error),
    #[error("read the agent's response to {0}")]
    Body(&'static str, #[source] hyper::Error),
    #[error("the agent answered {op} with HTTP {status}: {message}")]
    Status {
        op: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("the agent failed {op} with {code}: {message}")]
    Rpc {
        op: &'static str,
        code: Code,
        message: String,
    },
    #[error("decode the agent's response to {0}")]
    Decode(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    #[error("{0}")]
    Pooled(&'static str, #[source] hyper_util::client::legacy::Error),
    /// Nothing listens on the port inside the guest (tunnel open).
    #[error("port {0} is not open inside the sandbox")]
    PortNotOpen(u16),
    #[error("the agent's stream for {0} ended before the process did")]
    StreamEnded(&'static str),
    /// The guest sent more than the host reads for this answer: a broken or hostile guest.
    #[error("the agent's answer to {op} exceeds {limit} bytes; the guest is misbehaving")]
    ResponseTooLarge { op: &'static str, limit: usize },
    #[error("build the request for {0}")]
    Build(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
}

/// Bounds on every wait that crosses the channel.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The HTTP/2 handshake.
    pub connect: Duration,
    /// From sending a request to its response headers, and reading small bodies.
    pub request: Duration,
    /// Longest silence on a process stream; the agent sends keepalives every `keepalive`.
    pub stream_idle: Duration,
    /// Keepalive interval asked of the agent for streams.
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(30),
            stream_idle: Duration::from_secs(45),
            keepalive: Duration::from_secs(10),
        }
    }
}

/// envd's /init body, plus Alcove's extensions (`hostname`, `entropy`, `sandboxId`): the guest
/// contract's, which the agent reads.
pub use alcove_guest_contract::InitRequest;

/// A command to run to completion.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: HashMap<String, String>,
    pub cwd: Option<String>,
    /// `root`, `user`, ...; None runs as the agent's default user.
    pub user: Option<String>,
    /// Written to the process's stdin, which is then closed. None: stdin is /dev/null.
    pub stdin: Option<Bytes>,
    /// The access token, once /init set one.
    pub access_token: Option<String>,
    /// Overall limit for the run; None waits as long as the stream stays alive.
    pub timeout: Option<Duration>,
    /// Bytes of stdout plus stderr kept; past it output is dropped and `truncated` set.
    /// 0 means the default (64 MiB).
    pub output_limit: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutput {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The exit code; -1 when the process was killed by a signal.
    pub exit_code: i32,
    /// True when the process exited on its own (false: a signal ended it).
    pub exited: bool,
    /// envd's status text: `exit status 1`, `signal: killed`, ...
    pub status: String,
    /// envd's error text, set for non-zero exits and signals.
    pub error: Option<String>,
    pub truncated: bool,
}

/// Who a Connect call runs as and the token it carries.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// `root`, `user`, ...; None: the agent's default user.
    pub user: Option<String>,
    pub access_token: Option<String>,
}

/// The messages of a server-streaming Connect call. Each wait is bounded by the stream-idle
/// timeout (the agent sends keepalives, so silence means trouble).
pub struct RpcStream<Resp> {
    op: &'static str,
    body: Incoming,
    decoder: EnvelopeDecoder,
    idle: Duration,
    done: bool,
    _marker: std::marker::PhantomData<fn() -> Resp>,
}

impl<Resp> RpcStream<Resp>
where
    Resp: prost::Message + Default + serde::de::DeserializeOwned,
{
    /// The next message; None once the stream ended cleanly.
    pub async fn next(&mut self) -> Option<Result<Resp, ClientError>> {
        if self.done {
            return None;
        }
        let r = self.next_inner().await;
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }

    async fn next_inner(&mut self) -> Option<Result<Resp, ClientError>> {
        let op = self.op;
        let envelope = loop {
            match self.decoder.next_envelope() {
                Ok(Some(e)) => break e,
                Ok(None) => {}
                Err(e) => return Some(Err(ClientError::Decode(op, Box::new(e)))),
            }
            let frame = match tokio::time::timeout(self.idle, self.body.frame()).await {
                Ok(f) => f,
                Err(_) => return Some(Err(ClientError::Timeout("stream went silent"))),
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Some(Err(ClientError::Body(op, e))),
                None => return Some(Err(ClientError::StreamEnded(op))),
            }
        };
        if envelope.is_end_stream() {
            return match envelope.end_stream() {
                Ok(end) => end
                    .error
                    .map(|ErrorBody { code, message }| Err(ClientError::Rpc { op, code, message })),
                Err(e) => Some(Err(ClientError::Decode(op, Box::new(e)))),
            };
        }
        Some(
            Codec::Proto
                .decode(&envelope.payload)
                .map_err(|e| ClientError::Decode(op, Box::new(e))),
        )
    }
}

/// A connection to one agent. Cheap to clone; all clones share the HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    sender: SendRequest<AgentBody>,
    timeouts: Timeouts,
}

impl AgentClient {
    /// Runs the HTTP/2 handshake over `io` and spawns the connection task (it ends when the
    /// stream closes or every clone of the client is dropped).
    pub async fn connect<IO>(io: IO, timeouts: Timeouts) -> Result<AgentClient, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(2 << 20)
            .initial_connection_window_size(8 << 20)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake(TokioIo::new(io));
        let (sender, conn) = tokio::time::timeout(timeouts.connect, handshake)
            .await
            .map_err(|_| ClientError::Timeout("HTTP/2 handshake"))?
            .map_err(ClientError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "agent connection ended");
            }
        });
        Ok(AgentClient { sender, timeouts })
    }

    /// Like [`AgentClient::connect`], over the agent's virtio-serial channel: stale bytes of the
    /// previous session are skipped up to the agent's session marker.
    pub async fn connect_channel<IO>(io: IO, timeouts: Timeouts) -> Result<AgentClient, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::connect(channel::SkipToSession::new(io), timeouts).await
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Whether the connection is still usable.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Forwards a request as is (SDK traffic from the proxy). The URI may be path-only; it is
    /// completed for HTTP/2. Waits up to the request timeout for the response head; the body is
    /// the caller's to read (and bound).
    pub async fn send(
        &self,
        mut req: Request<AgentBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        *req.uri_mut() = agent_uri(&path)?;
        // HTTP/1 framing headers have no meaning in HTTP/2 and make h2 reject the request.
        for h in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "host",
        ] {
            req.headers_mut().remove(h);
        }
        *req.version_mut() = http::Version::HTTP_2;
        self.request("request", req).await
    }

    async fn request(
        &self,
        op: &'static str,
        req: Request<AgentBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        let mut sender = self.sender.clone();
        let fut = async {
            sender
                .ready()
                .await
                .map_err(|e| ClientError::Request(op, e))?;
            sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Request(op, e))
        };
        tokio::time::timeout(self.timeouts.request, fut)
            .await
            .map_err(|_| ClientError::Timeout(op))?
    }

    /// Reads a whole answer of at most `limit` bytes within the request timeout.
    async fn read_small(
        &self,
        op: &'static str,
        resp: Response<Incoming>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), limit);
        let bytes = tokio::time::timeout(self.timeouts.request, body.collect())
            .await
            .map_err(|_| ClientError::Timeout(op))?
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ClientError::ResponseTooLarge { op, limit }
                } else {
                    ClientError::Decode(op, e)
                }
            })?
            .to_bytes();
        Ok((status, bytes))
    }

    /// `GET path` answered with a small body (the agent's `/metrics`): at most `limit` bytes,
    /// head and body each within the request timeout. Any status is returned to the caller.
    pub async fn get_small(
        &self,
        op: &'static str,
        path: &str,
        access_token: Option<&str>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let headers: Vec<(&str, String)> = access_token
            .map(|t| ("x-access-token", t.to_owned()))
            .into_iter()
            .collect();
        let req = build(Method::GET, path, &headers, empty())?;
        let resp = self.request(op, req).await?;
        self.read_small(op, resp, limit).await
    }

    /// `GET /health`: Ok when the agent answers 204.
    pub async fn health(&self) -> Result<(), ClientError> {
        let req = build(Method::GET, "/health", &[], empty())?;
        let resp = self.request("health", req).await?;
        let (status, body) = self.read_small("health", resp, MAX_CONTROL_BODY).await?;
        expect_status("health", status, StatusCode::NO_CONTENT, &body)
    }

    /// `POST /init`. `current_token` is needed to change anything once a token is set.
    pub async fn init(
        &self,
        init: &InitRequest,
        current_token: Option<&str>,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(init).map_err(|e| ClientError::Build("init", Box::new(e)))?;
        let mut headers = vec![(header::CONTENT_TYPE.as_str(), "application/json".to_owned())];
        if let Some(t) = current_token {
            headers.push(("x-access-token", t.to_owned()));
        }
        let req = build(Method::POST, "/init", &headers, full(body))?;
        let resp = self.request("init", req).await?;
        let (status, body) = self.read_small("init", resp, MAX_CONTROL_BODY).await?;
        expect_status("init", status, StatusCode::NO_CONTENT, &body)
    }

    /// Runs a command to completion through process.Start, feeding stdin if given.
    pub async fn run(&self, req: RunRequest) -> Result<RunOutput, ClientError> {
        match req.timeout {
            Some(t) => tokio::time::timeout(t, self.run_inner(req))
                .await
                .map_err(|_| ClientError::Timeout("run: the command's overall timeout"))?,
            None => self.run_inner(req).await,
        }
    }

    async fn run_inner(&self, req: RunRequest) -> Result<RunOutput, ClientError> {
        const OP: &str = "process.Start";
        let start = pb::StartRequest {
            process: Some(pb::ProcessConfig {
                cmd: req.cmd.clone(),
                args: req.args.clone(),
                envs: req.envs.clone(),
                cwd: req.cwd.clone(),
            }),
            pty: None,
            tag: None,
            stdin: Some(req.stdin.is_some()),
        };
        let opts = CallOptions {
            user: req.user.clone(),
            access_token: req.access_token.clone(),
        };
        let mut stream: RpcStream<pb::StartResponse> = self
            .server_stream(OP, "/process.Process/Start", &start, &opts)
            .await?;
        let limit = if req.output_limit == 0 {
            64 << 20
        } else {
            req.output_limit
        };
        let mut out = RunOutput::default();
        let mut stdin_task: Option<tokio::task::JoinHandle<Result<(), ClientError>>> = None;
        loop {
            let msg = match stream.next().await {
                Some(m) => m?,
                None => return Err(ClientError::StreamEnded(OP)),
            };
            let Some(event) = msg.event.and_then(|e| e.event) else {
                continue;
            };
            match event {
                process_event::Event::Start(s) => {
                    out.pid = s.pid;
                    if let Some(data) = req.stdin.clone() {
                        let client = self.clone();
                        let opts = opts.clone();
                        stdin_task = Some(tokio::spawn(async move {
                            client.feed_stdin(s.pid, data, &opts).await
                        }));
                    }
                }
                process_event::Event::Data(d) => {
                    let (is_stderr, bytes) = match d.output {
                        Some(process_event::data_event::Output::Stdout(b)) => (false, b),
                        Some(process_event::data_event::Output::Stderr(b)) => (true, b),
                        Some(process_event::data_event::Output::Pty(b)) => (false, b),
                        None => continue,
                    };
                    let room = limit.saturating_sub(out.stdout.len() + out.stderr.len());
                    if bytes.len() > room {
                        out.truncated = true;
                    }
                    let take = bytes.len().min(room);
                    let buf = if is_stderr {
                        &mut out.stderr
                    } else {
                        &mut out.stdout
                    };
                    buf.extend_from_slice(&bytes[..take]);
                }
                process_event::Event::End(end) => {
                    out.exit_code = end.exit_code;
                    out.exited = end.exited;
                    out.status = end.status;
                    out.error = end.error;
                    if let Some(t) = stdin_task {
                        // The process ended; whatever stdin was not taken no longer matters,
                        // but a failure to deliver it is worth reporting if it ended cleanly.
                        t.abort();
                    }
                    return Ok(out);
                }
                process_event::Event::Keepalive(_) => {}
            }
        }
    }

    async fn feed_stdin(
        &self,
        pid: u32,
        data: Bytes,
        opts: &CallOptions,
    ) -> Result<(), ClientError> {
        let selector = Some(pb::ProcessSelector {
            selector: Some(process_selector::Selector::Pid(pid)),
        });
        for piece in data.chunks(STDIN_CHUNK) {
            let req = pb::SendInputRequest {
                process: selector.clone(),
                input: Some(pb::ProcessInput {
                    input: Some(process_input::Input::Stdin(data.slice_ref(piece))),
                }),
            };
            let _: pb::SendInputResponse = self
                .unary(
                    "process.SendInput",
                    "/process.Process/SendInput",
                    &req,
                    opts,
                )
                .await?;
        }
        let req = pb::CloseStdinRequest { process: selector };
        let _: pb::CloseStdinResponse = self
            .unary(
                "process.CloseStdin",
                "/process.Process/CloseStdin",
                &req,
                opts,
            )
            .await?;
        Ok(())
    }

    /// A server-streaming Connect call with the binary codec; the agent is asked for keepalives.
    pub async fn server_stream<Req, Resp>(
        &self,
        op: &'static str,
        path: &str,
        msg: &Req,
        opts: &CallOptions,
    ) -> Result<RpcStream<Resp>, ClientError>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + serde::de::DeserializeOwned,
    {
        let headers = rpc_headers(
            &opts.user,
            &opts.access_token,
            Framing::Streaming,
            Some(self.timeouts.keepalive),
        );
        let body = connect::encode_message(Codec::Proto, msg);
        let req = build(Method::POST, path, &headers, full(body))?;
        let resp = self.request(op, req).await?;
        if resp.status() != StatusCode::OK {
            let (status, body) = self.read_small(op, resp, MAX_MESSAGE).await?;
            return Err(status_error(op, status, &body));
        }
        Ok(RpcStream {
            op,
            body: resp.into_body(),
            decoder: EnvelopeDecoder::new(MAX_MESSAGE),
            idle: self.timeouts.stream_idle,
            done: false,
            _marker: std::marker::PhantomData,
        })
    }

    /// A unary Connect call with the binary codec.
    pub async fn unary<Req, Resp>(
        &self,
        op: &'static str,
        path: &str,
        msg: &Req,
        opts: &CallOptions,
    ) -> Result<Resp, ClientError>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + serde::de::DeserializeOwned,
    {
        let headers = rpc_headers(&opts.user, &opts.access_token, Framing::Unary, None);
        let req = build(Method::POST, path, &headers, full(Codec::Proto.encode(msg)))?;
        let resp = self.request(op, req).await?;
        let (status, body) = self.read_small(op, resp, MAX_MESSAGE).await?;
        if status != StatusCode::OK {
            return Err(status_error(op, status, &body));
        }
        Codec::Proto
            .decode(&body)
            .map_err(|e| ClientError::Decode(op, Box::new(e)))
    }
}

fn agent_uri(path: &str) -> Result<Uri, ClientError> {
    format!("http://agent{path}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::Build("request URI", Box::new(e)))
}

fn build(
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: AgentBody,
) -> Result<Request<AgentBody>, ClientError> {
    let mut b = Request::builder().method(method).uri(agent_uri(path)?);
    for (k, v) in headers {
        let v = HeaderValue::from_str(v)
            .map_err(|e| ClientError::Build("request header", Box::new(e)))?;
        b = b.header(*k, v);
    }
    b.body(body)
        .map_err(|e| ClientError::Build("request", Box::new(e)))
}

fn rpc_headers(
    user: &Option<String>,
    token: &Option<String>,
    framing: Framing,
    keepalive: Option<Duration>,
) -> Vec<(&'static str, String)> {
    let mut h = vec![
        (
            "content-type",
            Codec::Proto.content_type(framing).to_owned(),
        ),
        ("connect-protocol-version", "1".to_owned()),
    ];
    if let Some(u) = user {
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
        h.push(("authorization", format!("Basic {v}")));
    }
    if let Some(t) = token {
        h.push(("x-access-token", t.clone()));
    }
    if let Some(k) = keepalive {
        h.push(("keepalive-ping-interval", k.as_secs().max(1).to_string()));
    }
    h
}

fn empty() -> AgentBody {
    full(Bytes::new())
}

fn full(b: impl Into<Bytes>) -> AgentBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn expect_status(
    op: &'static str,
    got: StatusCode,
    want: StatusCode,
    body: &[u8],
) -> Result<(), ClientError> {
    if got == want {
        Ok(())
    } else {
        Err(status_error(op, got, body))
    }
}

/// A Connect error body if there is one, else the HTTP status with the body's message.
fn status_error(op: &'static str, status: StatusCode, body: &[u8]) -> ClientError {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return ClientError::Rpc {
            op,
            code: e.code,
            message: e.message,
        };
    }
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    ClientError::Status {
        op,
        status,
        message,
    }
}

#[cfg(test)]
mod tests {
    //! Bounds against a fake agent that misbehaves: oversize and never-ending answers end in a
    //! clear error within the request timeout.

    use std::convert::Infallible;

    use super::*;

    /// A client connected to an in-process HTTP/2 server answering by path:
    /// `/big` a 1 MiB body, `/silent-head` never, `/silent-body` a head and then nothing,
    /// `/big-headers` 200 KiB of headers, `/ok` a small JSON body.
    async fn misbehaving_agent(request_timeout: Duration) -> AgentClient {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let body: AgentBody = match req.uri().path() {
                    "/big" => full(vec![b'x'; 1 << 20]),
                    "/silent-head" => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    "/silent-body" => {
                        let never = futures::stream::pending::<
                            Result<hyper::body::Frame<Bytes>, BoxError>,
                        >();
                        http_body_util::StreamBody::new(never).boxed_unsync()
                    }
                    "/big-headers" => {
                        let mut resp = Response::new(empty());
                        for i in 0..200 {
                            resp.headers_mut().insert(
                                http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                                HeaderValue::from_str(&"v".repeat(1024)).unwrap(),
                            );
                        }
                        return Ok::<_, Infallible>(resp);
                    }
                    _ => full(&b"{\"cpu_count\":2}"[..]),
                };
                Ok::<_, Infallible>(Response::new(body))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(theirs), svc)
                .await;
        });
        AgentClient::connect(
            ours,
            Timeouts {
                request: request_timeout,
                ..Timeouts::default()
            },
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn an_oversize_answer_is_refused() {
        let c = misbehaving_agent(Duration::from_secs(10)).await;
        let (status, body) = c.get_small("metrics", "/ok", None, 4096).await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"{\"cpu_count\":2}"[..])
        );
        match c.get_small("metrics", "/big", None, 64 << 10).await {
            Err(ClientError::ResponseTooLarge { op, limit }) => {
                assert_eq!((op, limit), ("metrics", 64 << 10))
            }
            other => panic!("expected ResponseTooLarge, got {other:?}"),
        }
        // Control answers get a much smaller bound than Connect messages.
        let req = build(Method::GET, "/big", &[], empty()).unwrap();
        let resp = c.request("health", req).await.unwrap();
        assert!(matches!(
            c.read_small("health", resp, MAX_CONTROL_BODY).await,
            Err(ClientError::ResponseTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_agent_times_out() {
        let limit = Duration::from_millis(300);
        let c = misbehaving_agent(limit).await;
        for path in ["/silent-head", "/silent-body"] {
            let r = c.get_small("metrics", path, None, 4096).await;
            assert!(
                matches!(r, Err(ClientError::Timeout("metrics"))),
                "{path}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversize_header_block_is_refused() {
        let c = misbehaving_agent(Duration::from_secs(10)).await;
        let r = c.get_small("metrics", "/big-headers", None, 4096).await;
        assert!(r.is_err(), "200 KiB of headers accepted: {r:?}");
    }
}
