//! Host side of the agent's byte tunnel (`POST /alcove/tunnel?port=N`, see `docs/agent.md`):
//! one HTTP/2 stream carrying a TCP connection to a port inside the guest.
//!
//! [`AgentClient::tunnel`](crate::AgentClient::tunnel) returns a [`Tunnel`], an in-memory duplex
//! whose far end two tasks pump into the h2 request body and out of the response body. The
//! duplex buffer and h2 flow control bound what is held in memory; shutting down the write side
//! half-closes the guest socket, the guest's EOF reads as EOF here. Dropping the [`Tunnel`] resets
//! the stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

use crate::{AgentBody, AgentClient, BoxError, ClientError};

/// Bytes buffered between the caller and the pump tasks, per direction.
const DUPLEX_BUF: usize = 64 << 10;
/// Largest error body read from the agent when it refuses a tunnel.
const MAX_ERROR_BODY: usize = 4 << 10;

/// A byte stream to a TCP port inside the guest.
#[derive(Debug)]
pub struct Tunnel {
    io: DuplexStream,
    /// Dropped with the tunnel: tells the response pump to stop (resetting the stream) even when
    /// the guest never sends another byte.
    _closed: tokio::sync::oneshot::Sender<()>,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl AgentClient {
    /// Opens a tunnel to `port` inside the guest. `access_token` is the agent's token when set.
    /// Waits up to the request timeout for the agent to connect; a port nobody listens on is
    /// [`ClientError::PortNotOpen`].
    pub async fn tunnel(
        &self,
        port: u16,
        access_token: Option<&str>,
    ) -> Result<Tunnel, ClientError> {
        self.duplex(
            "tunnel",
            &format!("/alcove/tunnel?port={port}"),
            access_token,
            Some(port),
        )
        .await
    }

    /// Opens the sandbox's volume session (`alcove_volume::wire`): the agent's frames in,
    /// the host's out, over one stream of the connection. It ends with the connection.
    pub async fn volume_session(&self, access_token: Option<&str>) -> Result<Tunnel, ClientError> {
        self.duplex("volume_session", "/alcove/volumes", access_token, None)
            .await
    }

    /// A POST to `path` whose request and response bodies are one byte stream each way.
    async fn duplex(
        &self,
        op: &'static str,
        path: &str,
        access_token: Option<&str>,
        port: Option<u16>,
    ) -> Result<Tunnel, ClientError> {
        let (ours, theirs) = tokio::io::duplex(DUPLEX_BUF);
        let (their_read, mut their_write) = tokio::io::split(theirs);

        let upstream = tokio_util::io::ReaderStream::with_capacity(their_read, DUPLEX_BUF)
            .map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError));
        let body: AgentBody = StreamBody::new(upstream).boxed_unsync();
        let mut headers = vec![(
            http::header::CONTENT_TYPE.as_str(),
            "application/octet-stream".to_owned(),
        )];
        if let Some(t) = access_token {
            headers.push(("x-access-token", t.to_owned()));
        }
        let req = crate::build(Method::POST, path, &headers, body)?;
        let resp = self.request(op, req).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            // Hostile-guest rule: read at most a small error body, and not for long.
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY);
            let body = tokio::time::timeout(self.timeouts.request, limited.collect())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let body = &body[..];
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            if let Some(port) = port
                && status == StatusCode::BAD_GATEWAY
                && v["error"] == "port_not_open"
            {
                return Err(ClientError::PortNotOpen(port));
            }
            return Err(crate::status_error(op, status, body));
        }

        // Guest → caller. Ends (shutting down our write end, i.e. EOF for the caller) when the
        // guest closes; an error (stream reset, connection gone) drops it, which the caller also
        // reads as EOF/broken pipe.
        let mut body = resp.into_body();
        let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = &mut closed_rx => return,
                };
                let Some(frame) = frame else { break };
                let data: Bytes = match frame {
                    Ok(f) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    Err(e) => {
                        tracing::debug!(op, error = %e, "duplex response stream failed");
                        return;
                    }
                };
                if their_write.write_all(&data).await.is_err() {
                    // The caller dropped the tunnel: dropping `body` resets the stream.
                    return;
                }
            }
            let _ = their_write.shutdown().await;
        });
        Ok(Tunnel {
            io: ours,
            _closed: closed_tx,
        })
    }
}
