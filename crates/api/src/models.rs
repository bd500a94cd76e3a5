//! Wire types: the JSON the `e2b` SDKs send and expect (field names exactly as E2B's
//! `spec/openapi.yml` and the SDK's generated models spell them), plus our additive extensions.
//!
//! Request bodies reject unknown fields, but list every field the 2.63 SDKs can send, so a
//! client typo is a 400 and an SDK request never is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

/// `clientID` in E2B's responses is a legacy field the SDKs ignore.
pub const CLIENT_ID: &str = "alcove";

/// Body of `POST /sandboxes` and `POST /v2/sandboxes`. (Serialize: its hash ties an
/// `Idempotency-Key` to the body it came with.)
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSandbox {
    /// Template id or alias.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Lifetime in seconds from now; the server's default (300 s) when absent.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Pause instead of kill at the timeout (memory, processes and disk are kept).
    #[serde(default, rename = "autoPause")]
    pub auto_pause: Option<bool>,
    /// `false`: the timeout pause keeps only the disk (the SDKs' `on_timeout` `mode:
    /// "filesystem"`); not with `autoResume` (400).
    #[serde(default, rename = "autoPauseMemory")]
    pub auto_pause_memory: Option<bool>,
    /// `{"enabled": true}`: traffic to a paused sandbox resumes it.
    #[serde(default, rename = "autoResume")]
    #[schema(value_type = Option<Object>)]
    pub auto_resume: Option<Value>,
    /// Ignored, as in E2B: sandboxes are always secured with an envd access token.
    #[serde(default)]
    pub secure: Option<bool>,
    /// `false` asks for a sandbox without outbound network.
    #[serde(default)]
    pub allow_internet_access: Option<bool>,
    /// Network settings. Only `allowPublicTraffic` is supported (`false`: ports other than the
    /// agent's need the returned `trafficAccessToken` in `e2b-traffic-access-token`); egress
    /// rules are refused.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub network: Option<Value>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment variables for every process in the sandbox. Only the names are stored.
    #[serde(default, rename = "envVars")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// MCP servers to run behind the sandbox's MCP gateway: an object of server name to that
    /// server's settings (at most 64 KiB as JSON), e.g. `{"filesystem": {"paths": ["/home/user"]}}`.
    /// Only the shape is checked here; the SDKs then start `mcp-gateway` in the sandbox, which
    /// refuses servers it cannot run (see docs/mcp-gateway.md).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub mcp: Option<Value>,
    /// Workload identity. Not supported: must be absent, null or `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub iam: Option<Value>,
    /// Volumes of the caller's team to mount (`docs/api.md` Volumes): at most 8, each at its
    /// own absolute path. A create from a snapshot without any keeps the mounts of the sandbox
    /// the snapshot was taken from.
    #[serde(default, rename = "volumeMounts")]
    pub volume_mounts: Option<Vec<SandboxVolumeMount>>,
}

/// Body of `POST /sandboxes/{sandboxID}/timeout`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// Seconds from now after which the sandbox is killed.
    pub timeout: i64,
}

/// Body of `POST /sandboxes/{sandboxID}/refreshes`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// Keep the sandbox alive at least this many seconds from now.
    #[serde(default)]
    pub duration: Option<i64>,
}

/// Body of `POST /sandboxes/{sandboxID}/connect` and `POST /v2/sandboxes/{sandboxID}/connect`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// Seconds from now; extends the sandbox's end time, never shortens it.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// `false` cold-boots a paused sandbox from its disk alone, dropping its memory image (the
    /// SDKs' `on_resume="reboot"`); a running sandbox is left as it is.
    #[serde(default)]
    pub memory: Option<bool>,
}

/// Body of `POST /sandboxes/{sandboxID}/pause`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// `false` (the SDKs' `mode="filesystem"`) keeps only the disk: no memory image, and the
    /// resume cold-boots from the disk (processes and memory gone, files and env vars kept).
    #[serde(default)]
    pub memory: Option<bool>,
    /// Accepted; the pause always needs the agent to answer.
    #[serde(default, rename = "requireHealthyGuest")]
    pub require_healthy_guest: Option<bool>,
}

/// Body of `POST /sandboxes/{sandboxID}/resume`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// Lifetime in seconds from now (default: the one asked for at create).
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Pause instead of kill at the new end time.
    #[serde(default, rename = "autoPause")]
    pub auto_pause: Option<bool>,
    /// `false` cold-boots from the disk alone, as on connect.
    #[serde(default)]
    pub memory: Option<bool>,
}

/// Body of `POST /sandboxes/{sandboxID}/snapshots`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A name the snapshot can also be restored by (the newest snapshot of that name wins).
    #[serde(default)]
    pub name: Option<String>,
    /// `false` (the SDKs' `mode="filesystem"`): sandboxes made from the snapshot cold-boot from
    /// its disk (files and env vars kept, no processes or memory).
    #[serde(default)]
    pub memory: Option<bool>,
}

/// A snapshot (E2B `SnapshotInfo`): create a sandbox from it with `templateID: snapshotID`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// The snapshot's name, or its id when it has none.
    pub names: Vec<String>,
}

/// Body of `POST /sandboxes/{sandboxID}/fork` and `POST /alcove/v1/sandboxes/{sandboxID}/fork`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// Lifetime of each child in seconds (default: the parent's).
    #[serde(default)]
    pub timeout: Option<i64>,
    /// How many children, 1-100 (default 1).
    #[serde(default)]
    pub count: Option<i64>,
}

/// One child of a fork (E2B `SandboxForkResult`): exactly one of `sandbox` and `error`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::error::ErrorBody>,
}

/// Answer of `POST /alcove/v1/sandboxes/{sandboxID}/fork`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlcoveForkResponse {
    /// The checkpoint the children were restored from (deleted once taken: its disk layer
    /// stays while the children need it).
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub children: Vec<ForkResult>,
}

/// One node of the checkpoint tree (`GET /alcove/v1/snapshots/tree`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotNode {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub name: Option<String>,
    /// `snapshot` (asked for) or `fork` (taken by a fork).
    pub kind: String,
    /// The sandbox it was taken from.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    /// Deleted snapshots stay in the tree while descendants exist; they cannot be restored.
    pub deleted: bool,
    /// Running or paused sandboxes whose latest checkpoint this is.
    pub sandboxes: Vec<String>,
    #[schema(no_recursion)]
    pub children: Vec<SnapshotNode>,
}

/// `GET /alcove/v1/snapshots/tree`: the team's snapshots as a forest rooted at templates.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTree {
    pub roots: Vec<SnapshotNode>,
}

/// One template's warm pool (`GET /alcove/v1/warm-pool`): VMs restored and warmed ahead of
/// demand, which creates of that template take instead of restoring one while the caller waits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WarmPoolView {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// VMs the host keeps ready now: between `min` and `max` (`alcove server --warm-pool`), as
    /// many as the last 30 s of creates call for.
    pub target: usize,
    pub min: usize,
    pub max: usize,
    /// VMs ready now.
    pub ready: usize,
    /// Creates served from the pool since the server started.
    pub hits: u64,
    /// Creates that found the pool empty and restored a VM themselves.
    pub misses: u64,
    /// Why filling the pool fails, while it does.
    #[serde(rename = "lastError", skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A created or connected sandbox (E2B `Sandbox`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Send as `X-Access-Token` on every request to the sandbox.
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: Option<String>,
    /// Sandbox traffic reaches `<port>-<sandboxID>.<domain>`.
    pub domain: Option<String>,
}

/// E2B's sandbox states. Sandboxes still `creating` are not listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxLifecycle {
    #[serde(rename = "autoResume")]
    pub auto_resume: bool,
    /// `kill`, or `pause` for sandboxes created with `autoPause`.
    #[serde(rename = "onTimeout")]
    pub on_timeout: String,
}

/// `GET /sandboxes/{sandboxID}` (E2B `SandboxDetail`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339.
    #[serde(rename = "startedAt")]
    pub started_at: String,
    /// RFC 3339: when the sandbox will be killed unless its timeout is extended.
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub state: SandboxState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(rename = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
    pub domain: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub lifecycle: SandboxLifecycle,
    /// The sandbox's network as it is now (after any `PUT .../network`), what the SDKs'
    /// `get_info().network` shows.
    pub network: SandboxNetwork,
    /// The volumes it was created with.
    #[serde(rename = "volumeMounts")]
    pub volume_mounts: Vec<SandboxVolumeMount>,
}

/// E2B's `SandboxNetworkConfig` as `GET /sandboxes/{id}` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxNetwork {
    /// Allowed CIDRs, IPs and domains (they win over `denyOut`).
    #[serde(rename = "allowOut")]
    pub allow_out: Vec<String>,
    /// Denied CIDRs and IPs; `0.0.0.0/0` when internet access is off.
    #[serde(rename = "denyOut")]
    pub deny_out: Vec<String>,
    /// `false`: ports other than the agent's need the traffic access token.
    #[serde(rename = "allowPublicTraffic")]
    pub allow_public_traffic: bool,
    /// Per-domain request transforms (`{"api.example.com": [{"transform": {"headers":
    /// {...}}}]}`), with their `${e2b.secrets.NAME}` placeholders, never values.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rules: Option<serde_json::Value>,
}

/// One item of `GET /sandboxes` and `GET /v2/sandboxes` (E2B `ListedSandbox`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "startedAt")]
    pub started_at: String,
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub state: SandboxState,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// The volumes it was created with.
    #[serde(rename = "volumeMounts")]
    pub volume_mounts: Vec<SandboxVolumeMount>,
}

/// One resource sample (E2B `SandboxMetric`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxMetric {
    pub timestamp: String,
    #[serde(rename = "timestampUnix")]
    pub timestamp_unix: i64,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "cpuUsedPct")]
    pub cpu_used_pct: f64,
    #[serde(rename = "memUsed")]
    pub mem_used: u64,
    #[serde(rename = "memTotal")]
    pub mem_total: u64,
    #[serde(rename = "memCache")]
    pub mem_cache: u64,
    #[serde(rename = "diskUsed")]
    pub disk_used: u64,
    #[serde(rename = "diskTotal")]
    pub disk_total: u64,
}

/// `GET /sandboxes/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxesWithMetrics {
    pub sandboxes: BTreeMap<String, SandboxMetric>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxLog {
    pub timestamp: String,
    pub line: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxLogEntry {
    pub timestamp: String,
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    #[schema(value_type = Object)]
    pub fields: BTreeMap<String, String>,
}

/// `GET /sandboxes/{sandboxID}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxLogs {
    pub logs: Vec<SandboxLog>,
    #[serde(rename = "logEntries")]
    pub log_entries: Vec<SandboxLogEntry>,
}

/// `GET /v2/sandboxes/{sandboxID}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxLogsV2 {
    pub logs: Vec<SandboxLogEntry>,
}

/// A template (E2B `Template`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Template {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
    /// Always null: templates are built by the host operator.
    #[serde(rename = "createdBy")]
    #[schema(value_type = Option<Object>)]
    pub created_by: Option<Value>,
    #[serde(rename = "lastSpawnedAt")]
    pub last_spawned_at: Option<String>,
    #[serde(rename = "spawnCount")]
    pub spawn_count: u64,
    #[serde(rename = "buildCount")]
    pub build_count: u64,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// `ready` for every template the host lists.
    #[serde(rename = "buildStatus")]
    pub build_status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuild {
    /// A UUID.
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "updatedAt")]
    pub updated_at: String,
    #[serde(rename = "finishedAt", skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
}

/// `GET /templates/{templateID}` (E2B `TemplateWithBuilds`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateWithBuilds {
    #[serde(flatten)]
    pub template: Template,
    pub builds: Vec<TemplateBuild>,
}

/// `GET /templates/aliases/{alias}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub public: bool,
}

/// Extension: one state change in a sandbox's history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxEventView {
    pub at: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
}

/// Extension (`GET /alcove/v1/sandboxes/{sandboxID}`): the full record of any sandbox this team
/// ever created, including killed and lost ones, with its state history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxRecordView {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub alias: Option<String>,
    /// `creating`, `running`, `paused`, `killed` or `lost`.
    pub state: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "startedAt")]
    pub started_at: String,
    #[serde(rename = "endAt")]
    pub end_at: String,
    #[serde(rename = "endedAt")]
    pub ended_at: Option<String>,
    /// Why a `killed` or `lost` sandbox ended.
    #[serde(rename = "endReason")]
    pub end_reason: Option<String>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub metadata: BTreeMap<String, String>,
    /// Names of the env vars it was created with (values are never stored).
    #[serde(rename = "envVarNames")]
    pub env_var_names: Vec<String>,
    pub history: Vec<SandboxEventView>,
}

/// Formats Unix milliseconds as RFC 3339 (UTC, `Z`).
pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// Parses RFC 3339 (any offset) into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub fn system_time_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_with_offsets() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        let ms = 1_795_000_000_123;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        // What Python's isoformat() sends for an aware datetime.
        assert_eq!(
            parse_rfc3339("2026-11-22T19:00:00.500000+01:00"),
            parse_rfc3339("2026-11-22T18:00:00.5Z")
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn sdk_create_bodies_parse_and_typos_do_not() {
        let py = r#"{"templateID":"base","autoPause":false,"autoPauseMemory":true,
            "metadata":{},"timeout":60,"envVars":{"A":"1"}}"#;
        let b: NewSandbox = serde_json::from_str(py).unwrap();
        assert_eq!(b.timeout, Some(60));
        assert!(serde_json::from_str::<NewSandbox>(r#"{"templateId":"base"}"#).is_err());
        assert!(serde_json::from_str::<NewSandbox>(r#"{"templateID":"b","tmeout":1}"#).is_err());
    }
}

// ---- Template builds (E2B's `Template` build API, SDK v2) ----

/// Body of `POST /v3/templates`: a new build of the team's template `name` (made if missing).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBuildRequestV3 {
    /// The template's name (what `Sandbox.create(name)` takes).
    #[serde(default)]
    pub name: Option<String>,
    /// Older SDKs send the name as `alias`.
    #[serde(default)]
    pub alias: Option<String>,
    /// Tags the build gets once ready (`name:tag`); `default` when none.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Ignored: the key's team is used.
    #[serde(default, rename = "teamID")]
    pub team_id: Option<String>,
    #[serde(default, rename = "cpuCount")]
    pub cpu_count: Option<u32>,
    #[serde(default, rename = "memoryMB")]
    pub memory_mb: Option<u32>,
    /// Accepted; the disk is the parent's size (see docs/templates.md).
    #[serde(default, rename = "minFreeDiskMb")]
    pub min_free_disk_mb: Option<u32>,
}

/// Answer of `POST /v3/templates` (202).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateRequestResponseV3 {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// Answer of `GET /templates/{templateID}/files/{hash}` (201).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildFileUpload {
    /// The team already uploaded these files: no upload needed.
    pub present: bool,
    /// Where to `PUT` the tar archive. The URL authenticates itself (signed, expiring,
    /// single-use): send no API key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// One step of a build request (E2B `TemplateStep`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateStep {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// For `COPY`: the hash the files were uploaded under.
    #[serde(default, rename = "filesHash")]
    pub files_hash: Option<String>,
    /// Rebuild this step (and the ones after it) without the cache.
    #[serde(default)]
    pub force: Option<bool>,
    /// Sent by the SDKs for `COPY`; uploads decide it, the build ignores it.
    #[serde(default, rename = "forceUpload")]
    pub force_upload: Option<bool>,
}

/// `fromImageRegistry`: credentials for a private registry.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FromImageRegistry {
    /// `registry` (user name and password); `aws` and `gcp` are refused.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// Body of `POST /v2/templates/{templateID}/builds/{buildID}` (E2B `TemplateBuildStartV2`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBuildStartV2 {
    #[serde(default, rename = "fromImage")]
    pub from_image: Option<String>,
    #[serde(default, rename = "fromTemplate")]
    pub from_template: Option<String>,
    #[serde(default, rename = "fromImageRegistry")]
    pub from_image_registry: Option<FromImageRegistry>,
    #[serde(default)]
    pub force: Option<bool>,
    #[serde(default)]
    pub steps: Option<Vec<TemplateStep>>,
    #[serde(default, rename = "startCmd")]
    pub start_cmd: Option<String>,
    #[serde(default, rename = "readyCmd")]
    pub ready_cmd: Option<String>,
}

/// One build log line (E2B `BuildLogEntry`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildLogEntry {
    pub timestamp: String,
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// `base`, a 1-based step index, or `finalize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build failed (E2B `BuildStatusReason`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildStatusReason {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The failed step's last log lines.
    #[serde(rename = "logEntries")]
    pub log_entries: Vec<BuildLogEntry>,
}

/// Answer of `GET /templates/{templateID}/builds/{buildID}/status` (E2B `TemplateBuildInfo`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildInfo {
    /// The same lines as `logEntries`, as text (older SDKs read these).
    pub logs: Vec<String>,
    #[serde(rename = "logEntries")]
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// Body of `POST /templates/tags`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignTemplateTagsRequest {
    /// `name:tag` (or `name`, its newest build) of the build to tag.
    pub target: String,
    pub tags: Vec<String>,
}

/// Answer of `POST /templates/tags` (201).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssignedTemplateTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// Body of `DELETE /templates/tags`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteTemplateTagsRequest {
    pub name: String,
    pub tags: Vec<String>,
}

/// One tag of a template (E2B `TemplateTag`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
}

/// Body of `PATCH /templates/{templateID}` and `PATCH /v2/templates/{templateID}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateUpdateRequest {
    /// `true`: every team may create sandboxes from it (and build on it); only the owner
    /// changes or deletes it.
    #[serde(default)]
    pub public: Option<bool>,
}

/// Answer of `PATCH /v2/templates/{templateID}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateUpdateResponse {
    pub names: Vec<String>,
}

/// Usage summed over a window (`GET /alcove/v1/usage`): allocated compute while running,
/// storage kept, egress proxy bytes, and their cost at the server's prices.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageTotals {
    /// Distinct sandboxes with use in the window.
    pub sandboxes: u64,
    pub vcpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub storage_gib_hours: f64,
    /// Bytes the sandboxes sent out through the egress proxy.
    pub egress_bytes: u64,
    /// Bytes they received through it.
    pub ingress_bytes: u64,
    pub cost_usd: f64,
}

/// One group of a usage report.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageItem {
    /// The sandbox id, template, UTC day (`YYYY-MM-DD`) or team id, by `groupBy`.
    pub key: String,
    #[serde(flatten)]
    pub totals: UsageTotals,
}

/// `GET /alcove/v1/usage`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    pub start: String,
    pub end: String,
    /// `sandbox`, `template`, `day` or `team`.
    pub group_by: String,
    /// The team reported on; absent when the admin asked for every team (`team=*`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    pub items: Vec<UsageItem>,
    pub total: UsageTotals,
    /// The prices the costs were computed with (per vCPU-second, memory GiB-second, storage
    /// GiB-hour, egress GiB, in USD).
    pub prices: crate::config::Prices,
}

/// One usage event (`GET /alcove/v1/usage/events`, NDJSON): one interval of one sandbox's
/// compute, one object's storage or one sandbox's network bytes. Never changes once written.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageEventView {
    /// The idempotency key: billing systems dedupe on it (a re-read sends the same key).
    pub id: String,
    /// Increasing in write order: poll with `after=<the last seq you saw>`.
    pub seq: i64,
    #[serde(rename = "teamID")]
    pub team_id: String,
    #[serde(rename = "sandboxID", skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(rename = "templateID", skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// `compute`, `storage` or `network`.
    pub kind: String,
    pub start: String,
    pub end: String,
    pub vcpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub storage_gib_hours: f64,
    pub egress_bytes: u64,
    pub ingress_bytes: u64,
    pub cost_usd: f64,
}

/// A team's limits as set (`null`: the server's default, or no cap) — the body of
/// `PUT /alcove/v1/teams/{team}/limits`, where every field left out is reset to `null` (or, for
/// `warnAtPercent` and `onCap`, to `[50, 80, 100]` and `refuse`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TeamLimitsBody {
    /// Sandboxes creating or running at once (default: `--team-max-running`).
    pub max_running: Option<u64>,
    /// Paused sandboxes kept (default: `--team-max-paused`).
    pub max_paused: Option<u64>,
    /// GiB that paused sandboxes and snapshots may hold (default: `--team-max-stored`).
    pub max_storage_gib: Option<f64>,
    /// Spend per calendar month (UTC) at which creates and resumes are refused and `onCap`
    /// applies; `null`: no cap.
    pub monthly_spend_cap_usd: Option<f64>,
    /// Percentages of the cap at which a warning is recorded and sent to the webhook.
    pub warn_at_percent: Option<Vec<u32>>,
    /// At the cap: `refuse` (new work only), `pause` or `kill` the running sandboxes too.
    pub on_cap: Option<String>,
}

/// A spend warning reached (and its webhook delivery).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendNoticeView {
    pub month: String,
    pub percent: u32,
    pub at: String,
    pub spend_usd: f64,
    pub cap_usd: f64,
    /// When the webhook accepted it; absent while undelivered (or with no webhook).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `GET /alcove/v1/teams/{team}/limits`: what is set, what applies, and where the team stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamLimitsView {
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub team_name: String,
    pub max_running: Option<u64>,
    pub max_paused: Option<u64>,
    pub max_storage_gib: Option<f64>,
    pub monthly_spend_cap_usd: Option<f64>,
    pub warn_at_percent: Vec<u32>,
    pub on_cap: String,
    /// The limits in force: what is set, else the server's defaults.
    pub effective: EffectiveLimits,
    /// The current month (UTC, `YYYY-MM`) and what the team has spent in it.
    pub month: String,
    pub month_spend_usd: f64,
    /// Whether the spend reached the cap (creates and resumes are refused).
    pub capped: bool,
    pub running: u64,
    pub paused: u64,
    /// Warnings reached, newest first.
    pub notices: Vec<SpendNoticeView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveLimits {
    pub max_running: u64,
    pub max_paused: u64,
    pub max_storage_gib: f64,
}

/// One audit or run-trace event (`GET /alcove/v1/sandboxes/{id}/events`, `GET /alcove/v1/audit`,
/// `alcove audit export`): what happened, who did it, to what, and how it ended, chained by
/// SHA-256 per team (`docs/audit.md`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEventView {
    /// Increasing over the whole server: the cursor (`after`).
    pub seq: i64,
    pub at: String,
    /// `at` in milliseconds (what the hash covers).
    pub at_ms: i64,
    #[serde(rename = "teamID")]
    pub team_id: Option<String>,
    /// An API key id, `system` (the server: reaper, caps, liveness) or `sandbox`.
    pub actor: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: Option<String>,
    /// `api`, `state`, `process`, `file` or `egress`.
    pub kind: String,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    #[schema(value_type = Object)]
    pub detail: Value,
    /// The hash of the team's previous record (64 zeros for its first).
    pub prev_hash: String,
    /// `sha256(prevHash "\n" canonical form)`; see `docs/audit.md`.
    pub hash: String,
}

mod secrets;
pub use secrets::{NewSecret, Secret, SecretUpdate};
mod volumes;
pub use volumes::{
    NewVolume, SandboxVolumeMount, Volume, VolumeAndToken, VolumeEntryStat, VolumeEntryType,
    VolumeMetadataUpdate,
};

/// Body of `POST /alcove/v1/sandboxes/{sandboxID}/recordings`: what to record and where.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordingStart {
    /// Where the MP4 goes in the sandbox; relative paths are under the user's home (default
    /// `/home/user/recordings/<recordingID>.mp4`). Must end in `.mp4` and not exist.
    #[serde(default)]
    pub path: Option<String>,
    /// Frames per second, 1-30 (default 5: under software emulation more costs the desktop
    /// CPU).
    #[serde(default)]
    pub fps: Option<u32>,
    /// The recording ends by itself after this many seconds, 1-86400 (default 3600).
    #[serde(default, rename = "maxSeconds")]
    pub max_seconds: Option<u32>,
    /// The X display to record (default `:0`, the desktop template's).
    #[serde(default)]
    pub display: Option<String>,
}

/// One screen recording in a sandbox (`/alcove/v1/sandboxes/{sandboxID}/recordings`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecordingView {
    #[serde(rename = "recordingID", alias = "recordingId")]
    pub recording_id: String,
    /// `recording`; `stopped` (asked to); `ended` (its time limit, or the display went away);
    /// `failed` (`error` says why).
    pub state: String,
    /// The MP4 in the sandbox: fetch it with the SDK's `files.read` or a download URL. It is
    /// written in fragments, so it plays even while recording or after a failure.
    pub path: String,
    pub display: String,
    pub fps: u32,
    #[serde(rename = "maxSeconds")]
    pub max_seconds: u32,
    #[serde(rename = "startedAt")]
    pub started_at: String,
    #[serde(rename = "endedAt", default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// The file's size now.
    #[serde(rename = "sizeBytes", default)]
    pub size_bytes: u64,
    /// Seconds recorded (wall clock, up to now while recording).
    #[serde(rename = "durationSeconds", default)]
    pub duration_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /alcove/v1/sandboxes/{sandboxID}/recordings`: every recording the sandbox keeps a record
/// of (the last 100 finished ones and all running), oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RecordingList {
    pub recordings: Vec<RecordingView>,
}

/// What `POST /alcove/v1/nodes/{nodeID}/drain` did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    #[serde(rename = "nodeID")]
    pub node_id: String,
    /// Running sandboxes paused for the drain.
    pub paused: Vec<String>,
    /// Paused sandboxes moved off the node: their next resume runs on another node.
    pub moved: Vec<String>,
    /// Sandboxes that stayed, each with why.
    pub failed: Vec<DrainFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainFailure {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    pub message: String,
}
