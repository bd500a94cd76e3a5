//! The dashboard's calls to a sandbox's agent (envd), made by the server on the signed-in team's
//! behalf: the terminal's process, the file browser's listings, downloads and uploads. They go
//! through [`SandboxBackend::forward`](crate::backend::SandboxBackend::forward) as the proxy's
//! do, with the sandbox's envd access token, as the default user `user`.

use std::time::Duration;

use alcove_envd_proto::connect::{Codec, EnvelopeDecoder};
use axum::body::Body;
use base64::Engine;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;

use crate::backend::{BackendOp, ENVD_PORT};
use crate::error::ApiError;
use crate::handlers::AppState;
use crate::service::api_error;

/// How long a unary call (a listing, an input, a resize) may take.
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read from a unary call or one message of a stream.
pub const MAX_MESSAGE: usize = 4 << 20;
/// The most of an error answer read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// A running sandbox of the team, ready for calls.
#[derive(Clone)]
pub struct Guest {
    pub svc: AppState,
    pub id: String,
    token: Option<String>,
}

impl Guest {
    /// The team's sandbox `id`, which must be running (a paused one is resumed by the caller's
    /// choice, not by looking at it).
    pub async fn open(svc: &AppState, team_id: &str, id: &str) -> Result<Guest, ApiError> {
        let d = svc.get(team_id, id).await?;
        if !matches!(d.state, crate::models::SandboxState::Running) {
            return Err(ApiError::InvalidBody {
                detail: format!(
                    "sandbox {id} is not running (it is {}): resume it first",
                    super::sandboxes::state_name(d.state)
                ),
            });
        }
        Ok(Guest {
            svc: svc.clone(),
            id: id.to_owned(),
            token: d.envd_access_token,
        })
    }

    /// Sends one request to the agent. `path` is origin-form (path and query). An answer other
    /// than 2xx becomes an error with the agent's own message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<Response<Body>, ApiError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .map_err(ApiError::internal)?;
        let h = req.headers_mut();
        if let Some(ct) = content_type {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(ct).map_err(ApiError::internal)?,
            );
        }
        h.insert("connect-protocol-version", HeaderValue::from_static("1"));
        let user = base64::engine::general_purpose::STANDARD.encode("user:");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {user}")).expect("base64 is ASCII"),
        );
        if let Some(t) = &self.token {
            h.insert(
                "x-access-token",
                HeaderValue::from_str(t).map_err(ApiError::internal)?,
            );
        }
        let op = BackendOp::Forward { port: ENVD_PORT };
        let res = self
            .svc
            .call(
                op,
                &self.id,
                self.svc.backend().forward(&self.id, ENVD_PORT, req),
            )
            .await
            .map_err(|e| api_error(op, &self.id, e))?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let body = read_bounded(&self.id, res.into_body(), MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        Err(guest_error(&self.id, status, &body))
    }

    /// A unary Connect call (`/process.Process/SendInput`, ...) in protobuf, bounded in time and
    /// in the size of its answer.
    pub async fn unary<Req, Resp>(&self, path: &str, msg: &Req) -> Result<Resp, ApiError>
    where
        Req: prost::Message + serde::Serialize,
        Resp: prost::Message + Default + serde::de::DeserializeOwned,
    {
        let call = async {
            let res = self
                .send(
                    Method::POST,
                    path,
                    Some("application/proto"),
                    Body::from(Codec::Proto.encode(msg)),
                )
                .await?;
            let body = read_bounded(&self.id, res.into_body(), MAX_MESSAGE).await?;
            Codec::Proto
                .decode::<Resp>(&body)
                .map_err(|e| ApiError::GuestError {
                    sandbox_id: self.id.clone(),
                    detail: format!("its answer to {path} is not valid: {e}"),
                })
        };
        match tokio::time::timeout(UNARY_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::SandboxTimeout {
                sandbox_id: self.id.clone(),
            }),
        }
    }
}

/// Reads a body whole, refusing one larger than `max`.
async fn read_bounded(id: &str, body: Body, max: usize) -> Result<Vec<u8>, ApiError> {
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes().to_vec()),
        Err(e) => Err(ApiError::GuestError {
            sandbox_id: id.to_owned(),
            detail: format!("its answer could not be read (at most {max} bytes): {e}"),
        }),
    }
}

/// An error answer of the agent, with its own message (a Connect error's `message`, or the
/// body of an HTTP one), as an API error the page shows.
fn guest_error(id: &str, status: http::StatusCode, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(2000)]).into_owned());
    ApiError::GuestError {
        sandbox_id: id.to_owned(),
        detail: format!("{status}: {message}"),
    }
}

/// A Connect stream's messages, one at a time.
pub struct Stream {
    body: Body,
    decoder: EnvelopeDecoder,
    done: bool,
}

impl Stream {
    pub fn new(body: Body) -> Stream {
        Stream {
            body,
            decoder: EnvelopeDecoder::new(MAX_MESSAGE),
            done: false,
        }
    }

    /// The next message; `Ok(None)` at the end of the stream, an error if it ended with one.
    pub async fn next<M>(&mut self) -> Result<Option<M>, String>
    where
        M: prost::Message + Default + serde::de::DeserializeOwned,
    {
        loop {
            if self.done {
                return Ok(None);
            }
            match self.decoder.next_envelope() {
                Ok(Some(env)) if env.is_end_stream() => {
                    self.done = true;
                    return match env.end_stream() {
                        Ok(end) => match end.error {
                            Some(e) => Err(format!("{}: {}", e.code.as_str(), e.message)),
                            None => Ok(None),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                }
                Ok(Some(env)) => {
                    return Codec::Proto
                        .decode::<M>(&env.payload)
                        .map(Some)
                        .map_err(|e| e.to_string());
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => {
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }
}
