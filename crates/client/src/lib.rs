//! alcove-client: an async client for a running Alcove server, with no command-line parts.
//!
//! - [`ApiClient`]: the REST API (E2B's endpoints and Alcove's `/alcove/v1/` extensions), one
//!   method per operation. Bodies come back as the server's JSON, untouched, so a caller that
//!   prints them (`alcove client … --json`) prints exactly what the API sent.
//! - [`envd::EnvdClient`]: envd's process service in a sandbox, reached through the server's
//!   sandbox proxy the way the E2B SDKs reach it.
//!
//! Used by the `alcove` binary's client commands (`bin/alcove/src/client`). Plain HTTP only: the
//! server listens on loopback or behind a TLS-terminating proxy.

mod api;
pub mod envd;

pub use api::{ApiClient, ClientError, NewSandbox, Reply, SandboxFilter};
pub use envd::{EnvdClient, EnvdError, Output};
