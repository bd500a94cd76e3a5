//! Server configuration. Every limit is configurable; none is a hard-coded tier. The defaults
//! live here and nowhere else, backend deadlines included.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::BackendOp;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address for the REST API and the sandbox traffic proxy (one listener serves both).
    pub listen: SocketAddr,
    /// Holds `alcove.db` and, after the first start, `api-key`.
    pub data_dir: PathBuf,
    /// The store (`--database-url`); `None` is `<data_dir>/alcove.db`.
    pub database: Option<alcove_store::Database>,
    /// Domain for `<port>-<sandboxID>.<domain>` routing and the `domain` the SDK is given.
    /// `None` means `localhost:<listen port>`.
    pub domain: Option<String>,
    pub limits: Limits,
    pub metering: MeteringConfig,
    /// TLS on the listener (`--tls-cert`, `--tls-key`; [`crate::tls::server_config`]); `None`
    /// serves plain HTTP.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// Metering, prices and spend-cap warnings (`docs/metering.md`).
#[derive(Debug, Clone)]
pub struct MeteringConfig {
    /// How often running sandboxes' compute, everything stored, and egress counters are
    /// written as usage events, and spend caps checked (`--meter-interval`). State changes
    /// close intervals at once whatever this is; it bounds the length of one event and how
    /// late a cap is noticed.
    pub interval: Duration,
    /// What usage costs (`--prices FILE`).
    pub prices: Prices,
    /// Where spend warnings are POSTed, signed (`--webhook-url`, `--webhook-secret`).
    pub webhook: Option<Webhook>,
    /// How often every running sandbox's CPU, memory and disk are sampled into its metrics
    /// history (`--metrics-interval`; zero: never, samples are taken only when asked for).
    pub sample_interval: Duration,
    /// Audit records older than this are deleted (`--audit-retention`; `None`: kept).
    pub audit_retention: Option<Duration>,
    /// Whether sandbox traffic is traced into the audit log: processes, file operations and
    /// transfers (`--no-run-traces` turns it off; API calls and state changes are recorded
    /// whatever this is).
    pub run_traces: bool,
    /// Where spans go by OTLP/HTTP protobuf (`--otlp-endpoint`, the full `/v1/traces` URL);
    /// `None`: no export.
    pub otlp_endpoint: Option<String>,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            interval: Duration::from_secs(60),
            prices: Prices::default(),
            webhook: None,
            sample_interval: Duration::from_secs(5),
            audit_retention: Some(Duration::from_secs(90 * 24 * 3600)),
            run_traces: true,
            otlp_endpoint: None,
        }
    }
}

/// A webhook for spend warnings: each POST carries `X-Alcove-Signature: sha256=<hex>`, the
/// HMAC-SHA256 under `secret` of `<X-Alcove-Timestamp>.<body>`.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Prices in US dollars. The defaults are E2B's public list prices (December 2026): $0.000014
/// per vCPU-second and $0.0000045 per GiB-second of memory, allocated, while running. E2B lists
/// no separate price for storage or egress, so both default to 0; set them in `--prices`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    pub vcpu_second: f64,
    pub memory_gib_second: f64,
    pub storage_gib_hour: f64,
    pub egress_gib: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            vcpu_second: 0.000014,
            memory_gib_second: 0.0000045,
            storage_gib_hour: 0.0,
            egress_gib: 0.0,
        }
    }
}

impl Prices {
    /// Every price a finite number, not negative.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("vcpu_second", self.vcpu_second),
            ("memory_gib_second", self.memory_gib_second),
            ("storage_gib_hour", self.storage_gib_hour),
            ("egress_gib", self.egress_gib),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} = {v} must be a number >= 0"));
            }
        }
        Ok(())
    }

    /// What these quantities cost.
    pub fn cost(&self, q: &alcove_store::Quantities) -> f64 {
        q.vcpu_seconds * self.vcpu_second
            + q.memory_gib_seconds * self.memory_gib_second
            + q.storage_gib_hours * self.storage_gib_hour
            + q.egress_bytes as f64 / (1u64 << 30) as f64 * self.egress_gib
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Lifetime of a sandbox created without `timeout` (E2B's default: 300 s).
    pub default_timeout: Duration,
    /// Longest lifetime a create, `/timeout` or `/refreshes` may ask for.
    pub max_timeout: Duration,
    /// Sandboxes one team may have creating or running at once (`--max-sandboxes`, alias
    /// `--team-max-running`). Checked on create, resume (connect, autoResume) and fork, where
    /// every child counts up front.
    pub max_concurrent_sandboxes: usize,
    /// Paused sandboxes one team may keep (`--team-max-paused`). Checked on pause; an
    /// `autoPause` at the end time that would pass it kills the sandbox instead.
    pub max_paused_sandboxes: usize,
    /// Snapshots one team may keep, not counting deleted ones (`--team-max-snapshots`).
    pub max_snapshots: usize,
    /// Bytes one team's paused sandboxes and snapshots may hold on the host's disk
    /// (`--team-max-stored`). Checked before a pause, snapshot or fork adds more: the use is
    /// measured, so one operation may pass it by the size of what it saves.
    pub max_stored_bytes: u64,
    /// A paused sandbox older than this is deleted by the reaper, with its saved state
    /// (`--paused-retention`; `None`: kept until killed).
    pub paused_retention: Option<Duration>,
    /// Templates one team may own (`--team-max-templates`). Checked when a build of a new name is
    /// requested.
    pub max_templates: usize,
    /// Bytes one team's built templates may hold (`--team-max-template-storage`). Checked when a
    /// build starts; measured, so the build that passes it is kept.
    pub max_template_bytes: u64,
    /// Largest template file upload (`--max-template-upload`). Uploads are exempt from
    /// `max_body_bytes` and `request_timeout`; they have this cap and `upload_timeout`.
    pub max_upload_bytes: u64,
    /// Deadline for one upload, and for the gap between two of its chunks (a tenth of it).
    pub upload_timeout: Duration,
    /// Deadline for one template build, from its start (`--build-timeout`).
    pub build_timeout: Duration,
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
    /// Deadlines for every other backend call (the create's is `create_timeout`).
    pub backend: BackendDeadlines,
    /// The listener's connection and stream caps (slow or idle clients, fd exhaustion).
    pub connections: ConnectionLimits,
    /// Each volume's size and entry caps (`<data>/volumes/<id>/`, `docs/api.md` Volumes), for
    /// the registry [`crate::Server::bind`] makes when the caller hands it none.
    pub volumes: alcove_volume::Limits,
}

/// What one client can hold open on the listener. Everything here is reachable without a key,
/// so every resource a connection holds has a cap or a deadline.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections served at once; one more is answered 503 and closed at once, not queued.
    pub max_connections: usize,
    /// How long an HTTP/1 client may take to send a request's headers, counted from when the
    /// server starts waiting for them: it bounds slow headers and idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// HTTP/2: a ping this often on a quiet connection, closed if unanswered for as long again.
    pub keep_alive_interval: Duration,
    /// HTTP/2: streams one connection may have open at once.
    pub max_h2_streams: u32,
    /// Proxied requests (sandbox traffic) open at once, all sandboxes together; each holds a
    /// connection into a sandbox until its response body ends.
    pub max_proxied_streams: usize,
    /// Proxied requests open at once to one sandbox.
    pub max_proxied_streams_per_sandbox: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(15),
            keep_alive_interval: Duration::from_secs(30),
            max_h2_streams: 256,
            max_proxied_streams: 4096,
            max_proxied_streams_per_sandbox: 512,
        }
    }
}

/// How long the API waits for one backend call, per operation. A call past its deadline counts
/// as `BackendError::Timeout`: the caller gets a timeout error and the background duties go on
/// with the next sandbox. Sandbox traffic (`forward`) has none: it can stream for hours.
#[derive(Debug, Clone)]
pub struct BackendDeadlines {
    pub templates: Duration,
    pub kill: Duration,
    pub list: Duration,
    pub status: Duration,
    pub metrics: Duration,
    pub logs: Duration,
    pub network: Duration,
    pub update_network: Duration,
    pub warm_pool: Duration,
    /// Pause, resume and snapshot save or restore a whole sandbox (all of its memory under TCG).
    pub pause: Duration,
    pub resume: Duration,
    pub snapshot: Duration,
    pub delete_snapshot: Duration,
    pub stored_bytes: Duration,
    /// A command the API runs in a sandbox (`exec`: screen recordings).
    pub exec: Duration,
}

impl Default for BackendDeadlines {
    fn default() -> Self {
        let s = Duration::from_secs;
        BackendDeadlines {
            templates: s(30),
            kill: s(30),
            list: s(30),
            status: s(10),
            metrics: s(10),
            logs: s(10),
            network: s(10),
            update_network: s(30),
            warm_pool: s(10),
            pause: s(120),
            resume: s(120),
            snapshot: s(120),
            delete_snapshot: s(30),
            stored_bytes: s(30),
            exec: s(120),
        }
    }
}

impl BackendDeadlines {
    /// Every deadline set to `d` (tests).
    pub fn all(d: Duration) -> Self {
        BackendDeadlines {
            templates: d,
            kill: d,
            list: d,
            status: d,
            metrics: d,
            logs: d,
            network: d,
            update_network: d,
            warm_pool: d,
            pause: d,
            resume: d,
            snapshot: d,
            delete_snapshot: d,
            stored_bytes: d,
            exec: d,
        }
    }
}

impl Limits {
    /// The deadline of one backend call; `None` for sandbox traffic.
    pub fn backend_deadline(&self, op: BackendOp) -> Option<Duration> {
        let b = &self.backend;
        Some(match op {
            BackendOp::Templates => b.templates,
            BackendOp::Create => self.create_timeout,
            BackendOp::Kill => b.kill,
            BackendOp::List => b.list,
            BackendOp::Status => b.status,
            BackendOp::Metrics => b.metrics,
            BackendOp::Logs => b.logs,
            BackendOp::Network => b.network,
            BackendOp::UpdateNetwork => b.update_network,
            BackendOp::WarmPool => b.warm_pool,
            BackendOp::Pause => b.pause,
            BackendOp::Resume => b.resume,
            BackendOp::Snapshot => b.snapshot,
            BackendOp::DeleteSnapshot => b.delete_snapshot,
            BackendOp::DeleteTemplate => b.delete_snapshot,
            BackendOp::StoredBytes => b.stored_bytes,
            BackendOp::NetCounters => b.network,
            BackendOp::Exec => b.exec,
            BackendOp::Drain => b.list,
            // An upload of a paused sandbox's state, as long as a pause may take.
            BackendOp::Evict => b.pause,
            BackendOp::Forward { .. } => return None,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            max_concurrent_sandboxes: 100,
            max_paused_sandboxes: 100,
            max_snapshots: 100,
            max_stored_bytes: 100 << 30,
            // E2B keeps a paused sandbox for 30 days.
            paused_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            max_templates: 50,
            max_template_bytes: 100 << 30,
            max_upload_bytes: 1 << 30,
            upload_timeout: Duration::from_secs(3600),
            build_timeout: Duration::from_secs(30 * 60),
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
            create_timeout: Duration::from_secs(120),
            reaper_interval: Duration::from_secs(1),
            liveness_interval: Duration::from_secs(5),
            backend: BackendDeadlines::default(),
            connections: ConnectionLimits::default(),
            volumes: alcove_volume::Limits::default(),
        }
    }
}

impl ServerConfig {
    /// Where the store is: `database`, or the SQLite file in the data directory.
    pub fn database(&self) -> alcove_store::Database {
        self.database.clone().unwrap_or_else(|| {
            alcove_store::Database::Sqlite(self.data_dir.join(alcove_store::DB_FILE))
        })
    }

    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            listen,
            data_dir: data_dir.into(),
            database: None,
            domain: None,
            limits: Limits::default(),
            metering: MeteringConfig::default(),
            tls: None,
        }
    }
}
