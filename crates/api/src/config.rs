//! Server configuration. Every limit is configurable; none is a hard-coded tier.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address for the REST API and the sandbox traffic proxy (one listener serves both).
    pub listen: SocketAddr,
    /// Holds `alcove.db` and, after the first start, `api-key`.
    pub data_dir: PathBuf,
    /// Domain for `<port>-<sandboxID>.<domain>` routing and the `domain` the SDK is given.
    /// `None` means `localhost:<listen port>`.
    pub domain: Option<String>,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Lifetime of a sandbox created without `timeout` (E2B's default: 300 s).
    pub default_timeout: Duration,
    /// Longest lifetime a create, `/timeout` or `/refreshes` may ask for.
    pub max_timeout: Duration,
    /// Sandboxes one team may have creating or running at once.
    pub max_concurrent_sandboxes: usize,
    /// Largest JSON body the REST API reads. Proxied sandbox traffic is streamed and not capped.
    pub max_body_bytes: usize,
    /// Deadline for one REST request (not for proxied traffic, which can stream for hours).
    pub request_timeout: Duration,
    /// Deadline for the backend to start a sandbox.
    pub create_timeout: Duration,
    /// How often the reaper kills sandboxes past their end time.
    pub reaper_interval: Duration,
    /// How often the backend is asked which VMs still exist.
    pub liveness_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            max_concurrent_sandboxes: 100,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
            create_timeout: Duration::from_secs(120),
            reaper_interval: Duration::from_secs(1),
            liveness_interval: Duration::from_secs(5),
        }
    }
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            listen,
            data_dir: data_dir.into(),
            domain: None,
            limits: Limits::default(),
        }
    }
}
