//! alcove-client: an async client for a running Alcove server, with no command-line parts.
//!
//! - [`ApiClient`]: the REST API (E2B's endpoints and Alcove's `/alcove/v1/` extensions), one
//!   method per operation. Bodies come back as the server's JSON, untouched, so a caller that
//!   prints them (`alcove client … --json`) prints exactly what the API sent.
//! - [`envd::EnvdClient`]: envd's process service in a sandbox, reached through the server's
//!   sandbox proxy the way the E2B SDKs reach it.
//! - [`interpreter::InterpreterClient`]: the code interpreter's `/execute` (guest port 49999),
//!   through the same proxy.
//! - E2B's template build API on [`ApiClient`] (`templates.rs`), and what turns a Dockerfile into
//!   such a build: [`dockerfile`] (the instructions → steps) and [`context`] (the files a `COPY`
//!   uploads: `.dockerignore`, the `filesHash`, the tar.gz).
//!
//! Used by the `alcove` binary's client commands (`bin/alcove/src/client`) and the MCP server
//! (`crates/mcp`). Plain HTTP only: the
//! server listens on loopback or behind a TLS-terminating proxy.

mod api;
pub mod context;
pub mod dockerfile;
pub mod envd;
pub mod interpreter;
mod templates;

pub use api::{ApiClient, ClientError, NewSandbox, Reply, SandboxFilter};
pub use envd::{EnvdClient, EnvdError, Output};
pub use interpreter::{Execution, InterpreterClient, InterpreterError};
pub use templates::{
    BuildReason, BuildRequest, BuildRequested, BuildStart, BuildStatus, BuildStep, FileUpload,
    LogEntry,
};
