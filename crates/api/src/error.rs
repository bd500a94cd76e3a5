//! [`ApiError`]: every failure the listener answers with, REST and proxy alike.
//!
//! The body is E2B's `Error` model, `{"code": <status>, "message": ..., "error_code": ...}`, so the
//! SDKs raise the right exception (401 → AuthenticationException, 404 → NotFound, 429 →
//! RateLimitException, 502 with "was not found" → SandboxNotRunningException...). `error_code` is
//! our stable machine-readable code. Messages are written for the caller, often an LLM: they say
//! what happened and what to do next. 5xx bodies never carry internal details; those go to the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// E2B's error body.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP status code.
    pub code: u16,
    /// What went wrong and what to do next.
    pub message: String,
    /// Stable machine-readable code, e.g. `sandbox_not_found`.
    pub error_code: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key")]
    MissingApiKey,
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("sandbox not found")]
    SandboxNotFound { sandbox_id: String },
    #[error("template not found")]
    TemplateNotFound { template: String },
    #[error("invalid request body")]
    InvalidBody { detail: String },
    /// A process start the proxy refuses (a secret placeholder in it), answered as envd's
    /// streaming call would fail: a Connect end-of-stream message with `invalid_argument`, in
    /// the request's content type, so every SDK shows the message.
    #[error("process start refused")]
    ProcessStartRefused {
        detail: String,
        content_type: String,
    },
    #[error("invalid query")]
    InvalidQuery { detail: String },
    #[error("request body too large")]
    BodyTooLarge { limit: usize },
    #[error("timeout out of range")]
    TimeoutOutOfRange { requested: u64, max: u64 },
    #[error("unsupported feature")]
    Unsupported { feature: &'static str },
    /// `Idempotency-Key` is not 1 to 255 printable ASCII characters without spaces.
    #[error("invalid idempotency key")]
    InvalidIdempotencyKey,
    /// The key named a create with another body in the last 24 h.
    #[error("idempotency key reused")]
    IdempotencyKeyReused,
    /// Another request with the same key is still creating its sandbox.
    #[error("idempotent create in progress")]
    IdempotencyInProgress,
    /// A change (tags, visibility) to one of the host's own templates.
    #[error("host template is read-only")]
    HostTemplateReadOnly { name: String, action: &'static str },
    /// The key's sandbox has ended since it was created.
    #[error("idempotent sandbox ended")]
    IdempotentSandboxEnded { sandbox_id: String },
    /// A request field this server does not act on, named as the caller sent it, with what to do.
    #[error("unsupported field")]
    UnsupportedField { field: String, instead: String },
    #[error("sandbox limit reached")]
    SandboxLimit { limit: usize },
    /// A team quota other than running sandboxes ([`crate::service::Quota`]).
    #[error("team quota exceeded")]
    QuotaExceeded {
        quota: crate::service::Quota,
        used: u64,
        limit: u64,
    },
    #[error("not implemented")]
    NotImplemented { what: &'static str },
    #[error("no capacity")]
    NoCapacity,
    /// A cluster has no node that can take the sandbox (`BackendError::Unavailable`).
    #[error("no node can take the sandbox")]
    NoNode { reason: String },
    #[error("sandbox already paused")]
    AlreadyPaused { sandbox_id: String },
    #[error("sandbox already running")]
    AlreadyRunning { sandbox_id: String },
    #[error("sandbox is paused")]
    SandboxPaused { sandbox_id: String },
    #[error("pause failed")]
    PauseFailed { sandbox_id: String },
    #[error("resume failed")]
    ResumeFailed { sandbox_id: String },
    #[error("saved state corrupt")]
    SnapshotCorrupt { what: String },
    #[error("snapshot failed")]
    SnapshotFailed { sandbox_id: String },
    #[error("fork: the parent's network rules could not be read")]
    ForkRulesUnknown { sandbox_id: String },
    #[error("snapshot not found")]
    SnapshotNotFound { snapshot_id: String },
    #[error("sandbox create timed out")]
    CreateTimeout,
    #[error("sandbox create failed")]
    CreateFailed,
    #[error("request timed out")]
    RequestTimeout,
    #[error("route not found")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Anything the caller cannot act on; the cause is logged, never sent.
    #[error("internal error")]
    Internal {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A backend call did not answer within its deadline ([`crate::config::BackendDeadlines`]).
    #[error("backend call timed out")]
    BackendTimeout {
        op: &'static str,
        sandbox_id: Option<String>,
    },
    // Sandbox traffic (the proxy).
    #[error("bad sandbox routing header")]
    BadRouting { detail: String },
    #[error("sandbox access token rejected")]
    AccessTokenRejected { sandbox_id: String },
    #[error("traffic access token rejected")]
    TrafficTokenRejected { sandbox_id: String, port: u16 },
    #[error("sandbox not running")]
    SandboxGone { sandbox_id: String },
    #[error("port not open")]
    PortNotOpen { sandbox_id: String, port: u16 },
    #[error("sandbox did not answer")]
    SandboxTimeout { sandbox_id: String },
    #[error("sandbox unreachable")]
    SandboxUnreachable { sandbox_id: String },
    /// The sandbox's agent refused or failed a call the server made for the dashboard.
    #[error("sandbox agent error")]
    GuestError { sandbox_id: String, detail: String },
    /// A host-wide endpoint (`/metrics`, the warm pools) asked for with a non-admin key.
    #[error("admin key required")]
    AdminOnly,
    /// The listener already serves its maximum number of connections.
    #[error("too many connections")]
    TooManyConnections { limit: usize },
    // Template builds.
    #[error("template name taken")]
    TemplateNameTaken { name: String, by_host: bool },
    #[error("template build not found")]
    BuildNotFound {
        template_id: String,
        build_id: String,
    },
    #[error("template build already started")]
    BuildAlreadyStarted { build_id: String, status: String },
    #[error("template has no ready build")]
    TemplateNotReady { template: String },
    #[error("template belongs to another team")]
    TemplateNotOwned { template: String },
    #[error("template tag not found")]
    TagNotFound { template: String, tag: String },
    #[error("upload URL rejected")]
    UploadRejected { reason: &'static str },
    #[error("upload too large")]
    UploadTooLarge { limit: u64 },
    /// The team's spend this month reached the cap its limits set.
    #[error("monthly spend cap reached")]
    SpendCapReached {
        spend_usd: f64,
        cap_usd: f64,
        month: String,
    },
    /// `{team}` names no team (by id or name).
    #[error("team not found")]
    TeamNotFound { team: String },
    /// A team key asked about another team.
    #[error("another team")]
    OtherTeam { team: String },
    /// `/secrets/{secretID}` names no secret of this team (by id or name).
    #[error("secret not found")]
    SecretNotFound { secret: String },
    #[error("secret name taken")]
    SecretNameTaken { name: String },
    /// The team has as many secrets as a team may.
    #[error("secret limit reached")]
    SecretLimit { limit: usize },
    /// `/volumes/{volumeID}` (or a content call) names no volume of this team.
    #[error("volume not found")]
    VolumeNotFound { volume: String },
    #[error("volume name taken")]
    VolumeNameTaken { name: String },
    /// The team has as many volumes as a team may.
    #[error("volume limit reached")]
    VolumeLimit { limit: usize },
    /// Sandboxes that are not killed mount the volume.
    #[error("volume in use")]
    VolumeInUse {
        volume_id: String,
        sandboxes: Vec<String>,
    },
    /// A create's `volumeMounts` (or, with `snapshot`, the mounts a create from that snapshot
    /// inherits) names a volume the team does not have.
    #[error("mounted volume not found")]
    MountedVolumeNotFound {
        name: String,
        snapshot: Option<String>,
    },
    /// A volume content call without a volume token or API key.
    #[error("missing volume token")]
    MissingVolumeToken,
    /// A volume content call with a token that is not this volume's.
    #[error("invalid volume token")]
    InvalidVolumeToken { volume_id: String },
    /// A volume content operation failed; what the caller can do depends on `source`.
    #[error("volume content operation failed")]
    VolumeContent {
        volume_id: String,
        #[source]
        source: alcove_volume::VolError,
    },
    /// The sandbox has no screen recorder (`alcove-record`): not made from the desktop template.
    #[error("recording unavailable")]
    RecordingUnavailable { sandbox_id: String },
    /// The sandbox's recorder refused or failed; `message` is its own (bounded) words.
    #[error("recording refused")]
    Recording {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// Too many proxied requests open at once, for one sandbox or for the whole server.
    #[error("too many open sandbox streams")]
    TooManyStreams {
        sandbox_id: Option<String>,
        limit: usize,
    },
}

impl ApiError {
    /// Status, stable code and caller-facing message. One exhaustive match: adding a variant
    /// does not compile until it has all three.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        match self {
            MissingApiKey => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "No API key was sent. Send it in the X-API-KEY header (the SDKs read E2B_API_KEY); \
                 the server wrote its first key to <data-dir>/api-key."
                    .into(),
            ),
            InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "The API key is not valid or was revoked. Check E2B_API_KEY, or create a key with \
                 `alcove keys create`."
                    .into(),
            ),
            SandboxNotFound { sandbox_id } => (
                StatusCode::NOT_FOUND,
                "sandbox_not_found",
                format!(
                    "Sandbox {sandbox_id} was not found: it never existed for this team, was \
                     killed, or reached its timeout. List live sandboxes with GET /v2/sandboxes \
                     or create a new one."
                ),
            ),
            TemplateNotFound { template } => (
                StatusCode::NOT_FOUND,
                "template_not_found",
                format!(
                    "Template '{template}' was not found. List available templates with \
                     GET /templates (or `alcove template ls`) and use an id or alias from it."
                ),
            ),
            InvalidBody { detail } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                format!("The request body is not valid: {detail}. Fix the JSON and retry."),
            ),
            ProcessStartRefused { detail, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                detail.clone(),
            ),
            InvalidQuery { detail } => (
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("The query string is not valid: {detail}."),
            ),
            BodyTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "The request body is larger than the {limit} bytes this API accepts. Send \
                     large data to the sandbox through its file API instead."
                ),
            ),
            TimeoutOutOfRange { requested, max } => (
                StatusCode::BAD_REQUEST,
                "timeout_out_of_range",
                format!(
                    "A timeout of {requested} s is out of range: it must be between 1 and {max} \
                     seconds. Ask for a shorter timeout and extend it later with set_timeout."
                ),
            ),
            InvalidIdempotencyKey => (
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "The Idempotency-Key header must be 1 to 255 printable ASCII characters without \
                 spaces (the SDKs use lowercase letters, digits and hyphens)."
                    .into(),
            ),
            IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "This Idempotency-Key was used in the last 24 h for a create with a different \
                 body. Send a new key for a new sandbox, or the same body to get the sandbox \
                 the key made."
                    .into(),
            ),
            IdempotencyInProgress => (
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "Another request with this Idempotency-Key is still creating its sandbox. Retry \
                 in a few seconds to get that sandbox."
                    .into(),
            ),
            IdempotentSandboxEnded { sandbox_id } => (
                StatusCode::CONFLICT,
                "idempotent_sandbox_ended",
                format!(
                    "This Idempotency-Key created sandbox {sandbox_id}, which has ended since. \
                     Send a new key to create another sandbox."
                ),
            ),
            UnsupportedField { field, instead } => (
                StatusCode::BAD_REQUEST,
                "unsupported_feature",
                format!(
                    "'{field}' is not supported by this Alcove server yet: {instead}. Leave it \
                     out of the request."
                ),
            ),
            Unsupported { feature } => (
                StatusCode::BAD_REQUEST,
                "unsupported_feature",
                format!(
                    "'{feature}' is not supported by this Alcove server yet. Leave it out of the \
                     request."
                ),
            ),
            SandboxLimit { limit } => (
                StatusCode::TOO_MANY_REQUESTS,
                "sandbox_limit_reached",
                format!(
                    "This team already has {limit} sandboxes running, the configured maximum. \
                     Kill or pause sandboxes you no longer need (or wait for their timeout), \
                     then retry; or ask the operator to raise --team-max-running."
                ),
            ),
            QuotaExceeded { quota, used, limit } => (
                StatusCode::TOO_MANY_REQUESTS,
                quota.code(),
                quota.message(*used, *limit),
            ),
            NotImplemented { what } => (
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                format!(
                    "{what} is not implemented by this Alcove server yet. Keep the sandbox \
                     running (set_timeout) or kill it instead."
                ),
            ),
            AlreadyPaused { sandbox_id } => (
                StatusCode::CONFLICT,
                "sandbox_already_paused",
                format!(
                    "Sandbox {sandbox_id} is already paused. Resume it with connect \
                     (POST /v2/sandboxes/{sandbox_id}/connect) when you need it again."
                ),
            ),
            AlreadyRunning { sandbox_id } => (
                StatusCode::CONFLICT,
                "sandbox_already_running",
                format!(
                    "Sandbox {sandbox_id} is already running; there is nothing to resume. Use \
                     connect to get its connection details."
                ),
            ),
            SandboxPaused { sandbox_id } => (
                StatusCode::CONFLICT,
                "sandbox_paused",
                format!(
                    "Sandbox {sandbox_id} is paused. Resume it with connect \
                     (POST /v2/sandboxes/{sandbox_id}/connect), then retry."
                ),
            ),
            PauseFailed { sandbox_id } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "sandbox_pause_failed",
                format!(
                    "Sandbox {sandbox_id} could not be paused; it was left running if it still \
                     could. Check it with GET /sandboxes/{sandbox_id} and retry; the server log \
                     has the cause."
                ),
            ),
            ResumeFailed { sandbox_id } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "sandbox_resume_failed",
                format!(
                    "Sandbox {sandbox_id} could not be resumed; it stays paused with its saved \
                     state untouched. Retry; the server log has the cause."
                ),
            ),
            SnapshotCorrupt { what } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "snapshot_corrupt",
                format!(
                    "The saved state of {what} is corrupt: its checksum does not match the one \
                     recorded when it was saved, so it was not restored. It was left as it is \
                     (nothing was changed or deleted). Restore an earlier snapshot instead \
                     (GET /snapshots lists them), or kill the sandbox."
                ),
            ),
            SnapshotFailed { sandbox_id } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "snapshot_failed",
                format!(
                    "The snapshot of sandbox {sandbox_id} could not be taken. Check the sandbox \
                     with GET /sandboxes/{sandbox_id} and retry; the server log has the cause."
                ),
            ),
            ForkRulesUnknown { sandbox_id } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "fork_network_unknown",
                format!(
                    "Sandbox {sandbox_id}'s network rules could not be read, so no child was \
                     created (children keep their parent's egress rules and never start with \
                     open egress). Retry the fork; check the sandbox with \
                     GET /sandboxes/{sandbox_id}/network."
                ),
            ),
            SnapshotNotFound { snapshot_id } => (
                StatusCode::NOT_FOUND,
                "snapshot_not_found",
                format!(
                    "Snapshot {snapshot_id} was not found: it never existed for this team or was \
                     deleted. List snapshots with GET /snapshots."
                ),
            ),
            NoCapacity => (
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_capacity_unavailable",
                "The host has no capacity for another sandbox right now. Retry in a few seconds \
                 or kill sandboxes you no longer need."
                    .into(),
            ),
            NoNode { reason } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_node_available",
                format!(
                    "No node of this cluster can run the sandbox: {reason}. Retry once a node \
                     is up (GET /alcove/v1/nodes lists them)."
                ),
            ),
            CreateTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "sandbox_create_timeout",
                "The sandbox did not start in time. Retry; if it keeps happening the host is \
                 overloaded."
                    .into(),
            ),
            CreateFailed => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "sandbox_create_failed",
                "The sandbox could not be started this time. Retry; the server log has the cause."
                    .into(),
            ),
            RequestTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "request_timeout",
                "The server did not finish the request in time. Retry.".into(),
            ),
            RouteNotFound => (
                StatusCode::NOT_FOUND,
                "route_not_found",
                "No such endpoint. See GET /openapi.json for the API; sandbox traffic needs the \
                 E2b-Sandbox-Id and E2b-Sandbox-Port headers."
                    .into(),
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This endpoint does not accept that method. See GET /openapi.json.".into(),
            ),
            Internal { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_server_error",
                "Internal server error. Retry; the server log has the cause.".into(),
            ),
            BackendTimeout {
                op,
                sandbox_id: Some(id),
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                "backend_timeout",
                format!(
                    "The host did not finish '{op}' for sandbox {id} in time; it may still be \
                     busy with it. Retry in a few seconds, and check the sandbox with \
                     GET /sandboxes/{id}."
                ),
            ),
            BackendTimeout {
                op,
                sandbox_id: None,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                "backend_timeout",
                format!(
                    "The host did not finish '{op}' in time. Retry in a few seconds; if it keeps \
                     happening the host is overloaded or stuck."
                ),
            ),
            BadRouting { detail } => (
                StatusCode::BAD_REQUEST,
                "invalid_sandbox_route",
                format!("The sandbox routing is not valid: {detail}."),
            ),
            AccessTokenRejected { sandbox_id } => (
                StatusCode::UNAUTHORIZED,
                "invalid_access_token",
                format!(
                    "Sandbox {sandbox_id} is secured and the X-Access-Token header is missing or \
                     wrong. Use the envdAccessToken returned when the sandbox was created or \
                     connected."
                ),
            ),
            TrafficTokenRejected { sandbox_id, port } => (
                StatusCode::FORBIDDEN,
                "invalid_traffic_access_token",
                format!(
                    "Sandbox {sandbox_id} was created with allowPublicTraffic: false, so requests \
                     to its port {port} need its traffic access token in the \
                     e2b-traffic-access-token header; it is missing or wrong. Use the \
                     trafficAccessToken returned when the sandbox was created or connected."
                ),
            ),
            SpendCapReached {
                spend_usd,
                cap_usd,
                month,
            } => (
                StatusCode::PAYMENT_REQUIRED,
                "spend_cap_reached",
                format!(
                    "This team has spent ${spend_usd:.4} in {month} (UTC), which reached its \
                     monthly spend cap of ${cap_usd:.4}, so new and resumed sandboxes are \
                     refused until the month ends. See GET /alcove/v1/usage for what was spent; \
                     the operator can raise the cap with PUT /alcove/v1/teams/{{team}}/limits \
                     (alcove teams limits set)."
                ),
            ),
            TeamNotFound { team } => (
                StatusCode::NOT_FOUND,
                "team_not_found",
                format!(
                    "No team has the id or name {team:?}. List teams with `alcove keys list` on \
                     the server, or leave `team` out to mean your own."
                ),
            ),
            OtherTeam { team } => (
                StatusCode::FORBIDDEN,
                "admin_key_required",
                format!(
                    "Team {team:?} is not the team of this API key; only the admin team's key \
                     may read or change another team's usage and limits. Leave `team` out (or \
                     name your own) to see yours."
                ),
            ),
            AdminOnly => (
                StatusCode::FORBIDDEN,
                "admin_key_required",
                "This endpoint shows host-wide state and needs the admin team's API key (the one \
                 the server wrote to <data-dir>/api-key on first start)."
                    .into(),
            ),
            SecretNotFound { secret } => (
                StatusCode::NOT_FOUND,
                "secret_not_found",
                format!(
                    "This team has no secret {secret:?} (by id or name; names are compared \
                     lower-cased). List the team's secrets with GET /secrets, or create it with \
                     POST /secrets (Secret.create)."
                ),
            ),
            SecretNameTaken { name } => (
                StatusCode::CONFLICT,
                "secret_name_taken",
                format!(
                    "This team already has a secret named {name:?} (names are compared \
                     lower-cased). Store a new value in it with POST /secrets/{name} \
                     (Secret.update), or choose another name."
                ),
            ),
            SecretLimit { limit } => (
                StatusCode::FORBIDDEN,
                "secret_limit_reached",
                format!(
                    "This team already has {limit} secrets, the most a team may have. Delete \
                     secrets it no longer needs (DELETE /secrets/{{secretID}}), then retry."
                ),
            ),
            VolumeNotFound { volume } => (
                StatusCode::NOT_FOUND,
                "volume_not_found",
                format!(
                    "This team has no volume {volume:?}: it never existed or was destroyed. List \
                     the team's volumes with GET /volumes (Volume.list), or create one with \
                     POST /volumes (Volume.create)."
                ),
            ),
            VolumeNameTaken { name } => (
                StatusCode::CONFLICT,
                "volume_name_taken",
                format!(
                    "This team already has a volume named {name:?}. Connect to it instead \
                     (Volume.connect with the volumeID GET /volumes lists for it), or choose \
                     another name."
                ),
            ),
            VolumeLimit { limit } => (
                StatusCode::FORBIDDEN,
                "volume_limit_reached",
                format!(
                    "This team already has {limit} volumes, the most a team may have. Destroy \
                     volumes it no longer needs (DELETE /volumes/{{volumeID}}, Volume.destroy), \
                     then retry."
                ),
            ),
            VolumeInUse {
                volume_id,
                sandboxes,
            } => (
                StatusCode::CONFLICT,
                "volume_in_use",
                format!(
                    "Volume {volume_id} is mounted by {} sandbox(es) that are not killed: {}. \
                     Kill them first (DELETE /sandboxes/{{sandboxID}}; paused sandboxes count \
                     too), then destroy the volume.",
                    sandboxes.len(),
                    sandboxes.join(", ")
                ),
            ),
            MountedVolumeNotFound {
                name,
                snapshot: Some(snap),
            } => (
                StatusCode::BAD_REQUEST,
                "mounted_volume_not_found",
                format!(
                    "Snapshot {snap} was taken from a sandbox that mounted the volume {name:?}, \
                     which this team no longer has, and sandboxes made from it mount what it \
                     mounted. Create a volume named {name:?} again (Volume.create), or pass \
                     volumeMounts with volumes that exist."
                ),
            ),
            MountedVolumeNotFound {
                name,
                snapshot: None,
            } => (
                StatusCode::BAD_REQUEST,
                "mounted_volume_not_found",
                format!(
                    "volumeMounts names the volume {name:?}, which this team does not have. \
                     Create it first with Volume.create(\"{name}\") (POST /volumes), or list \
                     the team's volumes with GET /volumes."
                ),
            ),
            MissingVolumeToken => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "No volume token was sent. Send the volume's token as `Authorization: Bearer \
                 <token>` (Volume.create and Volume.connect return it; GET /volumes/{volumeID} \
                 with the API key shows it), or the team's API key in X-API-KEY."
                    .into(),
            ),
            InvalidVolumeToken { volume_id } => (
                StatusCode::UNAUTHORIZED,
                "invalid_volume_token",
                format!(
                    "The token is not volume {volume_id}'s token (each volume has its own). Get \
                     this volume's with GET /volumes/{volume_id} (Volume.connect), or send the \
                     team's API key in X-API-KEY."
                ),
            ),
            VolumeContent { volume_id, source } => volume_parts(volume_id, source),
            RecordingUnavailable { sandbox_id } => (
                StatusCode::CONFLICT,
                "recording_unavailable",
                format!(
                    "Sandbox {sandbox_id} has no screen recorder (`alcove-record` is not on its \
                     PATH). Record a sandbox made from the `desktop` template (what \
                     e2b_desktop's Sandbox.create makes), or a template built from it."
                ),
            ),
            Recording {
                status,
                code,
                message,
            } => (*status, code, message.clone()),
            TooManyConnections { limit } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                format!(
                    "The server already serves {limit} connections, its configured maximum. \
                     Close idle connections or retry in a few seconds."
                ),
            ),
            TooManyStreams {
                sandbox_id: Some(id),
                limit,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "Sandbox {id} already has {limit} requests open through the proxy, the \
                     configured maximum. Close streams you no longer read (watchers, command \
                     output, WebSockets), then retry."
                ),
            ),
            TooManyStreams {
                sandbox_id: None,
                limit,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "The server already has {limit} sandbox requests open, its configured \
                     maximum. Retry in a few seconds."
                ),
            ),
            TemplateNameTaken { name, by_host: true } => (
                StatusCode::CONFLICT,
                "template_name_taken",
                format!(
                    "'{name}' is one of the host's own templates and cannot be rebuilt through \
                     the API. Build from it (`Template().from_template(\"{name}\")`) under another \
                     name."
                ),
            ),
            HostTemplateReadOnly { name, action } => (
                StatusCode::CONFLICT,
                "host_template_read_only",
                format!(
                    "'{name}' is one of the host's own templates, which no team can {action}. \
                     Tags and visibility apply to templates your team built (`Template.build`); \
                     list yours with GET /templates."
                ),
            ),
            TemplateNameTaken { name, by_host: false } => (
                StatusCode::CONFLICT,
                "template_name_taken",
                format!(
                    "The template name '{name}' belongs to another team. Choose another name."
                ),
            ),
            BuildNotFound {
                template_id,
                build_id,
            } => (
                StatusCode::NOT_FOUND,
                "build_not_found",
                format!(
                    "Template '{template_id}' of this team has no build '{build_id}'. Request a \
                     build with POST /v3/templates and use the templateID and buildID it returns."
                ),
            ),
            BuildAlreadyStarted { build_id, status } => (
                StatusCode::CONFLICT,
                "build_already_started",
                format!(
                    "Build '{build_id}' was already started (it is {status}); a build runs once. \
                     Request a new build with POST /v3/templates."
                ),
            ),
            TemplateNotReady { template } => (
                StatusCode::BAD_REQUEST,
                "template_not_ready",
                format!(
                    "Template '{template}' has no successful build yet. Wait for its build to \
                     finish (GET /templates/{{templateID}}/builds/{{buildID}}/status), or fix and \
                     rebuild it if it failed."
                ),
            ),
            TemplateNotOwned { template } => (
                StatusCode::FORBIDDEN,
                "template_forbidden",
                format!(
                    "Template '{template}' exists but belongs to another team; only that team \
                     can use or change it. Build your own under another name."
                ),
            ),
            TagNotFound { template, tag } => (
                StatusCode::NOT_FOUND,
                "tag_not_found",
                format!(
                    "Template '{template}' has no tag '{tag}'. List its tags with \
                     GET /templates/{{templateID}}/tags."
                ),
            ),
            UploadRejected { reason } => (
                StatusCode::FORBIDDEN,
                "upload_url_rejected",
                format!(
                    "This upload URL cannot be used: {reason}. Ask for a new one with \
                     GET /templates/{{templateID}}/files/{{hash}}."
                ),
            ),
            UploadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload_too_large",
                format!(
                    "The uploaded archive passes the limit of {limit} bytes. Copy fewer files \
                     (use .dockerignore or ignore patterns), or ask the operator to raise \
                     --max-template-upload."
                ),
            ),
            // "was not found" is the phrase the SDKs match to raise SandboxNotRunningException.
            SandboxGone { sandbox_id } => (
                StatusCode::BAD_GATEWAY,
                "sandbox_not_running",
                format!(
                    "The sandbox {sandbox_id} was not found: it was killed or reached its timeout."
                ),
            ),
            // "port is not open" is the phrase the SDKs match to raise SandboxUnreachableException.
            PortNotOpen { sandbox_id, port } => (
                StatusCode::BAD_GATEWAY,
                "port_not_open",
                format!(
                    "The sandbox {sandbox_id} is running but the port is not open: nothing \
                     listens on port {port}. Start a server on 0.0.0.0:{port} inside the sandbox."
                ),
            ),
            SandboxTimeout { sandbox_id } => (
                StatusCode::GATEWAY_TIMEOUT,
                "sandbox_timeout",
                format!("The sandbox {sandbox_id} did not answer in time. Retry."),
            ),
            SandboxUnreachable { sandbox_id } => (
                StatusCode::BAD_GATEWAY,
                "sandbox_unreachable",
                format!(
                    "The sandbox {sandbox_id} could not be reached. Check its state with \
                     GET /sandboxes/{sandbox_id} and retry."
                ),
            ),
            GuestError { sandbox_id, detail } => (
                StatusCode::BAD_GATEWAY,
                "sandbox_error",
                format!("The agent in sandbox {sandbox_id} could not do it: {detail}"),
            ),
        }
    }
}

/// Status, code and message of a failed volume content operation.
fn volume_parts(
    volume_id: &str,
    e: &alcove_volume::VolError,
) -> (StatusCode, &'static str, String) {
    use alcove_volume::VolError as V;
    match e {
        V::InvalidPath(path, why) => (
            StatusCode::BAD_REQUEST,
            "volume_path_invalid",
            format!(
                "The path {path:?} cannot be used in a volume: {why}. Name paths from the \
                 volume's root, like /dir/file.txt."
            ),
        ),
        V::NotFound(path) => (
            StatusCode::NOT_FOUND,
            "volume_path_not_found",
            format!(
                "{path} does not exist in volume {volume_id}. See what is there with \
                 GET /volumecontent/{volume_id}/dir?path=/ (Volume.list); create directories \
                 with make_dir (force=true makes missing parents)."
            ),
        ),
        V::Exists(path) => (
            StatusCode::CONFLICT,
            "volume_path_exists",
            format!(
                "{path} already exists in volume {volume_id}. Pass force=true to overwrite a \
                 file (or to accept an existing directory), or choose another path."
            ),
        ),
        V::NotADirectory(path) => (
            StatusCode::BAD_REQUEST,
            "volume_not_a_directory",
            format!(
                "{path} (or one of its parents) in volume {volume_id} is not a directory. Check \
                 the path with GET /volumecontent/{volume_id}/path (Volume.get_info)."
            ),
        ),
        V::IsADirectory(path) => (
            StatusCode::BAD_REQUEST,
            "volume_is_a_directory",
            format!(
                "{path} in volume {volume_id} is a directory. List it with Volume.list, or \
                 name a file inside it."
            ),
        ),
        V::NotAFile(path) => (
            StatusCode::BAD_REQUEST,
            "volume_not_a_file",
            format!(
                "{path} in volume {volume_id} is not a regular file (a directory, link or \
                 device), so it has no content to read. Check it with Volume.get_info."
            ),
        ),
        V::NotEmpty(path) => (
            StatusCode::CONFLICT,
            "volume_directory_not_empty",
            format!(
                "The directory {path} in volume {volume_id} is not empty. Remove it whole with \
                 DELETE /volumecontent/{volume_id}/path (Volume.remove)."
            ),
        ),
        V::Full { limit } => (
            StatusCode::INSUFFICIENT_STORAGE,
            "volume_full",
            format!(
                "Volume {volume_id} is full: it holds at most {limit} bytes. Remove files you \
                 no longer need (Volume.remove) or use another volume, then retry."
            ),
        ),
        V::TeamQuota => (
            StatusCode::TOO_MANY_REQUESTS,
            "storage_quota_exceeded",
            format!(
                "Volume {volume_id} cannot grow: its team's paused sandboxes, snapshots and \
                 volumes hold at least the team's storage limit (see GET \
                 /alcove/v1/teams/{{team}}/limits). Remove files, volumes, snapshots or paused \
                 sandboxes you no longer need, then retry; or ask the operator to raise \
                 --team-max-stored."
            ),
        ),
        V::TooManyEntries { max } => (
            StatusCode::INSUFFICIENT_STORAGE,
            "volume_full",
            format!(
                "Volume {volume_id} already holds {max} files and directories, its maximum. \
                 Remove some (Volume.remove) or use another volume, then retry."
            ),
        ),
        V::TooMany { max } => (
            StatusCode::BAD_REQUEST,
            "volume_listing_too_large",
            format!(
                "The listing has more than {max} entries. List a subdirectory, or a smaller \
                 depth (depth=1 lists one level)."
            ),
        ),
        V::NoVolume(_) => (
            StatusCode::NOT_FOUND,
            "volume_not_found",
            format!(
                "Volume {volume_id} has no files on this server (it was destroyed). List the \
                 team's volumes with GET /volumes."
            ),
        ),
        // I/O failures, and whatever the volume crate adds later: the cause is logged, never
        // sent.
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "Internal server error. Retry; the server log has the cause.".into(),
        ),
    }
}

/// The error behind an error response, with its cause. It rides on the response as an
/// extension so that one middleware (`server::observe_request`) logs it once, inside the
/// request's span; it is never serialized.
#[derive(Debug, Clone)]
pub struct ErrorCause(pub std::sync::Arc<ApiError>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error_code, message) = self.parts();
        crate::metrics::METRICS.error(error_code);
        if let ApiError::ProcessStartRefused { content_type, .. } = &self {
            let end =
                serde_json::json!({"error": {"code": error_code, "message": message}}).to_string();
            let mut body = Vec::with_capacity(5 + end.len());
            body.push(0x02); // Connect's end-of-stream flag
            body.extend_from_slice(&(end.len() as u32).to_be_bytes());
            body.extend_from_slice(end.as_bytes());
            let mut resp = Response::new(axum::body::Body::from(body));
            if let Ok(v) = axum::http::HeaderValue::from_str(content_type) {
                resp.headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, v);
            }
            resp.extensions_mut()
                .insert(ErrorCause(std::sync::Arc::new(self)));
            return resp;
        }
        let body = ErrorBody {
            code: status.as_u16(),
            message,
            error_code: error_code.into(),
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(retry) = self.should_retry() {
            // The SDKs retry 429/502/503/504 unless this says otherwise, and honour it on any
            // status; Retry-After says when.
            let h = resp.headers_mut();
            h.insert(
                "should-retry",
                axum::http::HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
            if retry {
                h.insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("2"),
                );
            }
        }
        resp.extensions_mut()
            .insert(ErrorCause(std::sync::Arc::new(self)));
        resp
    }
}

impl From<alcove_store::StoreError> for ApiError {
    fn from(e: alcove_store::StoreError) -> Self {
        match e {
            alcove_store::StoreError::SandboxNotFound => ApiError::SandboxNotFound {
                sandbox_id: String::new(),
            },
            other => ApiError::internal(other),
        }
    }
}

impl ApiError {
    /// Whether a client should send the same request again (`Should-Retry`), where it is known:
    /// `false` where only the caller or the operator can change the outcome (a limit reached, a
    /// create that timed out and may still be starting), `true` where waiting is enough.
    pub fn should_retry(&self) -> Option<bool> {
        use ApiError::*;
        match self {
            SandboxLimit { .. }
            | SecretLimit { .. }
            | VolumeLimit { .. }
            | QuotaExceeded { .. }
            | SpendCapReached { .. }
            | CreateTimeout
            | IdempotencyKeyReused => Some(false),
            NoCapacity | NoNode { .. } | TooManyConnections { .. } | IdempotencyInProgress => {
                Some(true)
            }
            _ => None,
        }
    }

    /// An internal error with its cause (logged once by the request middleware, never sent).
    pub fn internal(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        ApiError::Internal {
            source: Box::new(cause),
        }
    }
}

/// The whole source chain of an error, on one line (the one implementation, shared with the
/// node and the guest).
pub use alcove_guest_contract::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_what_the_sdk_maps_to_exceptions() {
        let cases = [
            (ApiError::InvalidApiKey, 401),
            (
                ApiError::SandboxNotFound {
                    sandbox_id: "x".into(),
                },
                404,
            ),
            (ApiError::SandboxLimit { limit: 1 }, 429),
            (ApiError::NoCapacity, 503),
            (
                ApiError::NoNode {
                    reason: "none has joined".into(),
                },
                503,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.parts().0.as_u16(), status, "{e:?}");
        }
        let (_, _, msg) = ApiError::SandboxGone {
            sandbox_id: "x".into(),
        }
        .parts();
        assert!(msg.contains("was not found"));
        let (_, _, msg) = ApiError::PortNotOpen {
            sandbox_id: "x".into(),
            port: 1,
        }
        .parts();
        assert!(msg.contains("port is not open"));
    }

    #[test]
    fn server_errors_do_not_leak_details() {
        for e in [
            ApiError::internal(std::io::Error::other("secret detail")),
            ApiError::CreateFailed,
        ] {
            let (status, _, msg) = e.parts();
            assert!(status.is_server_error());
            assert!(msg.contains("server log"));
            assert!(!msg.contains("secret detail"));
        }
    }
}
