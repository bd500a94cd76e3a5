//! Per-sandbox networks.
//!
//! Each microVM gets its own network namespace holding only its tap ([`netns`]); nothing routes out
//! of it. The guest's TCP connections and DNS packets are redirected to sockets the server owns in
//! that namespace, and the server makes the real connections from the host after checking the
//! sandbox's egress rules ([`policy`], [`egress`]): allow/deny lists of CIDRs and domains, domain
//! rules bound to the resolver's answers and checked against TLS SNI or HTTP Host ([`sniff`]), the
//! operator's reserved ranges, connection and bandwidth limits, byte counters.
//!
//! Owns: namespaces, taps, nftables rules in them, the proxy and resolver. Does not own: QEMU (it
//! is started in the namespace by `alcove-vmm`), the API.

pub mod dns;
pub mod egress;
pub mod netns;
pub mod policy;
pub mod secrets;
pub mod sniff;

pub use egress::{EgressConfig, EgressEvent, NetStats, SandboxNet};
pub use netns::{Listeners, Netns};
pub use policy::{Cidr, Cidr6, Guard, Net, NetworkConfig, RuleError, Rules};
