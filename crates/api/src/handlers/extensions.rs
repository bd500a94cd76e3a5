//! Alcove's additive endpoints, under `/alcove/v1/`: nothing E2B defines lives here.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::{Admin, ApiJson, AppState, Team};
use crate::error::{ApiError, ErrorBody};
use crate::models::{
    AlcoveForkResponse, ForkRequest, RecordingList, RecordingStart, RecordingView,
    SandboxRecordView, SnapshotTree, WarmPoolView,
};

/// Any sandbox the team ever created, including killed and lost ones, with why it ended and
/// its full state history.
#[utoipa::path(get, path = "/alcove/v1/sandboxes/{sandboxID}", tag = "alcove",
    params(("sandboxID" = String, Path)),
    responses(
        (status = 200, description = "The sandbox record", body = SandboxRecordView),
        (status = 404, description = "Unknown sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn sandbox_record(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<SandboxRecordView>, ApiError> {
    Ok(Json(svc.record(&team, &id).await?))
}

/// Forks a running sandbox into `count` (1-100) children in one call: one snapshot, then every
/// child restored from it concurrently with its own id, access token, traffic token and entropy.
#[utoipa::path(post, path = "/alcove/v1/sandboxes/{sandboxID}/fork", tag = "alcove",
    params(("sandboxID" = String, Path)), request_body = ForkRequest,
    responses(
        (status = 201, description = "The checkpoint and one entry per child (a sandbox or its error)", body = AlcoveForkResponse),
        (status = 400, description = "count out of 1-100", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox is paused", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn fork(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ForkRequest>,
) -> Result<(StatusCode, Json<AlcoveForkResponse>), ApiError> {
    let res = svc.fork(&team, &id, body.timeout, body.count).await?;
    Ok((StatusCode::CREATED, Json(res)))
}

/// The team's checkpoint tree: every snapshot under the one its sandbox came from.
#[utoipa::path(get, path = "/alcove/v1/snapshots/tree", tag = "alcove",
    responses(
        (status = 200, description = "Snapshots nested by parent, with the live sandboxes on each", body = SnapshotTree)),
    security(("ApiKeyAuth" = [])))]
pub async fn snapshot_tree(
    State(svc): State<AppState>,
    Team(team): Team,
) -> Result<Json<SnapshotTree>, ApiError> {
    Ok(Json(svc.snapshot_tree(&team).await?))
}

/// The host's warm pools: per template, how many restored VMs wait ready for a create, and how
/// many creates they served. Host-wide, so the admin key only.
#[utoipa::path(get, path = "/alcove/v1/warm-pool", tag = "alcove",
    responses(
        (status = 200, description = "One entry per template with a pool", body = [WarmPoolView]),
        (status = 403, description = "Not the admin key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn warm_pool(
    State(svc): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<WarmPoolView>>, ApiError> {
    Ok(Json(svc.warm_pool().await?))
}

/// A cluster's nodes as the control plane sees them: up (heartbeating in time) or not,
/// draining, sandboxes, free memory. The admin key only; 400 on a single-host server.
#[utoipa::path(get, path = "/alcove/v1/nodes", tag = "alcove",
    responses(
        (status = 200, description = "One entry per node that has joined", body = [crate::backend::NodeInfo]),
        (status = 400, description = "Not a cluster", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn nodes(
    State(svc): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<crate::backend::NodeInfo>>, ApiError> {
    Ok(Json(svc.nodes()?))
}

/// Drains a node: it takes no new sandboxes, its running sandboxes are paused and every paused
/// one moves to the cluster's blob store, from where its next resume runs on another node.
/// Sandboxes that could not be paused or moved are listed with why and stay. The admin key only.
#[utoipa::path(post, path = "/alcove/v1/nodes/{nodeID}/drain", tag = "alcove",
    params(("nodeID" = String, Path)),
    responses(
        (status = 200, description = "What was paused, moved, and what stayed", body = crate::models::DrainReport),
        (status = 400, description = "Not a cluster", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn drain_node(
    State(svc): State<AppState>,
    _admin: Admin,
    Path(node_id): Path<String>,
) -> Result<Json<crate::models::DrainReport>, ApiError> {
    Ok(Json(svc.drain_node(&node_id).await?))
}

/// Starts recording a display of a running sandbox (the `desktop` template's `:0` by default)
/// to an MP4 in the sandbox, with ffmpeg; answers once the file is being written.
#[utoipa::path(post, path = "/alcove/v1/sandboxes/{sandboxID}/recordings", tag = "alcove",
    params(("sandboxID" = String, Path)), request_body = RecordingStart,
    responses(
        (status = 201, description = "The recording, in state `recording`", body = RecordingView),
        (status = 400, description = "A field out of range", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "Paused, no recorder in the template (`recording_unavailable`), no X display, or the path exists", body = ErrorBody),
        (status = 429, description = "Four recordings run already", body = ErrorBody),
        (status = 502, description = "ffmpeg failed in the sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn start_recording(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RecordingStart>,
) -> Result<(StatusCode, Json<RecordingView>), ApiError> {
    let rec = svc.start_recording(&team, &id, body).await?;
    Ok((StatusCode::CREATED, Json(rec)))
}

/// Stops a recording: ffmpeg finishes the file (killed after 30 s; what it wrote still plays).
/// A recording that ended already is answered as it is.
#[utoipa::path(post, path = "/alcove/v1/sandboxes/{sandboxID}/recordings/{recordingID}/stop", tag = "alcove",
    params(("sandboxID" = String, Path), ("recordingID" = String, Path)),
    responses(
        (status = 200, description = "The recording, ended, with its size and length", body = RecordingView),
        (status = 404, description = "No such live sandbox or recording", body = ErrorBody),
        (status = 409, description = "Paused, or no recorder in the template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn stop_recording(
    State(svc): State<AppState>,
    Team(team): Team,
    Path((id, rid)): Path<(String, String)>,
) -> Result<Json<RecordingView>, ApiError> {
    Ok(Json(svc.stop_recording(&team, &id, &rid).await?))
}

/// The sandbox's recordings, running and ended (the last 100), oldest first.
#[utoipa::path(get, path = "/alcove/v1/sandboxes/{sandboxID}/recordings", tag = "alcove",
    params(("sandboxID" = String, Path)),
    responses(
        (status = 200, description = "The recordings", body = RecordingList),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "Paused, or no recorder in the template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn recordings(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<RecordingList>, ApiError> {
    Ok(Json(svc.recordings(&team, &id).await?))
}
