//! Run traces from sandbox traffic: what the proxy sees of calls to a sandbox's agent becomes
//! audit events (`docs/audit.md`), written when each call ends.
//!
//! * `process.Process/Start`: the command, arguments, working directory, user and the names
//!   (never values) of the env vars asked for, then from the answer's stream the pid, bytes of
//!   output and how it ended (exit code, signal, or the caller leaving before the end). A W3C
//!   `traceparent` header on the call is passed to the process as `TRACEPARENT`, so an agent's
//!   own spans nest under the caller's trace.
//! * `filesystem.Filesystem/*`: the operation and its path(s).
//! * `/files`: uploads and downloads with their path and byte count.
//!
//! Everything here is what the caller asked for and what the sandbox answered, seen on the
//! host: a hostile guest can lie in its answers (an exit code), never about what was asked.
//! Reads are bounded: a Start request of at most [`MAX_START_REQUEST`], answer messages of at
//! most [`MAX_EVENT`] (bigger ones are counted, not decoded).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alcove_envd_proto::connect::{Codec, EnvelopeDecoder, Framing, encode_envelope};
use alcove_envd_proto::process::{StartRequest, StartResponse, process_event};
use alcove_store::NewAuditRecord;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::service::Service;

/// Largest Start request the proxy reads to trace it (commands with their env vars).
pub const MAX_START_REQUEST: usize = 1 << 20;
/// Largest answer message decoded; a bigger one (output) is only counted.
const MAX_EVENT: usize = 1 << 20;
/// Longest command line kept in a record's target.
const MAX_TARGET: usize = 1024;
/// The metadata key (value `"true"`) by which a sandbox opts in to its processes' output being
/// kept in their records.
pub const CAPTURE_OUTPUT_KEY: &str = "alcove.capture-output";
/// Output kept per stream of one process, when captured.
const MAX_CAPTURE: usize = 64 << 10;

/// What a traced call records when it ends.
struct Pending {
    svc: Arc<Service>,
    team_id: String,
    sandbox_id: String,
    kind: &'static str,
    action: String,
    target: Option<String>,
    detail: Value,
    started: Instant,
    /// Bytes through the body being watched (a download's, an upload's, a process's output).
    bytes: u64,
    result: Option<String>,
    process: Option<ProcessWatch>,
}

/// A Start answer being read: its envelopes and what they said.
struct ProcessWatch {
    codec: Codec,
    decoder: EnvelopeDecoder,
    /// The answer stopped being readable (a message over [`MAX_EVENT`], compression): only
    /// its bytes are counted from then on.
    broken: bool,
    pid: Option<u32>,
    stdout: u64,
    stderr: u64,
    /// The first [`MAX_CAPTURE`] bytes of each stream, when the sandbox opted in.
    capture: Option<(Vec<u8>, Vec<u8>)>,
}

impl Pending {
    fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        let Some(w) = self.process.as_mut() else {
            return;
        };
        if w.broken {
            return;
        }
        w.decoder.push(data);
        loop {
            match w.decoder.next_envelope() {
                Ok(Some(env)) if env.is_end_stream() => {
                    if let Ok(end) = env.end_stream()
                        && let Some(err) = end.error
                        && self.result.is_none()
                    {
                        self.result = Some(format!("error: {}", err.message));
                    }
                }
                Ok(Some(env)) => {
                    let Ok(msg) = w.codec.decode::<StartResponse>(&env.payload) else {
                        continue;
                    };
                    match msg.event.and_then(|e| e.event) {
                        Some(process_event::Event::Start(s)) => w.pid = Some(s.pid),
                        Some(process_event::Event::Data(d)) => match d.output {
                            Some(process_event::data_event::Output::Stdout(b))
                            | Some(process_event::data_event::Output::Pty(b)) => {
                                w.stdout += b.len() as u64;
                                if let Some((out, _)) = w.capture.as_mut() {
                                    let room = MAX_CAPTURE.saturating_sub(out.len());
                                    out.extend_from_slice(&b[..room.min(b.len())]);
                                }
                            }
                            Some(process_event::data_event::Output::Stderr(b)) => {
                                w.stderr += b.len() as u64;
                                if let Some((_, err)) = w.capture.as_mut() {
                                    let room = MAX_CAPTURE.saturating_sub(err.len());
                                    err.extend_from_slice(&b[..room.min(b.len())]);
                                }
                            }
                            None => {}
                        },
                        Some(process_event::Event::End(e)) => {
                            self.result = Some(if e.exited {
                                format!("exit {}", e.exit_code)
                            } else if !e.status.is_empty() {
                                e.status.clone()
                            } else {
                                e.error.clone().unwrap_or_else(|| "ended".into())
                            });
                            if let Some(err) = e.error {
                                self.detail["error"] = json!(err);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    w.broken = true;
                    w.decoder = EnvelopeDecoder::new(0);
                    self.detail["untraced"] = json!("an answer message was too large to read");
                    break;
                }
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut detail = std::mem::take(&mut self.detail);
        detail["durationMs"] = json!(self.started.elapsed().as_millis() as u64);
        let result = match &self.process {
            Some(w) => {
                detail["pid"] = json!(w.pid);
                detail["stdoutBytes"] = json!(w.stdout);
                detail["stderrBytes"] = json!(w.stderr);
                if let Some((out, err)) = &w.capture {
                    detail["stdout"] = json!(String::from_utf8_lossy(out));
                    detail["stderr"] = json!(String::from_utf8_lossy(err));
                }
                // No end event: the caller left (a background command, a disconnect); the
                // process may go on running.
                self.result.clone().unwrap_or_else(|| "detached".into())
            }
            None => {
                detail["bytes"] = json!(self.bytes);
                self.result.clone().unwrap_or_else(|| "ok".into())
            }
        };
        self.svc.audit(NewAuditRecord {
            at: alcove_store::now_ms(),
            team_id: Some(self.team_id.clone()),
            actor: "sandbox-traffic".into(),
            sandbox_id: Some(self.sandbox_id.clone()),
            kind: self.kind.into(),
            action: std::mem::take(&mut self.action),
            target: self.target.take(),
            result,
            detail,
        });
    }
}

/// What the proxy keeps of a traced request until its answer arrives.
pub struct Traced {
    pending: Arc<Mutex<Pending>>,
    /// Whether the answer's body is what is measured (downloads, process output); uploads
    /// measured the request's.
    watch_response: bool,
}

impl Traced {
    /// Wraps the answer: its status decides a unary call's result; its body, when watched, is
    /// read as it streams; the record is written when the body ends (or is dropped).
    pub fn response(self, status: http::StatusCode, body: Body) -> Body {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if !status.is_success() && p.result.is_none() {
                p.result = Some(format!("http {}", status.as_u16()));
            }
        }
        if !self.watch_response {
            // The record waits for the body's end all the same (the call is over then).
            let pending = self.pending;
            return Body::new(body.map_frame(move |f| {
                let _held = &pending;
                f
            }));
        }
        let pending = self.pending;
        Body::new(body.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                pending.lock().unwrap_or_else(|e| e.into_inner()).feed(d);
            }
            f
        }))
    }
}

/// The user an envd call runs as: `Authorization: Basic base64(user:)`, else the default.
fn envd_user(headers: &http::HeaderMap) -> String {
    use base64::Engine;
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split(':').next().map(str::to_owned))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "user".into())
}

/// A W3C trace context header, if it is well-formed (`00-<32 hex>-<16 hex>-<2 hex>`).
fn traceparent(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000")
        .then(|| v.to_ascii_lowercase())
}

fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Largest filesystem request the proxy reads to trace it.
const MAX_FS_REQUEST: usize = 64 << 10;

/// A traced request's whole body, at most `limit` bytes, within 30 s: `what` and what it holds
/// name it in the refusal.
async fn read_request(
    body: Body,
    limit: usize,
    what: &str,
    holds: &str,
) -> Result<Bytes, ApiError> {
    Ok(tokio::time::timeout(
        Duration::from_secs(30),
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await
    .map_err(|_| ApiError::BadRouting {
        detail: format!("the {what} did not arrive within 30 s"),
    })?
    .map_err(|_| ApiError::BadRouting {
        detail: format!("a {what} is at most {limit} bytes ({holds})"),
    })?
    .to_bytes())
}

/// A protobuf message whose field 1 is a path (every filesystem request but Move's second).
#[derive(Clone, PartialEq, prost::Message)]
struct PathOnly {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(string, tag = "2")]
    second: String,
}

/// envd's process start, which the proxy reads.
pub const START_PATH: &str = "/process.Process/Start";

/// A process start that carries a secret placeholder (in its command, arguments or env vars):
/// refused, since the guest only ever sees the placeholder text, never the value.
fn refuse_placeholders(
    p: &alcove_envd_proto::process::ProcessConfig,
    content_type: &str,
) -> Result<(), ApiError> {
    let has = |s: &str| alcove_net::secrets::has_placeholder(s.as_bytes());
    let place = if has(&p.cmd) || p.args.iter().any(|a| has(a)) {
        "the command".to_string()
    } else if let Some((k, _)) = p.envs.iter().find(|(k, v)| has(k) || has(v)) {
        format!("the env var {k:?}")
    } else {
        return Ok(());
    };
    Err(ApiError::ProcessStartRefused {
        content_type: content_type.to_string(),
        detail: format!(
            "{place} holds a ${{e2b...}} placeholder: secret values never enter the sandbox, so it would run with the literal text. Put the placeholder in a header the egress proxy sets for the host that needs it: network.rules[\"api.example.com\"] = [{{\"transform\": {{\"headers\": {{\"Authorization\": \"Bearer ${{e2b.secrets.NAME}}\"}}}}}}] (at create or with update_network)"
        ),
    })
}

/// Looks at a request to the sandbox's agent and, when it is one that is traced, returns the
/// request to send (a Start with `TRACEPARENT` added) and what to do with the answer. With
/// `record` false only process starts come here, to be checked for secret placeholders.
pub async fn observe(
    svc: &Arc<Service>,
    team_id: &str,
    sandbox_id: &str,
    capture_output: bool,
    record: bool,
    req: http::Request<Body>,
) -> Result<(http::Request<Body>, Option<Traced>), ApiError> {
    let path = req.uri().path().to_owned();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let new = |kind: &'static str, action: String, target: Option<String>, detail: Value| Pending {
        svc: svc.clone(),
        team_id: team_id.to_owned(),
        sandbox_id: sandbox_id.to_owned(),
        kind,
        action,
        target,
        detail,
        started: Instant::now(),
        bytes: 0,
        result: None,
        process: None,
    };
    if path == START_PATH {
        let Some((codec, Framing::Streaming)) = Codec::from_content_type(&content_type) else {
            return Ok((req, None));
        };
        let (mut parts, body) = req.into_parts();
        let bytes = read_request(
            body,
            MAX_START_REQUEST,
            "process start request",
            "command, arguments and env vars together",
        )
        .await?;
        let mut dec = EnvelopeDecoder::new(MAX_START_REQUEST);
        dec.push(&bytes);
        let Ok(Some(env)) = dec.next_envelope() else {
            // Not a message we can read: forwarded as it came, untraced (the agent refuses it).
            return Ok((http::Request::from_parts(parts, Body::from(bytes)), None));
        };
        let Ok(mut start) = codec.decode::<StartRequest>(&env.payload) else {
            return Ok((http::Request::from_parts(parts, Body::from(bytes)), None));
        };
        refuse_placeholders(&start.process.clone().unwrap_or_default(), &content_type)?;
        if !record {
            return Ok((http::Request::from_parts(parts, Body::from(bytes)), None));
        }
        let trace = traceparent(&parts.headers);
        // What the caller asked for, before TRACEPARENT is added.
        let p = start.process.clone().unwrap_or_default();
        let mut body_bytes = bytes.clone();
        if let (Some(tp), Some(p)) = (&trace, start.process.as_mut())
            && !p.envs.contains_key("TRACEPARENT")
        {
            p.envs.insert("TRACEPARENT".into(), tp.clone());
            let mut out = encode_envelope(env.flags, &codec.encode(&start)).to_vec();
            // Whatever followed the first message (nothing, for a Start) goes on after it.
            let rest_at = 5 + env.payload.len();
            out.extend_from_slice(&bytes[rest_at.min(bytes.len())..]);
            body_bytes = Bytes::from(out);
        }
        parts.headers.remove(http::header::CONTENT_LENGTH);
        let mut line = std::iter::once(p.cmd.clone())
            .chain(p.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        if line.len() > MAX_TARGET {
            let mut cut = MAX_TARGET;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        let mut env_names: Vec<&String> = p.envs.keys().collect();
        env_names.sort();
        let mut pending = new(
            "process",
            "start".into(),
            Some(line),
            json!({
                "cmd": p.cmd,
                "args": p.args,
                "cwd": p.cwd,
                "user": envd_user(&parts.headers),
                "envNames": env_names,
                "tag": start.tag,
                "pty": start.pty.is_some(),
                "traceparent": trace,
            }),
        );
        pending.process = Some(ProcessWatch {
            codec,
            decoder: EnvelopeDecoder::new(MAX_EVENT),
            broken: false,
            pid: None,
            stdout: 0,
            stderr: 0,
            capture: capture_output.then(Default::default),
        });
        let traced = Traced {
            pending: Arc::new(Mutex::new(pending)),
            watch_response: true,
        };
        return Ok((
            http::Request::from_parts(parts, Body::from(body_bytes)),
            Some(traced),
        ));
    }
    if !record {
        return Ok((req, None));
    }
    if let Some(op) = path.strip_prefix("/filesystem.Filesystem/") {
        let op = op.to_owned();
        if matches!(op.as_str(), "GetWatcherEvents" | "RemoveWatcher") {
            return Ok((req, None));
        }
        let Some((codec, framing)) = Codec::from_content_type(&content_type) else {
            return Ok((req, None));
        };
        // Filesystem requests are a path or two: small. Read (bounded), then forward.
        let (parts, body) = req.into_parts();
        let bytes =
            read_request(body, MAX_FS_REQUEST, "filesystem request", "a path or two").await?;
        let payload = match framing {
            Framing::Unary => bytes.clone(),
            Framing::Streaming => {
                let mut d = EnvelopeDecoder::new(MAX_FS_REQUEST);
                d.push(&bytes);
                d.next_envelope()
                    .ok()
                    .flatten()
                    .map(|e| e.payload)
                    .unwrap_or_default()
            }
        };
        let (first, second) = match codec {
            Codec::Proto => <PathOnly as prost::Message>::decode(payload.as_ref())
                .map(|p| (p.path, p.second))
                .unwrap_or_default(),
            Codec::Json => {
                let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                if op == "Move" {
                    (s("source"), s("destination"))
                } else {
                    (s("path"), String::new())
                }
            }
        };
        let mut detail = json!({ "user": envd_user(&parts.headers) });
        if op == "Move" {
            detail["destination"] = json!(second);
        }
        let pending = new("file", op, Some(first), detail);
        let traced = Traced {
            pending: Arc::new(Mutex::new(pending)),
            watch_response: false,
        };
        return Ok((
            http::Request::from_parts(parts, Body::from(bytes)),
            Some(traced),
        ));
    }
    if path == "/files" {
        let method = req.method().clone();
        let target = query_param(req.uri(), "path");
        let detail = json!({ "user": query_param(req.uri(), "username")
            .unwrap_or_else(|| envd_user(req.headers())) });
        if method == http::Method::GET {
            let pending = new("file", "read".into(), target, detail);
            return Ok((
                req,
                Some(Traced {
                    pending: Arc::new(Mutex::new(pending)),
                    watch_response: true,
                }),
            ));
        }
        if method == http::Method::POST {
            // An upload: its own body is what is counted, as it streams through.
            let pending = Arc::new(Mutex::new(new("file", "write".into(), target, detail)));
            let (parts, body) = req.into_parts();
            let p2 = pending.clone();
            let body = Body::new(body.map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    p2.lock().unwrap_or_else(|e| e.into_inner()).bytes += d.len() as u64;
                }
                f
            }));
            return Ok((
                http::Request::from_parts(parts, body),
                Some(Traced {
                    pending,
                    watch_response: false,
                }),
            ));
        }
    }
    Ok((req, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_are_checked() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("traceparent", v.parse().unwrap());
            m
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(&h(good)).as_deref(), Some(good));
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nX: y",
        ] {
            if let Ok(v) = bad.parse::<http::HeaderValue>() {
                let mut m = http::HeaderMap::new();
                m.insert("traceparent", v);
                assert_eq!(traceparent(&m), None, "{bad}");
            }
        }
    }

    #[test]
    fn the_user_comes_from_basic_auth() {
        let mut m = http::HeaderMap::new();
        assert_eq!(envd_user(&m), "user");
        m.insert(
            http::header::AUTHORIZATION,
            "Basic cm9vdDo=".parse().unwrap(),
        );
        assert_eq!(envd_user(&m), "root");
    }
}
