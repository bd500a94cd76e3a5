//! The host side effects of a sandbox's network that need root, behind a small seam so the node
//! can be unit-tested as an ordinary user: the network namespace a VM runs in and the egress
//! service (proxy and resolver) that serves it. [`RealNetwork`] is the one the node uses
//! (`alcove_net`'s namespaces and `SandboxNet`); tests substitute an inert one.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use alcove_net::egress::SandboxCa;
use alcove_net::{EgressConfig, NetStats, Netns, NetworkConfig, RuleError, SandboxNet};

use crate::NodeError;

/// Creates and re-enters sandbox network namespaces. Its methods block (namespace syscalls): the
/// node calls them from `spawn_blocking`.
pub trait HostNetwork: Send + Sync + 'static {
    /// A new namespace for one VM, as the fd its spec takes (`spec.netns`), and with `listen`,
    /// the egress sockets inside it.
    fn create(
        &self,
        listen: bool,
    ) -> std::io::Result<(Option<Arc<OwnedFd>>, Option<EgressSockets>)>;
    /// The egress sockets in the namespace of the running process `pid` (a re-attached VM).
    fn of_pid(&self, pid: u32) -> std::io::Result<EgressSockets>;
}

/// Sockets in a sandbox's namespace that its egress service is served on.
pub trait Sockets: Send + std::fmt::Debug {
    /// Starts the egress service of sandbox `id` on these sockets under `network`'s rules.
    fn serve(
        self: Box<Self>,
        egress: Arc<EgressConfig>,
        id: &str,
        network: NetworkConfig,
        ca: Option<Arc<SandboxCa>>,
    ) -> Result<Arc<dyn Egress>, NodeError>;
}

pub type EgressSockets = Box<dyn Sockets>;

/// A running egress service of one sandbox.
pub trait Egress: Send + Sync {
    fn update(&self, network: NetworkConfig) -> Result<(), RuleError>;
    fn stats(&self) -> NetStats;
    fn stop(&self);
}

/// Namespaces and egress from `alcove_net` (needs root).
#[derive(Debug, Default)]
pub struct RealNetwork;

impl HostNetwork for RealNetwork {
    fn create(
        &self,
        listen: bool,
    ) -> std::io::Result<(Option<Arc<OwnedFd>>, Option<EgressSockets>)> {
        let (ns, listeners) = Netns::create(listen)?;
        Ok((
            Some(Arc::new(OwnedFd::from(ns))),
            listeners.map(|l| Box::new(l) as EgressSockets),
        ))
    }

    fn of_pid(&self, pid: u32) -> std::io::Result<EgressSockets> {
        Ok(Box::new(Netns::of_pid(pid)?.listen()?))
    }
}

impl Sockets for alcove_net::Listeners {
    fn serve(
        self: Box<Self>,
        egress: Arc<EgressConfig>,
        id: &str,
        network: NetworkConfig,
        ca: Option<Arc<SandboxCa>>,
    ) -> Result<Arc<dyn Egress>, NodeError> {
        let net = SandboxNet::start(egress, id, network, *self, ca)
            .map_err(|e| NodeError::Network(e.to_string()))?;
        Ok(net)
    }
}

impl Egress for SandboxNet {
    fn update(&self, network: NetworkConfig) -> Result<(), RuleError> {
        SandboxNet::update(self, network)
    }

    fn stats(&self) -> NetStats {
        SandboxNet::stats(self)
    }

    fn stop(&self) {
        SandboxNet::stop(self)
    }
}
