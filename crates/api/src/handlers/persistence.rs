//! Pause, resume and connect, snapshots and forks of E2B's sandboxes (`/sandboxes/{id}/...`).

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{ApiJson, AppState, Team};
use crate::error::{ApiError, ErrorBody};
use crate::models::{
    ConnectRequest, ForkRequest, ForkResult, PauseRequest, ResumeRequest, Sandbox, SnapshotInfo,
    SnapshotRequest,
};

#[utoipa::path(post, path = "/v2/sandboxes/{sandboxID}/connect", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = ConnectRequest,
    responses(
        (status = 200, description = "The sandbox was running; its end time was extended if needed", body = Sandbox),
        (status = 201, description = "The sandbox was paused and has been resumed", body = Sandbox),
        (status = 400, description = "Timeout out of range", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 429, description = "Resuming would exceed the concurrent sandbox limit", body = ErrorBody),
        (status = 500, description = "The resume failed (snapshot_corrupt: the saved state failed its checksum and was left intact)", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn connect(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ConnectRequest>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let (sbx, resumed) = svc.connect(&team, &id, body.timeout, body.memory).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sbx)))
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/connect", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = ConnectRequest,
    responses(
        (status = 200, description = "As POST /v2/sandboxes/{sandboxID}/connect", body = Sandbox),
        (status = 201, description = "Resumed", body = Sandbox),
        (status = 404, description = "No such live sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn connect_v1(
    state: State<AppState>,
    team: Team,
    id: Path<String>,
    body: ApiJson<ConnectRequest>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    connect(state, team, id, body).await
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/resume", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = ResumeRequest,
    responses(
        (status = 201, description = "Resumed: memory, processes and files as they were at the pause", body = Sandbox),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox is running", body = ErrorBody),
        (status = 500, description = "The resume failed; the sandbox stays paused with its state intact", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn resume(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ResumeRequest>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let (sbx, _) = svc
        .resume(&team, &id, body.timeout, body.memory, true)
        .await?;
    Ok((StatusCode::CREATED, Json(sbx)))
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/pause", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = PauseRequest,
    responses(
        (status = 204, description = "Paused: memory, processes and disk saved on the host (with memory: false, the disk alone), the VM stopped"),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "Already paused", body = ErrorBody),
        (status = 500, description = "The pause failed", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn pause(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PauseRequest>,
) -> Result<StatusCode, ApiError> {
    svc.pause(&team, &id, body.memory).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/snapshots", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = SnapshotRequest,
    responses(
        (status = 201, description = "Snapshot taken; the sandbox goes on running. Create sandboxes from it with templateID = snapshotID", body = SnapshotInfo),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox is paused", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn create_snapshot(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SnapshotRequest>,
) -> Result<(StatusCode, Json<SnapshotInfo>), ApiError> {
    let info = svc
        .create_snapshot(&team, &id, body.name, body.memory)
        .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/fork", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = ForkRequest,
    responses(
        (status = 201, description = "One entry per child: a started sandbox or the error it failed with", body = [ForkResult]),
        (status = 400, description = "count out of 1-100, or timeout out of range", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody),
        (status = 409, description = "The sandbox is paused", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn fork(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ForkRequest>,
) -> Result<(StatusCode, Json<Vec<ForkResult>>), ApiError> {
    let res = svc.fork(&team, &id, body.timeout, body.count).await?;
    Ok((StatusCode::CREATED, Json(res.children)))
}

#[utoipa::path(get, path = "/snapshots", tag = "sandboxes",
    params(
        ("sandboxID" = Option<String>, Query, description = "Only snapshots taken from this sandbox"),
        ("name" = Option<String>, Query, description = "Only snapshots with this name or id"),
        ("limit" = Option<usize>, Query, description = "Page size, 1-1000 (default 100)"),
        ("nextToken" = Option<String>, Query, description = "From the previous page's x-next-token header")),
    responses(
        (status = 200, description = "The team's snapshots, newest first", body = [SnapshotInfo]),
        (status = 400, description = "Bad query", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn list_snapshots(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q = super::PageQuery::parse(raw.as_deref());
    let get = |k: &str| q.get(k);
    let limit = q.limit()?;
    let (items, next) = svc
        .list_snapshots(
            &team,
            get("sandboxID"),
            get("name"),
            limit,
            get("nextToken"),
        )
        .await?;
    Ok(super::page(items, next))
}
