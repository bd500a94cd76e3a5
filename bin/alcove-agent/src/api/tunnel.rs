//! `POST /alcove/tunnel?port=N`: a byte tunnel from the host to a TCP port inside the guest, over
//! one HTTP/2 stream of the existing connection (Alcove extension, not envd).
//!
//! The request body is the byte stream to the guest port, the response body the bytes back. The
//! agent connects to `127.0.0.1:N` (then `[::1]:N`) with a bounded connect timeout; nothing
//! listening answers **502** with `{"code": 502, "message": "... port is not open ...",
//! "error": "port_not_open"}` so the host can tell it apart from other failures. Once connected
//! the answer is **200** with the socket's bytes streaming in the body.
//!
//! Invariants: the end of the request body half-closes the socket (`shutdown(SHUT_WR)`), the
//! socket's EOF ends the response body; buffers are bounded (one read buffer per direction),
//! backpressure comes from h2 flow control on both sides; any number of tunnels may be open on
//! one connection (bounded by the server's `max_concurrent_streams`). Callers are the host's
//! proxy (`AgentClient::tunnel`); the route sits behind the access-token check like every other.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::state::{AgentState, Counters};

/// How long to wait for the guest-side connect (a listener that accepts slowly, a busy guest).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer per direction: bounds what one tunnel holds in the agent.
const READ_BUF: usize = 64 << 10;

/// The stable error string the host maps to "port not open".
pub const PORT_NOT_OPEN: &str = "port_not_open";

#[derive(Debug, serde::Deserialize)]
pub struct TunnelQuery {
    port: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("query parameter `port` must be a TCP port number (1-65535)")]
    BadPort,
    #[error("port is not open: nothing listens on port {0} inside the sandbox (127.0.0.1 or ::1)")]
    NotOpen(u16),
    #[error("connecting to port {0} inside the sandbox timed out; the server may be overloaded")]
    ConnectTimeout(u16),
}

impl IntoResponse for TunnelError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            TunnelError::BadPort => (StatusCode::BAD_REQUEST, "bad_port"),
            TunnelError::NotOpen(_) => (StatusCode::BAD_GATEWAY, PORT_NOT_OPEN),
            TunnelError::ConnectTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "connect_timeout"),
        };
        let body = serde_json::json!({
            "code": status.as_u16(),
            "message": self.to_string(),
            "error": code,
        });
        (status, axum::Json(body)).into_response()
    }
}

pub async fn open(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<TunnelQuery>,
    req: Request,
) -> Response {
    match open_inner(q, req).await {
        Ok(r) => {
            Counters::inc(&state.counters.tunnels_opened);
            r
        }
        Err(e) => {
            if !matches!(e, TunnelError::BadPort) {
                Counters::inc(&state.counters.tunnels_refused);
            }
            e.into_response()
        }
    }
}

async fn open_inner(q: TunnelQuery, req: Request) -> Result<Response, TunnelError> {
    let port = q
        .port
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or(TunnelError::BadPort)?;
    let stream = connect(port).await?;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();

    // Host → guest: each body frame is written before the next is read, so the h2 window only
    // reopens as fast as the guest port takes the bytes.
    let mut body = req.into_body();
    tokio::spawn(async move {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && write.write_all(&data).await.is_err()
                    {
                        return;
                    }
                }
                // The host reset the stream: drop the write half, which closes the socket once
                // the response side is gone too.
                Some(Err(e)) => {
                    tracing::debug!(port, error = %e, "tunnel request stream ended with an error");
                    return;
                }
                None => break,
            }
        }
        // Half-close: the guest server sees EOF and may still answer.
        let _ = write.shutdown().await;
    });

    // Guest → host: read only when h2 polls for more, i.e. when the host's window has room.
    let out = tokio_util::io::ReaderStream::with_capacity(read, READ_BUF);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(out))
        .expect("static response parts are valid"))
}

async fn connect(port: u16) -> Result<TcpStream, TunnelError> {
    let attempt = async {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match TcpStream::connect(v4).await {
            Ok(s) => Ok(s),
            Err(e4) => {
                let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                TcpStream::connect(v6).await.map_err(|e6| {
                    tracing::debug!(port, v4 = %e4, v6 = %e6, "tunnel connect failed");
                    TunnelError::NotOpen(port)
                })
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| TunnelError::ConnectTimeout(port))?
}
