//! `process.Process`: maps Connect calls onto the process table.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use futures::{Stream, StreamExt};

use alcove_envd_proto::connect::{Code, Framing};
use alcove_envd_proto::process::{
    self as pb, ProcessEvent, process_event, process_input, process_selector, stream_input_request,
};

use super::{Call, RpcError, call_user, error_response, stream_response, unary_response};
use crate::process::{Chunk, Item, ProcessError, ProcessHandle, Selector, StartSpec, Subscription};
use crate::state::{AgentState, Counters};

pub async fn handle(
    State(state): State<Arc<AgentState>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let mut call = match Call::from_request(req) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (codec, framing) = (call.codec, call.framing);
    match method.as_str() {
        "Start" => match start(&state, &mut call).await {
            Ok(events) => stream_response(codec, events),
            Err(e) => fail(&state, codec, framing, e),
        },
        "Connect" => match connect(&state, &mut call).await {
            Ok(events) => stream_response(codec, events),
            Err(e) => fail(&state, codec, framing, e),
        },
        "List" => {
            let r = async {
                call.message::<pb::ListRequest>().await?;
                Ok(pb::ListResponse {
                    processes: state.processes.list(),
                })
            }
            .await;
            respond(&state, codec, framing, r)
        }
        "SendInput" => {
            let r = send_input(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "StreamInput" => {
            let r = stream_input(&state, call).await;
            respond(&state, codec, framing, r)
        }
        "CloseStdin" => {
            let r = async {
                let req: pb::CloseStdinRequest = call.message().await?;
                let p = find_running(&state, req.process.as_ref())?;
                p.close_stdin().await.map_err(process_error)?;
                Ok(pb::CloseStdinResponse {})
            }
            .await;
            respond(&state, codec, framing, r)
        }
        "SendSignal" => {
            let r = async {
                let req: pb::SendSignalRequest = call.message().await?;
                let sig = match pb::Signal::try_from(req.signal) {
                    Ok(pb::Signal::Sigterm) => nix::sys::signal::Signal::SIGTERM,
                    Ok(pb::Signal::Sigkill) => nix::sys::signal::Signal::SIGKILL,
                    _ => {
                        return Err(RpcError::invalid_argument(
                            "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL",
                        ));
                    }
                };
                let p = find_running(&state, req.process.as_ref())?;
                p.signal(sig).map_err(process_error)?;
                Ok(pb::SendSignalResponse {})
            }
            .await;
            respond(&state, codec, framing, r)
        }
        "Update" => {
            let r = async {
                let req: pb::UpdateRequest = call.message().await?;
                let p = find_running(&state, req.process.as_ref())?;
                if let Some(size) = req.pty.and_then(|p| p.size) {
                    p.resize(clamp_u16(size.cols), clamp_u16(size.rows))
                        .map_err(process_error)?;
                }
                Ok(pb::UpdateResponse {})
            }
            .await;
            respond(&state, codec, framing, r)
        }
        other => error_response(
            codec,
            framing,
            RpcError::new(
                Code::Unimplemented,
                format!("process.Process/{other} does not exist"),
            ),
        ),
    }
}

fn respond<M: prost::Message + serde::Serialize + Send + 'static>(
    state: &AgentState,
    codec: alcove_envd_proto::connect::Codec,
    framing: Framing,
    r: Result<M, RpcError>,
) -> Response {
    if r.is_err() {
        Counters::inc(&state.counters.rpc_errors);
    }
    unary_response(codec, framing, r)
}

fn fail(
    state: &AgentState,
    codec: alcove_envd_proto::connect::Codec,
    framing: Framing,
    e: RpcError,
) -> Response {
    Counters::inc(&state.counters.rpc_errors);
    error_response(codec, framing, e)
}

fn clamp_u16(v: u32) -> u16 {
    v.min(u16::MAX as u32) as u16
}

pub fn process_error(e: ProcessError) -> RpcError {
    let code = match &e {
        ProcessError::CwdMissing(_) | ProcessError::Path(_) => Code::InvalidArgument,
        ProcessError::NotFound(_) => Code::NotFound,
        ProcessError::NoStdin | ProcessError::HasPty | ProcessError::NoPty => {
            Code::FailedPrecondition
        }
        ProcessError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Code::NotFound
        }
        ProcessError::Spawn { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Code::PermissionDenied
        }
        ProcessError::Spawn { .. } | ProcessError::Pty(_) | ProcessError::Resize { .. } => {
            Code::Internal
        }
        ProcessError::Input { .. } => Code::Unavailable,
        ProcessError::Signal { .. } => Code::Internal,
    };
    RpcError::from_error(code, &e)
}

fn selector(sel: Option<&pb::ProcessSelector>) -> Result<Selector<'_>, RpcError> {
    match sel.and_then(|s| s.selector.as_ref()) {
        Some(process_selector::Selector::Pid(p)) => Ok(Selector::Pid(*p)),
        Some(process_selector::Selector::Tag(t)) => Ok(Selector::Tag(t)),
        None => Err(RpcError::invalid_argument(
            "process selector (pid or tag) is required",
        )),
    }
}

fn find_running(
    state: &AgentState,
    sel: Option<&pb::ProcessSelector>,
) -> Result<Arc<ProcessHandle>, RpcError> {
    state
        .processes
        .find_running(selector(sel)?)
        .map_err(process_error)
}

async fn start(
    state: &Arc<AgentState>,
    call: &mut Call,
) -> Result<impl Stream<Item = Result<pb::StartResponse, RpcError>> + Send + 'static, RpcError> {
    let req: pb::StartRequest = call.message().await?;
    let user = call_user(state, call)?;
    let config = req
        .process
        .ok_or_else(|| RpcError::invalid_argument("process (cmd, args, envs, cwd) is required"))?;
    if config.cmd.is_empty() {
        return Err(RpcError::invalid_argument("process.cmd is empty"));
    }
    let defaults = state.defaults();
    let pty = req.pty.map(|p| {
        let s = p.size.unwrap_or_default();
        (clamp_u16(s.cols), clamp_u16(s.rows))
    });
    let spec = StartSpec {
        config,
        user,
        default_env: defaults.env_vars,
        default_workdir: defaults.workdir,
        tag: req.tag,
        pty,
        // Unset means open, for clients that predate the flag.
        stdin: req.stdin.unwrap_or(true),
    };
    let (handle, sub) = state.processes.start(spec).map_err(|e| {
        Counters::inc(&state.counters.spawn_failures);
        process_error(e)
    })?;
    Counters::inc(&state.counters.processes_started);
    Ok(events(handle.pid, sub, call.keepalive(), |event| {
        pb::StartResponse { event: Some(event) }
    }))
}

async fn connect(
    state: &Arc<AgentState>,
    call: &mut Call,
) -> Result<impl Stream<Item = Result<pb::ConnectResponse, RpcError>> + Send + 'static, RpcError> {
    let req: pb::ConnectRequest = call.message().await?;
    let handle = state
        .processes
        .find(selector(req.process.as_ref())?)
        .map_err(process_error)?;
    let sub = handle.output.subscribe_undelivered();
    Ok(events(handle.pid, sub, call.keepalive(), |event| {
        pb::ConnectResponse { event: Some(event) }
    }))
}

/// start, then data as it comes (keepalives while idle), then end.
fn events<R: Send + 'static>(
    pid: u32,
    sub: Subscription,
    keepalive: Duration,
    wrap: fn(ProcessEvent) -> R,
) -> impl Stream<Item = Result<R, RpcError>> + Send + 'static {
    let start = ProcessEvent {
        event: Some(process_event::Event::Start(process_event::StartEvent {
            pid,
        })),
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rest = futures::stream::unfold((sub, ticker), |(mut sub, mut ticker)| async move {
        let event = tokio::select! {
            item = sub.next() => match item? {
                Item::Data(chunk) => process_event::Event::Data(process_event::DataEvent {
                    output: Some(match chunk {
                        Chunk::Stdout(b) => process_event::data_event::Output::Stdout(b),
                        Chunk::Stderr(b) => process_event::data_event::Output::Stderr(b),
                        Chunk::Pty(b) => process_event::data_event::Output::Pty(b),
                    }),
                }),
                Item::End(end) => process_event::Event::End(end),
            },
            _ = ticker.tick() => process_event::Event::Keepalive(process_event::KeepAlive {}),
        };
        Some((ProcessEvent { event: Some(event) }, (sub, ticker)))
    });
    futures::stream::once(async move { start })
        .chain(rest)
        .map(move |e| Ok(wrap(e)))
}

async fn send_input(
    state: &AgentState,
    call: &mut Call,
) -> Result<pb::SendInputResponse, RpcError> {
    let req: pb::SendInputRequest = call.message().await?;
    let p = find_running(state, req.process.as_ref())?;
    write_input(&p, req.input).await?;
    Ok(pb::SendInputResponse {})
}

async fn write_input(p: &ProcessHandle, input: Option<pb::ProcessInput>) -> Result<(), RpcError> {
    match input.and_then(|i| i.input) {
        Some(process_input::Input::Stdin(b)) => p.write_stdin(&b).await.map_err(process_error),
        Some(process_input::Input::Pty(b)) => p.write_pty(&b).await.map_err(process_error),
        None => Ok(()),
    }
}

/// The first message picks the process; data messages follow in order.
async fn stream_input(state: &AgentState, call: Call) -> Result<pb::StreamInputResponse, RpcError> {
    let mut messages = Box::pin(call.messages::<pb::StreamInputRequest>());
    let mut target: Option<Arc<ProcessHandle>> = None;
    while let Some(msg) = messages.next().await {
        match msg?.event {
            Some(stream_input_request::Event::Start(s)) => {
                target = Some(find_running(state, s.process.as_ref())?);
            }
            Some(stream_input_request::Event::Data(d)) => {
                let p = target.as_ref().ok_or_else(|| {
                    RpcError::invalid_argument("send a start event naming the process first")
                })?;
                write_input(p, d.input).await?;
            }
            Some(stream_input_request::Event::Keepalive(_)) | None => {}
        }
    }
    Ok(pb::StreamInputResponse {})
}
