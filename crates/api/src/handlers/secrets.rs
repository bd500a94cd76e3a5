//! E2B's secrets API (`/secrets`): create, list, get, update (a new version) and delete a team's
//! secrets, by id (`sec_…`) or name. Values are write-only: no response carries one, and a body
//! that does not parse is answered without echoing any of it.

use axum::Json;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::de::DeserializeOwned;

use super::{Actor, ApiJson, AppState, Team};
use crate::error::{ApiError, ErrorBody};
use crate::models::{NewSecret, Secret, SecretUpdate};

/// A secrets request body. Like [`ApiJson`], but a field of the wrong type is reported without
/// serde's echo of what was sent (which could be the value).
pub struct SecretBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for SecretBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ApiJson(v) = ApiJson::<serde_json::Value>::from_request(req, state).await?;
        serde_json::from_value(v).map(SecretBody).map_err(|e| {
            let msg = e.to_string();
            let detail = if msg.starts_with("unknown field") || msg.starts_with("missing field") {
                msg
            } else {
                "name and value must be strings and metadata an object of string values".into()
            };
            ApiError::InvalidBody { detail }
        })
    }
}

/// The id of the key the request authenticated with (filled by [`Team`]), for the audit log.
pub(super) fn key_id(actor: Option<axum::Extension<Actor>>) -> String {
    actor
        .and_then(|a| a.0.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .map(|(_, key)| key)
        .unwrap_or_else(|| "api".into())
}

#[utoipa::path(post, path = "/secrets", tag = "secrets", request_body = NewSecret,
    responses(
        (status = 201, description = "Created with version 1; the value is stored encrypted and never returned", body = Secret),
        (status = 400, description = "A bad name (empty, over 128 bytes, '{', '}' or control characters, 'sec_' prefix), an empty value or one over 64 KiB, or metadata over its limits", body = ErrorBody),
        (status = 403, description = "The team already has 1000 secrets", body = ErrorBody),
        (status = 409, description = "The team already has a secret of that name", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn create(
    State(svc): State<AppState>,
    Team(team): Team,
    actor: Option<axum::Extension<Actor>>,
    SecretBody(body): SecretBody<NewSecret>,
) -> Result<(StatusCode, Json<Secret>), ApiError> {
    let s = svc.create_secret(&team, &key_id(actor), body).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(get, path = "/secrets", tag = "secrets",
    params(
        ("limit" = Option<usize>, Query, description = "Page size, 1-1000 (default 100)"),
        ("nextToken" = Option<String>, Query, description = "From the previous page's x-next-token header")),
    responses(
        (status = 200, description = "One page of the team's secrets in name order; `x-next-token` is set when more follow", body = [Secret]),
        (status = 400, description = "Bad query", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn list(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q = super::PageQuery::parse(raw.as_deref());
    let get = |k: &str| q.get(k);
    let limit = q.limit()?;
    let (items, next) = svc.list_secrets(&team, limit, get("nextToken")).await?;
    Ok(super::page(items, next))
}

#[utoipa::path(get, path = "/secrets/{secretID}", tag = "secrets",
    params(("secretID" = String, Path, description = "The secret's id (sec_…) or its name (compared lower-cased)")),
    responses(
        (status = 200, description = "The secret, without its value", body = Secret),
        (status = 404, description = "This team has no such secret", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn get(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<Secret>, ApiError> {
    Ok(Json(svc.get_secret(&team, &id).await?))
}

#[utoipa::path(post, path = "/secrets/{secretID}", tag = "secrets",
    params(("secretID" = String, Path, description = "The secret's id (sec_…) or its name")),
    request_body = SecretUpdate,
    responses(
        (status = 200, description = "The value stored as the next version (currentVersion + 1); metadata, when given, replaced", body = Secret),
        (status = 400, description = "An empty value or one over 64 KiB, or metadata over its limits", body = ErrorBody),
        (status = 404, description = "This team has no such secret", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn update(
    State(svc): State<AppState>,
    Team(team): Team,
    actor: Option<axum::Extension<Actor>>,
    Path(id): Path<String>,
    SecretBody(body): SecretBody<SecretUpdate>,
) -> Result<Json<Secret>, ApiError> {
    Ok(Json(
        svc.update_secret(&team, &key_id(actor), &id, body).await?,
    ))
}

#[utoipa::path(delete, path = "/secrets/{secretID}", tag = "secrets",
    params(("secretID" = String, Path, description = "The secret's id (sec_…) or its name")),
    responses(
        (status = 204, description = "Deleted with every version"),
        (status = 404, description = "This team has no such secret", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn delete(
    State(svc): State<AppState>,
    Team(team): Team,
    actor: Option<axum::Extension<Actor>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    svc.delete_secret(&team, &key_id(actor), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
