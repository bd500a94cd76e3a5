//! Connect-RPC serving (connectrpc.com/docs/protocol) for the envd services.
//!
//! Unary calls: `application/json` or `application/proto`, bare message in and out; errors are an
//! HTTP status plus `{"code", "message"}`. Streaming calls: `application/connect+json` or
//! `+proto`, enveloped messages, always HTTP 200, the outcome in the end-of-stream envelope.
//! Handlers in `process` and `filesystem` only see typed messages and [`RpcError`].

pub mod filesystem;
pub mod process;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use serde::{Serialize, de::DeserializeOwned};

use alcove_envd_proto::connect::{self, Code, Codec, EnvelopeDecoder, ErrorBody, Framing};

/// Largest request message accepted (envd's requests are small; file bytes go over /files).
pub const MAX_MESSAGE: usize = 8 << 20;
/// Keepalive interval when the client does not ask for one.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// A Connect error: a code the SDKs map to their exceptions and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, m)
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Code::NotFound, m)
    }

    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Code::Internal, m)
    }

    /// An error whose message carries its whole source chain (the SDK shows only the message).
    pub fn from_error(code: Code, err: &(dyn std::error::Error + 'static)) -> Self {
        Self::new(code, error_chain(err))
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// An error's whole source chain as one message (the guest's one implementation).
pub use alcove_guest_contract::error_chain;

/// The parts of a Connect request every handler needs.
pub struct Call {
    pub codec: Codec,
    pub framing: Framing,
    pub headers: HeaderMap,
    pub body: Body,
}

impl Call {
    /// Reads the content type; None means "not a Connect request" (answered 415).
    pub fn from_request(req: axum::extract::Request) -> Result<Call, Box<Response>> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some((codec, framing)) = Codec::from_content_type(ct) else {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                [("accept-post", "application/json, application/proto, application/connect+json, application/connect+proto")],
                "unsupported content type for a Connect call",
            )
                .into_response()
                .into());
        };
        let (parts, body) = req.into_parts();
        Ok(Call {
            codec,
            framing,
            headers: parts.headers,
            body,
        })
    }

    /// The keepalive interval the client asked for (`Keepalive-Ping-Interval`, seconds).
    pub fn keepalive(&self) -> Duration {
        self.headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_KEEPALIVE)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Reads the single request message of a unary or server-streaming call.
    pub async fn message<M>(&mut self) -> Result<M, RpcError>
    where
        M: prost::Message + Default + DeserializeOwned,
    {
        let body = std::mem::take(&mut self.body);
        let bytes = http_body_util::Limited::new(body, MAX_MESSAGE + 5)
            .collect()
            .await
            .map_err(|_| {
                RpcError::new(
                    Code::ResourceExhausted,
                    "request too large or not fully received",
                )
            })?
            .to_bytes();
        let payload = match self.framing {
            Framing::Unary => bytes,
            Framing::Streaming => {
                let mut d = EnvelopeDecoder::new(MAX_MESSAGE);
                d.push(&bytes);
                match d.next_envelope() {
                    Ok(Some(env)) if !env.is_end_stream() => env.payload,
                    Ok(_) => {
                        return Err(RpcError::invalid_argument("expected one request message"));
                    }
                    Err(e) => return Err(RpcError::invalid_argument(e.to_string())),
                }
            }
        };
        self.codec
            .decode(&payload)
            .map_err(|e| RpcError::from_error(Code::InvalidArgument, &e))
    }

    /// The request messages of a client-streaming call, as they arrive.
    pub fn messages<M>(self) -> impl Stream<Item = Result<M, RpcError>> + Send + 'static
    where
        M: prost::Message + Default + DeserializeOwned + Send + 'static,
    {
        let codec = self.codec;
        let state = (
            self.body.into_data_stream(),
            EnvelopeDecoder::new(MAX_MESSAGE),
            false,
        );
        futures::stream::unfold(state, move |(mut body, mut dec, mut done)| async move {
            loop {
                if done {
                    return None;
                }
                match dec.next_envelope() {
                    Ok(Some(env)) if env.is_end_stream() => return None,
                    Ok(Some(env)) => {
                        let msg = codec
                            .decode::<M>(&env.payload)
                            .map_err(|e| RpcError::from_error(Code::InvalidArgument, &e));
                        return Some((msg, (body, dec, done)));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        done = true;
                        return Some((
                            Err(RpcError::invalid_argument(e.to_string())),
                            (body, dec, done),
                        ));
                    }
                }
                match body.next().await {
                    Some(Ok(chunk)) => dec.push(&chunk),
                    Some(Err(_)) => {
                        return Some((
                            Err(RpcError::new(Code::Canceled, "request stream broke")),
                            (body, dec, true),
                        ));
                    }
                    None => {
                        if dec.buffered() > 0 {
                            done = true;
                            return Some((
                                Err(RpcError::invalid_argument(
                                    "request stream ended mid-message",
                                )),
                                (body, dec, done),
                            ));
                        }
                        return None;
                    }
                }
            }
        })
    }
}

/// A unary response (or a client-streaming one, which is framed as a one-message stream).
pub fn unary_response<M>(
    call_codec: Codec,
    framing: Framing,
    result: Result<M, RpcError>,
) -> Response
where
    M: prost::Message + Serialize + Send + 'static,
{
    match framing {
        Framing::Streaming => stream_response(call_codec, futures::stream::once(async { result })),
        Framing::Unary => match result {
            Ok(msg) => (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(call_codec.content_type(Framing::Unary)),
                )],
                call_codec.encode(&msg),
            )
                .into_response(),
            Err(e) => unary_error(&e),
        },
    }
}

/// The unary error form: HTTP status by code, JSON body.
pub fn unary_error(e: &RpcError) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A server-streaming response: every item enveloped, then the end-of-stream envelope (with the
/// first error, which also ends the stream).
pub fn stream_response<M, S>(codec: Codec, messages: S) -> Response
where
    M: prost::Message + Serialize + Send + 'static,
    S: Stream<Item = Result<M, RpcError>> + Send + 'static,
{
    let frames = futures::stream::unfold(
        (Box::pin(messages), false),
        move |(mut s, ended)| async move {
            if ended {
                return None;
            }
            let frame = match s.next().await {
                Some(Ok(m)) => (connect::encode_message(codec, &m), false),
                Some(Err(e)) => (connect::encode_end_stream(Some(e.body())), true),
                None => (connect::encode_end_stream(None), true),
            };
            Some((Ok::<Bytes, Infallible>(frame.0), (s, frame.1)))
        },
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(codec.content_type(Framing::Streaming)),
        )],
        Body::from_stream(frames),
    )
        .into_response()
}

/// An error answer in whichever framing the call used.
pub fn error_response(codec: Codec, framing: Framing, e: RpcError) -> Response {
    match framing {
        Framing::Unary => unary_error(&e),
        Framing::Streaming => stream_response::<alcove_envd_proto::process::ListRequest, _>(
            codec,
            futures::stream::once(async move { Err(e) }),
        ),
    }
}

/// The user a call runs as, from `Authorization: Basic`.
pub fn call_user(
    state: &crate::state::AgentState,
    call: &Call,
) -> Result<crate::users::UserInfo, RpcError> {
    let name = crate::users::user_from_authorization(call.header("authorization"))
        .map_err(|e| RpcError::from_error(Code::Unauthenticated, &e))?;
    state.resolve_user(name.as_deref()).map_err(|e| match e {
        crate::users::UserError::Unknown(_) => RpcError::from_error(Code::PermissionDenied, &e),
        other => RpcError::from_error(Code::Internal, &other),
    })
}

/// The Connect code for a failed filesystem operation.
pub fn io_code(e: &std::io::Error) -> Code {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => Code::NotFound,
        K::PermissionDenied => Code::PermissionDenied,
        K::AlreadyExists => Code::AlreadyExists,
        K::NotADirectory | K::IsADirectory | K::InvalidInput | K::DirectoryNotEmpty => {
            Code::InvalidArgument
        }
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Code::ResourceExhausted,
        _ if e.raw_os_error() == Some(libc::ELOOP) => Code::FailedPrecondition,
        _ => Code::Internal,
    }
}
