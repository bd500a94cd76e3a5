//! Connection serving: TCP with per-connection protocol detection (HTTP/1.1 or h2c prior
//! knowledge), and plain h2c for host-channel sessions. Both serve the same axum router.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

/// h2 flow-control windows: big enough that a 100 MB transfer over the channel is not paced by
/// window updates, small enough to bound what one stream can make the agent buffer.
const STREAM_WINDOW: u32 = 2 << 20;
const CONN_WINDOW: u32 = 8 << 20;
const MAX_STREAMS: u32 = 1024;

/// Accepts TCP connections forever.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    router: axum::Router,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .max_concurrent_streams(MAX_STREAMS);
            builder.http1().timer(TokioTimer::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Serves one h2c (prior knowledge) connection until it ends.
pub async fn serve_h2<IO>(io: IO, router: axum::Router) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .serve_connection(TokioIo::new(io), service)
        .await
}
