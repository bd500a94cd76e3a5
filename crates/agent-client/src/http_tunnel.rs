//! HTTP/1.1 to a guest port through a [`Tunnel`](crate::Tunnel): what the sandbox proxy uses for
//! every port but the agent's own.
//!
//! One tunnel per request (no pooling yet): the request goes out in origin form with its `Host`
//! header, the response streams back. Upgrades (WebSocket and any other `Upgrade`): when the
//! guest answers 101 and the caller's request carried hyper's `OnUpgrade` (the server side of the
//! incoming connection), both upgraded connections are joined and bytes copied both ways until
//! either side closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

use crate::{AgentClient, BoxError, ClientError};

/// Bound on both upgraded sides becoming available after a 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentClient {
    /// Sends one HTTP request to `port` inside the guest over a fresh tunnel. `head_timeout`
    /// bounds the wait for the response head (the body is the caller's to read). `req`'s URI is
    /// reduced to origin form; a missing `Host` becomes `localhost:<port>`.
    pub async fn forward_http<B>(
        &self,
        port: u16,
        access_token: Option<&str>,
        mut req: Request<B>,
        head_timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        const OP: &str = "forward to a sandbox port";
        let tunnel = self.tunnel(port, access_token).await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, B>(TokioIo::new(tunnel))
            .await
            .map_err(ClientError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(port, error = %e, "guest HTTP connection ended");
            }
        });

        let wants_upgrade = is_upgrade(req.headers());
        let incoming = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        *req.uri_mut() = path
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Build("request URI", Box::new(e)))?;
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(&format!("localhost:{port}"))
                .map_err(|e| ClientError::Build("Host header", Box::new(e)))?;
            req.headers_mut().insert(header::HOST, host);
        }

        let mut resp = tokio::time::timeout(head_timeout, sender.send_request(req))
            .await
            .map_err(|_| ClientError::Timeout("the sandbox server's response head"))?
            .map_err(|e| ClientError::Request(OP, e))?;

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(incoming) = incoming
        {
            join_upgrades(port, incoming, hyper::upgrade::on(&mut resp));
        }
        Ok(resp)
    }
}

/// `Connection: upgrade` plus an `Upgrade` header.
pub fn is_upgrade(h: &http::HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Opens a tunnel to `port` in sandbox `sandbox_id` (whatever finds that sandbox's agent).
pub type OpenTunnel = Arc<
    dyn Fn(String, u16) -> BoxFuture<'static, Result<crate::Tunnel, ClientError>> + Send + Sync,
>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// HTTP/1.1 to ports in many sandboxes, with idle connections (tunnels) kept for reuse per
/// sandbox and port. What the sandbox proxy uses; [`AgentClient::forward_http`] is the
/// one-shot form.
///
/// Pool keys are `<port>-<sandbox>`: a connection never serves another sandbox or port. Idle
/// connections are kept at most [`PortClient::IDLE`] and [`PortClient::MAX_IDLE`] per key; a
/// connection the guest closed is dropped from the pool, not reused.
pub struct PortClient<B> {
    client: hyper_util::client::legacy::Client<TunnelConnector, B>,
}

impl<B> Clone for PortClient<B> {
    fn clone(&self) -> Self {
        PortClient {
            client: self.client.clone(),
        }
    }
}

impl<B> PortClient<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub const IDLE: Duration = Duration::from_secs(30);
    pub const MAX_IDLE: usize = 4;

    pub fn new(open: OpenTunnel) -> PortClient<B> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(Self::IDLE)
                .pool_max_idle_per_host(Self::MAX_IDLE)
                .build(TunnelConnector { open });
        PortClient { client }
    }

    /// Like [`AgentClient::forward_http`], over a pooled connection when one is idle.
    pub async fn send(
        &self,
        sandbox_id: &str,
        port: u16,
        mut req: Request<B>,
        head_timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        const OP: &str = "forward to a sandbox port";
        let incoming = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        // The authority only keys the pool (and names the sandbox for the connector); the guest
        // gets origin form and the caller's Host.
        *req.uri_mut() = format!("http://{port}-{sandbox_id}.tunnel{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Build("request URI", Box::new(e)))?;
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(&format!("localhost:{port}"))
                .map_err(|e| ClientError::Build("Host header", Box::new(e)))?;
            req.headers_mut().insert(header::HOST, host);
        }
        let mut resp = tokio::time::timeout(head_timeout, self.client.request(req))
            .await
            .map_err(|_| ClientError::Timeout("the sandbox server's response head"))?
            .map_err(|e| match find_client_error(&e) {
                Some(ClientError::PortNotOpen(p)) => ClientError::PortNotOpen(*p),
                Some(ClientError::Timeout(what)) => ClientError::Timeout(what),
                _ => ClientError::Pooled(OP, e),
            })?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(incoming) = incoming
        {
            join_upgrades(port, incoming, hyper::upgrade::on(&mut resp));
        }
        Ok(resp)
    }
}

/// The [`ClientError`] a connect failure carries somewhere in its source chain.
fn find_client_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ClientError>() {
            return Some(c);
        }
        cur = err.source();
    }
    None
}

fn join_upgrades(
    port: u16,
    incoming: hyper::upgrade::OnUpgrade,
    outgoing: hyper::upgrade::OnUpgrade,
) {
    tokio::spawn(async move {
        let both = async { tokio::try_join!(incoming, outgoing) };
        let (client, guest) = match tokio::time::timeout(UPGRADE_TIMEOUT, both).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                tracing::debug!(port, error = %e, "upgrade failed");
                return;
            }
            Err(_) => {
                tracing::debug!(port, "upgrade timed out");
                return;
            }
        };
        let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
        match tokio::io::copy_bidirectional(&mut client, &mut guest).await {
            Ok((up, down)) => tracing::debug!(port, up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(port, error = %e, "upgraded connection failed"),
        }
    });
}

/// The pool's connector: `http://<port>-<sandbox>.tunnel` → a tunnel to that port.
#[derive(Clone)]
struct TunnelConnector {
    open: OpenTunnel,
}

impl tower::Service<http::Uri> for TunnelConnector {
    type Response = TunnelIo;
    type Error = ClientError;
    type Future = BoxFuture<'static, Result<TunnelIo, ClientError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let open = Arc::clone(&self.open);
        Box::pin(async move {
            let target = uri
                .host()
                .and_then(|h| h.strip_suffix(".tunnel"))
                .and_then(|l| l.split_once('-'))
                .and_then(|(p, id)| Some((p.parse::<u16>().ok()?, id.to_owned())));
            let Some((port, id)) = target else {
                return Err(ClientError::Build(
                    "tunnel target",
                    format!("not a tunnel URI: {uri}").into(),
                ));
            };
            Ok(TunnelIo(TokioIo::new(open(id, port).await?)))
        })
    }
}

/// A tunnel as hyper's pooled client wants its connections.
struct TunnelIo(TokioIo<crate::Tunnel>);

impl hyper_util::client::legacy::connect::Connection for TunnelIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
