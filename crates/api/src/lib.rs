//! alcove-api: the control plane's HTTP surface.
//!
//! One listener serves E2B's REST API (as the official `e2b` SDKs call it), Alcove's additive
//! extensions under `/alcove/v1/`, Prometheus `/metrics`, and sandbox traffic (routed by the
//! `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers or `<port>-<sandboxID>.<domain>` hosts) to the
//! VMs through a [`SandboxBackend`]. State lives in `alcove-store` (SQLite in the data dir).
//!
//! Entry point for the `alcove` binary: [`serve`] (or [`Server::bind`] + [`Server::run`]). The
//! integrator implements [`SandboxBackend`] over the node library. The REST client lives in
//! `alcove-client`, the command line in `bin/alcove`.
//!
//! Layout: `handlers/` (extract → validate → one [`service::Service`] call → map), `service/`
//! (logic by resource, testable without HTTP; every backend call goes through its one call path),
//! `proxy` (sandbox traffic), `error` (the one `ApiError`),
//! `models` (wire types), `openapi` (generated document + drift test), `server` (startup,
//! reaper), `metrics` (Prometheus text), `secrets` (the secrets key, sealing, and
//! [`StoreSecrets`], the egress proxy's source of secret values).

pub mod backend;
pub mod config;
mod connect_end;
mod dashboard;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod proxy;
pub mod secrets;
pub mod server;
pub mod service;
pub mod tls;
mod trace;

pub use backend::{
    BackendError, BackendOp, Body, BoxFuture, BuildFailure, BuildFrom, BuildLog, BuildLogEntry,
    BuildLogLevel, BuildSpec, BuiltTemplate, CreateSandbox, ImageRegistry, Keep, LiveSandbox,
    LogLevel, LogLine, ResourceUsage, SandboxBackend, SandboxStatus, StartedSandbox, Step,
    StepKind, StepRef, TemplateInfo, WarmPool,
};
pub use config::{
    BackendDeadlines, ConnectionLimits, Limits, MeteringConfig, Prices, ServerConfig, Webhook,
};
pub use error::ApiError;
pub use secrets::{SecretKey, StoreSecrets};
pub use server::{API_KEY_FILE, ServeError, Server, VOLUMES_DIR, serve, volumes_registry};
pub use service::EGRESS_EVENT_QUEUE;
