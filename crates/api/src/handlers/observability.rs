//! A sandbox's resource metrics and logs (`/sandboxes/{id}/metrics`, `/logs` and their v2).

use axum::Json;
use axum::extract::{Path, RawQuery, State};

use super::{AppState, Team, query_pairs};
use crate::error::{ApiError, ErrorBody};
use crate::models::{SandboxLog, SandboxLogs, SandboxLogsV2, SandboxMetric, SandboxesWithMetrics};
use crate::service::LogQuery;

#[utoipa::path(get, path = "/sandboxes/{sandboxID}/metrics", tag = "sandboxes",
    params(("sandboxID" = String, Path),
        ("start" = Option<i64>, Query, description = "Unix seconds; default: when the sandbox started"),
        ("end" = Option<i64>, Query, description = "Unix seconds; default: now")),
    responses(
        (status = 200, description = "The sandbox's samples in the window, oldest first: every few seconds for the last hour, minute averages for the day before", body = [SandboxMetric]),
        (status = 400, description = "start or end is not an integer, or end is before start", body = ErrorBody),
        (status = 404, description = "No such sandbox of this team", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn metrics(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<SandboxMetric>>, ApiError> {
    let pairs = query_pairs(raw.as_deref());
    let secs = |name: &str| -> Result<Option<i64>, ApiError> {
        match pairs.iter().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) => v
                .parse::<i64>()
                .map(Some)
                .map_err(|_| ApiError::InvalidQuery {
                    detail: format!("{name}={v:?} must be a Unix time in seconds"),
                }),
        }
    };
    let (start, end) = (secs("start")?, secs("end")?);
    Ok(Json(svc.metrics(&team, &id, start, end).await?))
}

#[utoipa::path(get, path = "/sandboxes/metrics", tag = "sandboxes",
    params(("sandbox_ids" = String, Query, description = "Comma-separated sandbox ids (at most 100)")),
    responses(
        (status = 200, description = "Latest sample per live sandbox", body = SandboxesWithMetrics),
        (status = 400, description = "Missing or too many ids", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn metrics_many(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<Json<SandboxesWithMetrics>, ApiError> {
    let ids: Vec<String> = query_pairs(raw.as_deref())
        .into_iter()
        .filter(|(k, _)| k == "sandbox_ids")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    if ids.is_empty() || ids.len() > 100 {
        return Err(ApiError::InvalidQuery {
            detail: "sandbox_ids must list 1 to 100 comma-separated sandbox ids".into(),
        });
    }
    Ok(Json(svc.metrics_many(&team, &ids).await?))
}

fn limit_param(raw: Option<&str>, default: usize) -> Result<usize, ApiError> {
    match query_pairs(raw).into_iter().find(|(k, _)| k == "limit") {
        None => Ok(default),
        Some((_, v)) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| ApiError::InvalidQuery {
                detail: "limit must be between 1 and 10000".into(),
            }),
    }
}

#[utoipa::path(get, path = "/sandboxes/{sandboxID}/logs", tag = "sandboxes",
    params(("sandboxID" = String, Path),
        ("start" = Option<i64>, Query, description = "Unix ms; entries at or after it"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 1000)")),
    responses(
        (status = 200, description = "Lifecycle events and the sandbox's own log lines, oldest first", body = SandboxLogs),
        (status = 404, description = "Unknown sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn logs_v1(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SandboxLogs>, ApiError> {
    let limit = limit_param(raw.as_deref(), 1000)?;
    let start = query_pairs(raw.as_deref())
        .into_iter()
        .find(|(k, _)| k == "start")
        .and_then(|(_, v)| v.parse::<i64>().ok());
    let q = LogQuery {
        cursor: start,
        backward: false,
        min_level: None,
        search: None,
        limit,
    };
    let entries = svc.logs(&team, &id, &q).await?;
    Ok(Json(SandboxLogs {
        logs: entries
            .iter()
            .map(|e| SandboxLog {
                timestamp: e.timestamp.clone(),
                line: e.message.clone(),
            })
            .collect(),
        log_entries: entries,
    }))
}

#[utoipa::path(get, path = "/v2/sandboxes/{sandboxID}/logs", tag = "sandboxes",
    params(("sandboxID" = String, Path),
        ("cursor" = Option<i64>, Query, description = "Unix ms to start from"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 1000)"),
        ("direction" = Option<String>, Query, description = "forward (default) or backward"),
        ("level" = Option<String>, Query, description = "Minimum level: debug, info, warn, error"),
        ("search" = Option<String>, Query, description = "Substring the message must contain")),
    responses(
        (status = 200, description = "Log entries", body = SandboxLogsV2),
        (status = 404, description = "Unknown sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn logs_v2(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SandboxLogsV2>, ApiError> {
    let limit = limit_param(raw.as_deref(), 1000)?;
    let pairs = query_pairs(raw.as_deref());
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let q = LogQuery {
        cursor: get("cursor").and_then(|v| v.parse::<i64>().ok()),
        backward: get("direction").as_deref() == Some("backward"),
        min_level: get("level"),
        search: get("search"),
        limit,
    };
    let entries = svc.logs(&team, &id, &q).await?;
    Ok(Json(SandboxLogsV2 { logs: entries }))
}
