//! Many hosts behind one API (issue 19): `alcove server --cluster-listen` runs the control plane
//! over [`control::ClusterBackend`], and `alcove node` runs this host's sandboxes behind
//! [`node::router`], registering with heartbeats.
//!
//! ```text
//!  control plane (alcove server)                       node (alcove node)
//!  API ─► ClusterBackend ─ placement ─► RemoteNode ══ TLS, pinned cert ══► link listener ─► NodeBackend
//!         ▲ cluster listener ◄──────────── signed heartbeats (capacity, templates, warm VMs) ──┘
//! ```
//!
//! [`link`] says what makes the link trusted; [`wire`] what crosses it.

pub mod blobs;
pub mod control;
pub mod link;
pub mod node;
pub mod remote;
pub mod wire;

pub use control::{ClusterBackend, ClusterConfig};
pub use link::{NodeCert, Token};
