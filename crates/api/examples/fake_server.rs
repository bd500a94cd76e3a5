//! `alcove server` over the test suite's fake backend: no VMs, so only the control API is
//! real. Lets the official SDK suites' control-plane tests run before the node backend exists:
//!
//!     cargo run -p alcove-api --example fake_server -- 127.0.0.1:3000 /tmp/alcove-fake
//!
//! Never used in production; the `alcove` binary wires the real backend.

#[path = "../tests/common/fake.rs"]
#[allow(dead_code)]
mod fake;

use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let dir = args.next().unwrap_or_else(|| "/tmp/alcove-fake".into());
    let config = alcove_api::ServerConfig::new(listen, dir);
    let server = alcove_api::Server::bind(config, Arc::new(fake::FakeBackend::new())).await?;
    print!("{}", server.sdk_env());
    use std::io::Write;
    std::io::stdout().flush()?;
    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
