//! `/templates`: the templates this host has built, by id and alias.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::{AppState, Team};
use crate::error::{ApiError, ErrorBody};
use crate::models::{Template, TemplateAliasResponse, TemplateWithBuilds};

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
    Team(_team): Team,
    Path(id): Path<String>,
) -> Result<Json<TemplateWithBuilds>, ApiError> {
    Ok(Json(svc.template(&id).await?))
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "templates",
    params(("alias" = String, Path)),
    responses(
        (status = 200, description = "The template the alias names", body = TemplateAliasResponse),
        (status = 404, description = "Unknown alias", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn alias(
    State(svc): State<AppState>,
    Team(_team): Team,
    Path(alias): Path<String>,
) -> Result<Json<TemplateAliasResponse>, ApiError> {
    Ok(Json(svc.template_alias(&alias).await?))
}

/// Deletes a snapshot (what the SDKs' `delete_snapshot` calls). Templates built on the host are
/// not deleted through the API.
#[utoipa::path(delete, path = "/templates/{templateID}", tag = "templates",
    params(("templateID" = String, Path, description = "Snapshot id or name")),
    responses(
        (status = 204, description = "The snapshot can no longer be restored; its files go once no sandbox or other snapshot needs them"),
        (status = 400, description = "A host template, which the API does not delete", body = ErrorBody),
        (status = 404, description = "Unknown snapshot", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn delete(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match svc.delete_snapshot(&team, &id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(ApiError::SnapshotNotFound { snapshot_id }) => {
            if svc.template(&id).await.is_ok() {
                Err(ApiError::Unsupported {
                    feature: "deleting a host template (use `alcove template` on the host)",
                })
            } else {
                Err(ApiError::SnapshotNotFound { snapshot_id })
            }
        }
        Err(e) => Err(e),
    }
}
