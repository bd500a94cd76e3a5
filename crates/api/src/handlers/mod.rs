//! REST handlers, split by resource, and the extractors they share.
//!
//! Each handler extracts (auth, path, query, body), validates, calls one [`Service`] method and
//! maps the result. Extractor failures become [`ApiError`]s, never axum's plain-text rejections.

pub mod audit;
pub mod extensions;
pub mod observability;
pub mod persistence;
pub mod sandboxes;
pub mod secrets;
pub mod system;
pub mod templates;
pub mod usage;
pub mod volumes;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::service::Service;

pub type AppState = Arc<Service>;

/// The team of the API key in `X-API-KEY` (or `Authorization: Bearer <key>`).
pub struct Team(pub String);

impl FromRequestParts<AppState> for Team {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let Some(key) = key else {
            crate::metrics::Metrics::inc(&crate::metrics::METRICS.auth_failures);
            return Err(ApiError::MissingApiKey);
        };
        // Keys are short; anything long is not ours and is not worth hashing.
        if key.len() > 256 {
            crate::metrics::Metrics::inc(&crate::metrics::METRICS.auth_failures);
            return Err(ApiError::InvalidApiKey);
        }
        let auth = state.authenticate(key).await?;
        if let Some(slot) = parts.extensions.get::<Actor>() {
            *slot.0.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((auth.team_id.clone(), auth.key_id.clone()));
        }
        Ok(Team(auth.team_id))
    }
}

/// Who a request authenticated as (team, key id): the request middleware puts an empty one in
/// each REST request and the [`Team`] extractor fills it, so the audit record of the call
/// names its key.
#[derive(Clone, Default)]
pub struct Actor(pub std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>);

/// The value of query parameter `name`, if present (the first).
pub fn param(raw: Option<&str>, name: &str) -> Option<String> {
    query_pairs(raw)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// An NDJSON answer (one JSON document per line) of a paged feed, with the last `seq` it holds
/// in `X-Alcove-Next-After` (`after` again when it is empty) for the next poll.
pub fn ndjson<T: serde::Serialize>(
    items: &[T],
    seq: impl Fn(&T) -> i64,
    after: i64,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let next = items.last().map_or(after, &seq);
    let mut body = String::new();
    for i in items {
        body.push_str(&serde_json::to_string(i).map_err(ApiError::internal)?);
        body.push('\n');
    }
    Ok((
        [
            (
                http::header::CONTENT_TYPE,
                "application/x-ndjson".to_owned(),
            ),
            (
                http::header::HeaderName::from_static("x-alcove-next-after"),
                next.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

/// The admin team (the one the server created on first start, named `admin`), for endpoints
/// that show host-wide state: `/metrics`, the warm pools. Any other team's key gets 403.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Team(team) = Team::from_request_parts(parts, state).await?;
        if state.is_admin(&team).await? {
            Ok(Admin)
        } else {
            Err(ApiError::AdminOnly)
        }
    }
}

/// The name of the team the server creates on first start.
pub const ADMIN_TEAM: &str = "admin";

/// A JSON body: size-limited by `DefaultBodyLimit`, with every failure a structured 400/413.
/// An empty body reads as `{}`, so optional bodies (refreshes, connect) may be left out.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge { limit }
            } else {
                ApiError::InvalidBody {
                    detail: "the body could not be read".into(),
                }
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::InvalidBody {
                detail: e.to_string(),
            })
    }
}

/// The configured body limit, put in request extensions so rejections can name it.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A list endpoint's query: its pairs, and the page size E2B's lists take.
pub struct PageQuery(Vec<(String, String)>);

impl PageQuery {
    pub fn parse(raw: Option<&str>) -> PageQuery {
        PageQuery(query_pairs(raw))
    }

    /// A parameter, when given non-empty.
    pub fn get(&self, k: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }

    /// `limit`: 1 to [`sandboxes::MAX_PAGE`], or none.
    pub fn limit(&self) -> Result<Option<usize>, ApiError> {
        let max = sandboxes::MAX_PAGE;
        self.get("limit")
            .map(|v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| ApiError::InvalidQuery {
                        detail: format!("limit must be between 1 and {max}"),
                    })
            })
            .transpose()
    }
}

/// One page of a list: the items, with `x-next-token` when more follow.
pub fn page<T: serde::Serialize>(
    items: T,
    next: Option<String>,
) -> (axum::http::HeaderMap, axum::Json<T>) {
    let mut headers = axum::http::HeaderMap::new();
    if let Some(t) = next.and_then(|t| axum::http::HeaderValue::from_str(&t).ok()) {
        headers.insert("x-next-token", t);
    }
    (headers, axum::Json(items))
}

/// Query pairs, percent-decoded once.
pub fn query_pairs(req_query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(req_query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}
