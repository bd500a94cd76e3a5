//! HTTP/1.1 to a guest port through a [`Tunnel`](crate::Tunnel): what the sandbox proxy uses for
//! every port but the agent's own.
//!
//! One tunnel per request (no pooling yet): the request goes out in origin form with its `Host`
//! header, the response streams back. Upgrades (WebSocket and any other `Upgrade`): when the
//! guest answers 101 and the caller's request carried hyper's `OnUpgrade` (the server side of the
//! incoming connection), both upgraded connections are joined and bytes copied both ways until
//! either side closes.

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
            let outgoing = hyper::upgrade::on(&mut resp);
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
