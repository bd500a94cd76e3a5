//! `/templates`: the host's templates and the team's own, E2B's `Template` build API (request,
//! file uploads, start, status, tags) and deletes.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};

use super::{ApiJson, AppState, Team, query_pairs};
use crate::error::{ApiError, ErrorBody};
use crate::models::{
    AssignTemplateTagsRequest, AssignedTemplateTags, DeleteTemplateTagsRequest, Template,
    TemplateAliasResponse, TemplateBuildFileUpload, TemplateBuildInfo, TemplateBuildRequestV3,
    TemplateBuildStartV2, TemplateRequestResponseV3, TemplateTag, TemplateUpdateRequest,
    TemplateUpdateResponse, TemplateWithBuilds,
};

#[utoipa::path(get, path = "/templates", tag = "templates",
    params(("teamID" = Option<String>, Query, description = "Ignored: the key's team is used")),
    responses(
        (status = 200, description = "Templates visible to the team", body = [Template]),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn list(
    State(svc): State<AppState>,
    Team(team): Team,
) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(svc.templates(&team).await?))
}

/// The host's templates: every template here is a default one.
#[utoipa::path(get, path = "/default-templates", tag = "templates",
    responses(
        (status = 200, description = "Templates the host provides", body = [Template]),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn defaults(state: State<AppState>, team: Team) -> Result<Json<Vec<Template>>, ApiError> {
    list(state, team).await
}

#[utoipa::path(get, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template id or alias")),
    responses(
        (status = 200, description = "The template and its build", body = TemplateWithBuilds),
        (status = 404, description = "Unknown template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn get(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<TemplateWithBuilds>, ApiError> {
    Ok(Json(svc.template(&team, &id).await?))
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "templates",
    params(("alias" = String, Path)),
    responses(
        (status = 200, description = "The template the alias names", body = TemplateAliasResponse),
        (status = 403, description = "Another team's template", body = ErrorBody),
        (status = 404, description = "Unknown alias", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn alias(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(alias): Path<String>,
) -> Result<Json<TemplateAliasResponse>, ApiError> {
    Ok(Json(svc.template_alias(&team, &alias).await?))
}

/// Deletes one of the team's templates (sandboxes made from it keep running), or a snapshot
/// (what the SDKs' `delete_snapshot` calls). The host's own templates are not deleted through
/// the API.
#[utoipa::path(delete, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template id or name, or snapshot id or name")),
    responses(
        (status = 204, description = "Deleted: no new sandbox can use it; its files go once no sandbox or snapshot needs them"),
        (status = 400, description = "A host template, which the API does not delete", body = ErrorBody),
        (status = 403, description = "Another team's template", body = ErrorBody),
        (status = 404, description = "Unknown template or snapshot", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn delete(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match svc.delete_team_template(&team, &id).await {
        Ok(()) => return Ok(StatusCode::NO_CONTENT),
        Err(ApiError::TemplateNotFound { .. }) => {}
        Err(ApiError::TemplateNameTaken { by_host: true, .. }) => {
            return Err(ApiError::Unsupported {
                feature: "deleting a host template (use `alcove template` on the host)",
            });
        }
        Err(e) => return Err(e),
    }
    svc.delete_snapshot(&team, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How the caller reached this server, for URLs it is handed back (uploads).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost");
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

#[utoipa::path(post, path = "/v3/templates", tag = "templates",
    request_body = TemplateBuildRequestV3,
    responses(
        (status = 202, description = "A new build of the team's template `name` (made if new)", body = TemplateRequestResponseV3),
        (status = 400, description = "Invalid name, tags or resources", body = ErrorBody),
        (status = 409, description = "The name belongs to the host or another team", body = ErrorBody),
        (status = 429, description = "The team's template quota", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn request_build(
    State(svc): State<AppState>,
    Team(team): Team,
    ApiJson(body): ApiJson<TemplateBuildRequestV3>,
) -> Result<(StatusCode, Json<TemplateRequestResponseV3>), ApiError> {
    let r = svc.request_template_build(&team, body).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

#[utoipa::path(get, path = "/templates/{templateID}/files/{hash}", tag = "templates",
    params(("templateID" = String, Path), ("hash" = String, Path, description = "SHA-256 of the files, as the SDK computes it")),
    responses(
        (status = 201, description = "Whether the files are uploaded, and a signed single-use URL to PUT the tar archive to", body = TemplateBuildFileUpload),
        (status = 404, description = "Unknown template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn file_link(
    State(svc): State<AppState>,
    Team(team): Team,
    headers: HeaderMap,
    Path((id, hash)): Path<(String, String)>,
) -> Result<(StatusCode, Json<TemplateBuildFileUpload>), ApiError> {
    let r = svc
        .template_file_link(&team, &id, &hash, &base_url(&headers))
        .await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// The upload URL `GET /templates/{id}/files/{hash}` hands out. It is its own credential
/// (signed, expiring, single-use): no API key. Exempt from the REST body limit and deadline,
/// with its own (`--max-template-upload`).
#[utoipa::path(put, path = "/alcove/v1/template-files/{token}", tag = "templates",
    params(("token" = String, Path, description = "From the upload URL")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A tar (or tar.gz) archive of the files"),
    responses(
        (status = 200, description = "Stored"),
        (status = 403, description = "Tampered, expired or used URL", body = ErrorBody),
        (status = 413, description = "Over the upload cap", body = ErrorBody)))]
pub async fn upload(
    State(svc): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    svc.upload_template_file(&token, declared, body).await?;
    Ok(StatusCode::OK)
}

#[utoipa::path(post, path = "/v2/templates/{templateID}/builds/{buildID}", tag = "templates",
    params(("templateID" = String, Path), ("buildID" = String, Path)),
    request_body = TemplateBuildStartV2,
    responses(
        (status = 202, description = "Queued; follow it with .../status"),
        (status = 400, description = "A bad step, a missing upload or an unknown parent", body = ErrorBody),
        (status = 404, description = "Unknown template or build", body = ErrorBody),
        (status = 409, description = "The build was already started", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn start_build(
    State(svc): State<AppState>,
    Team(team): Team,
    Path((id, build)): Path<(String, String)>,
    ApiJson(body): ApiJson<TemplateBuildStartV2>,
) -> Result<StatusCode, ApiError> {
    svc.start_template_build(&team, &id, &build, body).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/templates/{templateID}/builds/{buildID}/status", tag = "templates",
    params(("templateID" = String, Path), ("buildID" = String, Path),
        ("logsOffset" = Option<i64>, Query, description = "Log lines to skip"),
        ("limit" = Option<i64>, Query, description = "Log lines to return, at most 100"),
        ("level" = Option<String>, Query, description = "Lowest level to return: debug, info, warn, error")),
    responses(
        (status = 200, description = "Status, log lines from the offset, and why it failed", body = TemplateBuildInfo),
        (status = 404, description = "Unknown template or build", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn build_status(
    State(svc): State<AppState>,
    Team(team): Team,
    Path((id, build)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Json<TemplateBuildInfo>, ApiError> {
    let (mut offset, mut limit, mut level) = (None, None, None);
    for (k, v) in query_pairs(q.as_deref()) {
        let num = |v: &str| {
            v.parse::<i64>().map_err(|_| ApiError::InvalidQuery {
                detail: format!("{k} '{v}' is not a number"),
            })
        };
        match k.as_str() {
            "logsOffset" => offset = Some(num(&v)?),
            "limit" => limit = Some(num(&v)?),
            "level" => level = Some(v),
            _ => {}
        }
    }
    Ok(Json(
        svc.template_build_status(&team, &id, &build, offset, limit, level.as_deref())
            .await?,
    ))
}

#[utoipa::path(post, path = "/templates/tags", tag = "tags",
    request_body = AssignTemplateTagsRequest,
    responses(
        (status = 201, description = "The tags now name the target's build", body = AssignedTemplateTags),
        (status = 404, description = "Unknown template or tag", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn assign_tags(
    State(svc): State<AppState>,
    Team(team): Team,
    ApiJson(body): ApiJson<AssignTemplateTagsRequest>,
) -> Result<(StatusCode, Json<AssignedTemplateTags>), ApiError> {
    let r = svc.assign_template_tags(&team, body).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

#[utoipa::path(delete, path = "/templates/tags", tag = "tags",
    request_body = DeleteTemplateTagsRequest,
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "Unknown template or tag", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn remove_tags(
    State(svc): State<AppState>,
    Team(team): Team,
    ApiJson(body): ApiJson<DeleteTemplateTagsRequest>,
) -> Result<StatusCode, ApiError> {
    svc.remove_template_tags(&team, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/templates/{templateID}/tags", tag = "tags",
    params(("templateID" = String, Path, description = "Template id or name")),
    responses(
        (status = 200, description = "The template's tags", body = [TemplateTag]),
        (status = 404, description = "Unknown template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn tags(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<Vec<TemplateTag>>, ApiError> {
    Ok(Json(svc.template_tags(&team, &id).await?))
}

#[utoipa::path(patch, path = "/v2/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template id or name")),
    request_body = TemplateUpdateRequest,
    responses(
        (status = 200, description = "Updated", body = TemplateUpdateResponse),
        (status = 403, description = "Another team's template", body = ErrorBody),
        (status = 404, description = "Unknown template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn update(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TemplateUpdateRequest>,
) -> Result<Json<TemplateUpdateResponse>, ApiError> {
    Ok(Json(svc.update_template(&team, &id, body).await?))
}

/// The same as `PATCH /v2/templates/{templateID}` (older SDKs).
#[utoipa::path(patch, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Template id or name")),
    request_body = TemplateUpdateRequest,
    responses(
        (status = 200, description = "Updated", body = TemplateUpdateResponse),
        (status = 404, description = "Unknown template", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn update_v1(
    state: State<AppState>,
    team: Team,
    id: Path<String>,
    body: ApiJson<TemplateUpdateRequest>,
) -> Result<Json<TemplateUpdateResponse>, ApiError> {
    update(state, team, id, body).await
}
