//! `/sandboxes` and `/v2/sandboxes`: E2B's sandbox endpoints as the 2.63 SDKs call them
//! (create, list, get, kill, timeouts, refreshes, network); pause, resume, snapshots and forks
//! are in `persistence`, metrics and logs in `observability`.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use percent_encoding::percent_decode_str;

use alcove_store::{ListOrder, SandboxState as StoreState};

use super::{ApiJson, AppState, Team, query_pairs};
use crate::error::{ApiError, ErrorBody};
use crate::models::{
    ListedSandbox, NewSandbox, RefreshRequest, Sandbox, SandboxDetail, TimeoutRequest,
    parse_rfc3339,
};
use crate::service::ListQuery;

/// Largest page `GET /v2/sandboxes` returns.
pub(super) const MAX_PAGE: usize = 1000;

#[utoipa::path(post, path = "/v2/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the create idempotent for 24 h: the same key with the same body returns the same sandbox (even while the first request is still creating it); with another body, 422. 1 to 255 printable ASCII characters.")),
    responses(
        (status = 201, description = "Sandbox started", body = Sandbox),
        (status = 400, description = "Invalid body, timeout out of range or unsupported feature", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "Unknown template", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key's create is still running, or its sandbox has ended", body = ErrorBody),
        (status = 422, description = "The Idempotency-Key was used with another body", body = ErrorBody),
        (status = 429, description = "Concurrent sandbox limit reached (Should-Retry: false)", body = ErrorBody),
        (status = 500, description = "The sandbox could not be started", body = ErrorBody),
        (status = 503, description = "No capacity on the host", body = ErrorBody),
        (status = 504, description = "The sandbox did not start in time", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn create_v2(
    State(svc): State<AppState>,
    Team(team): Team,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<NewSandbox>,
) -> Result<impl IntoResponse, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| ApiError::InvalidIdempotencyKey)?),
    };
    let sbx = svc.create_idempotent(&team, key, body).await?;
    Ok((StatusCode::CREATED, Json(sbx)))
}

/// Same as `POST /v2/sandboxes` (E2B's older path; `secure` is accepted and ignored).
#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes", request_body = NewSandbox,
    responses(
        (status = 201, description = "Sandbox started", body = Sandbox),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "Unknown template", body = ErrorBody),
        (status = 429, description = "Concurrent sandbox limit reached", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn create_v1(
    state: State<AppState>,
    team: Team,
    headers: axum::http::HeaderMap,
    body: ApiJson<NewSandbox>,
) -> Result<impl IntoResponse, ApiError> {
    create_v2(state, team, headers, body).await
}

fn parse_metadata(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    // The SDKs percent-encode each key and value, then form-encode the pairs into this one
    // parameter: undo both.
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        let dec = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::InvalidQuery {
                    detail: "metadata is not valid UTF-8 after decoding".into(),
                })
        };
        out.push((dec(&k)?, dec(&v)?));
    }
    Ok(out)
}

pub(crate) fn parse_list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery::default();
    for (k, v) in query_pairs(raw) {
        match k.as_str() {
            "metadata" => q.metadata.extend(parse_metadata(&v)?),
            "state" => {
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let st = s
                        .parse::<StoreState>()
                        .map_err(|_| ApiError::InvalidQuery {
                            detail: format!(
                                "state '{s}' is not one of running, paused (or, as an Alcove \
                             extension, creating, killed, lost)"
                            ),
                        })?;
                    q.states.push(st);
                }
            }
            "template" => q.template = Some(v),
            "startedAfter" => {
                q.started_after = Some(parse_rfc3339(&v).ok_or_else(|| ApiError::InvalidQuery {
                    detail: format!("startedAfter '{v}' is not an RFC 3339 timestamp"),
                })?)
            }
            "order" => {
                q.order = match v.as_str() {
                    "asc" => ListOrder::Asc,
                    "desc" => ListOrder::Desc,
                    _ => {
                        return Err(ApiError::InvalidQuery {
                            detail: "order must be asc or desc".into(),
                        });
                    }
                }
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| ApiError::InvalidQuery {
                    detail: "limit must be a positive integer".into(),
                })?;
                if n == 0 || n > MAX_PAGE {
                    return Err(ApiError::InvalidQuery {
                        detail: format!("limit must be between 1 and {MAX_PAGE}"),
                    });
                }
                q.limit = Some(n);
            }
            "nextToken" => q.next_token = Some(v).filter(|t| !t.is_empty()),
            // Unknown parameters are ignored, as E2B does: newer SDKs may add filters.
            _ => {}
        }
    }
    Ok(q)
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "sandboxes",
    params(
        ("metadata" = Option<String>, Query, description = "Form-encoded key=value pairs, each key and value percent-encoded; all must match"),
        ("state" = Option<String>, Query, description = "Comma-separated states; default running,paused. Extension: creating, killed, lost"),
        ("template" = Option<String>, Query, description = "Template id or alias"),
        ("startedAfter" = Option<String>, Query, description = "RFC 3339"),
        ("order" = Option<String>, Query, description = "asc or desc (default: newest first, as in E2B), by start time"),
        ("limit" = Option<usize>, Query, description = "Page size, 1-1000"),
        ("nextToken" = Option<String>, Query, description = "From the previous page's x-next-token header")),
    responses(
        (status = 200, description = "One page; `x-next-token` is set when more follow", body = [ListedSandbox]),
        (status = 400, description = "Invalid filter", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn list_v2(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q = parse_list_query(raw.as_deref())?;
    let (items, next) = svc.list(&team, q).await?;
    Ok(super::page(items, next))
}

#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes",
    params(("metadata" = Option<String>, Query, description = "As in GET /v2/sandboxes")),
    responses(
        (status = 200, description = "Running sandboxes", body = [ListedSandbox]),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn list_v1(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    let mut q = ListQuery {
        states: vec![StoreState::Running],
        ..Default::default()
    };
    for (k, v) in query_pairs(raw.as_deref()) {
        if k == "metadata" {
            q.metadata.extend(parse_metadata(&v)?);
        }
    }
    Ok(Json(svc.list(&team, q).await?.0))
}

#[utoipa::path(get, path = "/sandboxes/{sandboxID}", tag = "sandboxes",
    params(("sandboxID" = String, Path)),
    responses(
        (status = 200, description = "A running or paused sandbox", body = SandboxDetail),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn get(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, ApiError> {
    Ok(Json(svc.get(&team, &id).await?))
}

#[utoipa::path(delete, path = "/sandboxes/{sandboxID}", tag = "sandboxes",
    params(("sandboxID" = String, Path)),
    responses(
        (status = 204, description = "Killed"),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn kill(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    svc.kill(&team, &id, "killed by API request").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/timeout", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = TimeoutRequest,
    responses(
        (status = 204, description = "The sandbox now ends `timeout` seconds from now; 0 ends it now (paused with autoPause, else killed)"),
        (status = 400, description = "Timeout out of range", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn set_timeout(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    svc.set_timeout(&team, &id, body.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// E2B's `SandboxNetworkUpdateConfig`: the new egress rules, replacing the old ones whole.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // the handler reads the raw JSON; this type documents it
pub struct NetworkUpdate {
    /// CIDRs, IPs and domains (`example.com`, `*.example.com`); allowed entries win over denied.
    #[serde(rename = "allowOut")]
    allow_out: Option<Vec<String>>,
    /// CIDRs and IPs.
    #[serde(rename = "denyOut")]
    deny_out: Option<Vec<String>>,
    /// `false` is `denyOut: ["0.0.0.0/0"]`.
    #[serde(rename = "allowInternetAccess")]
    allow_internet_access: Option<bool>,
}

#[utoipa::path(put, path = "/sandboxes/{sandboxID}/network", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = NetworkUpdate,
    responses(
        (status = 204, description = "The new rules apply: new connections follow them, open ones they refuse are closed"),
        (status = 400, description = "A rule does not parse (the message says which and what to write)", body = ErrorBody),
        (status = 404, description = "No such live sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn update_network(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<StatusCode, ApiError> {
    svc.update_network(&team, &id, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{sandboxID}/refreshes", tag = "sandboxes",
    params(("sandboxID" = String, Path)), request_body = RefreshRequest,
    responses(
        (status = 204, description = "The sandbox lives at least `duration` more seconds"),
        (status = 404, description = "No such live sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn refresh(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    svc.refresh(&team, &id, body.duration).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_is_decoded_like_the_sdk_encodes_it() {
        // Python: urlencode({quote(k): quote(v)}) for {"a b": "x&y", "user": "alice"}; the
        // outer query encoding is already undone by the time the value reaches us.
        let raw = "a%2520b=x%2526y&user=alice";
        assert_eq!(
            parse_metadata(raw).unwrap(),
            [
                ("a b".to_string(), "x&y".to_string()),
                ("user".into(), "alice".into())
            ]
        );
    }

    #[test]
    fn list_query_parses_sdk_parameters_and_rejects_bad_ones() {
        let q = parse_list_query(Some(
            "state=running%2Cpaused&limit=10&order=desc&startedAfter=2026-01-01T00%3A00%3A00%2B00%3A00",
        ))
        .unwrap();
        assert_eq!(q.states, [StoreState::Running, StoreState::Paused]);
        assert_eq!(q.limit, Some(10));
        assert_eq!(q.order, ListOrder::Desc);
        assert!(q.started_after.is_some());
        for bad in [
            "state=zombie",
            "limit=0",
            "limit=x",
            "order=up",
            "startedAfter=now",
        ] {
            assert!(parse_list_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
