//! Metering and team limits, under `/alcove/v1/` (`docs/metering.md`): usage reports, the
//! billing events feed, and each team's limits and spend cap.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;

use super::{ApiJson, AppState, Team, param};
use crate::error::{ApiError, ErrorBody};
use crate::models::{TeamLimitsBody, TeamLimitsView, UsageReport, parse_rfc3339};
use crate::service::{MAX_EVENTS_PAGE, parse_group};

fn time_param(raw: Option<&str>, name: &str, default: i64) -> Result<i64, ApiError> {
    match param(raw, name) {
        None => Ok(default),
        Some(v) => parse_rfc3339(&v).ok_or_else(|| ApiError::InvalidQuery {
            detail: format!(
                "{name}={v:?} is not an RFC 3339 time; write it like 2026-12-01T00:00:00Z"
            ),
        }),
    }
}

/// Usage in a window, grouped, with its cost at the server's prices. Compute is allocated
/// vCPU and memory while running; storage is what running and paused sandboxes, snapshots and
/// the team's templates keep on disk; bytes are the egress proxy's.
#[utoipa::path(get, path = "/alcove/v1/usage", tag = "alcove",
    params(
        ("start" = Option<String>, Query, description = "RFC 3339; default: the start of this month (UTC)"),
        ("end" = Option<String>, Query, description = "RFC 3339; default: now"),
        ("groupBy" = Option<String>, Query, description = "sandbox (default), template, day or team"),
        ("team" = Option<String>, Query, description = "Admin key only: another team's id or name, or * for every team")),
    responses(
        (status = 200, description = "Usage and cost per group, and the total", body = UsageReport),
        (status = 400, description = "A malformed time or groupBy", body = ErrorBody),
        (status = 403, description = "Another team, without the admin key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn usage(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let raw = raw.as_deref();
    let now = alcove_store::now_ms();
    let start = time_param(raw, "start", crate::service::month_start(now))?;
    let end = time_param(raw, "end", now)?;
    if end <= start {
        return Err(ApiError::InvalidQuery {
            detail: "end must be after start".into(),
        });
    }
    let group = match param(raw, "groupBy") {
        None => alcove_store::UsageGroup::Sandbox,
        Some(g) => parse_group(&g).ok_or_else(|| ApiError::InvalidQuery {
            detail: format!("groupBy={g:?} is not one of sandbox, template, day, team"),
        })?,
    };
    let who = param(raw, "team");
    Ok(Json(
        svc.usage(&team, who.as_deref(), start, end, group).await?,
    ))
}

/// Usage events for billing systems, as NDJSON (one `UsageEventView` per line), oldest first.
/// Poll with `after` set to the last `seq` received (also in `X-Alcove-Next-After`): events are
/// immutable and numbered in write order, and each has an idempotency key (`id`), so a
/// pipeline never misses or double-counts one.
#[utoipa::path(get, path = "/alcove/v1/usage/events", tag = "alcove",
    params(
        ("after" = Option<i64>, Query, description = "Only events with seq above this (default 0)"),
        ("limit" = Option<usize>, Query, description = "At most this many (1-10000, default 1000)"),
        ("team" = Option<String>, Query, description = "Admin key only: another team, or * for every team")),
    responses(
        (status = 200, description = "application/x-ndjson: one usage event per line", content_type = "application/x-ndjson", body = crate::models::UsageEventView),
        (status = 400, description = "A malformed after or limit", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn usage_events(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let raw = raw.as_deref();
    let after = match param(raw, "after") {
        None => 0,
        Some(v) => v.parse::<i64>().map_err(|_| ApiError::InvalidQuery {
            detail: format!("after={v:?} must be an event's seq (an integer)"),
        })?,
    };
    let limit = match param(raw, "limit") {
        None => 1000,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_EVENTS_PAGE).contains(n))
            .ok_or_else(|| ApiError::InvalidQuery {
                detail: format!("limit={v:?} must be between 1 and {MAX_EVENTS_PAGE}"),
            })?,
    };
    let who = param(raw, "team");
    let events = svc
        .usage_events(&team, who.as_deref(), after, limit)
        .await?;
    super::ndjson(&events, |e| e.seq, after)
}

/// A team's limits (as set and in force), its spend this month and the warnings reached. A
/// team's key may read its own; the admin key any team's.
#[utoipa::path(get, path = "/alcove/v1/teams/{team}/limits", tag = "alcove",
    params(("team" = String, Path, description = "Team id or name")),
    responses(
        (status = 200, description = "The team's limits and standing", body = TeamLimitsView),
        (status = 403, description = "Another team, without the admin key", body = ErrorBody),
        (status = 404, description = "No such team (admin key)", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn get_limits(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(which): Path<String>,
) -> Result<Json<TeamLimitsView>, ApiError> {
    Ok(Json(svc.team_limits_view(&team, &which).await?))
}

/// Replaces a team's limits (admin key only). Fields left out reset to the server's defaults;
/// a cap at or below the spend so far applies at once.
#[utoipa::path(put, path = "/alcove/v1/teams/{team}/limits", tag = "alcove",
    params(("team" = String, Path, description = "Team id or name")),
    request_body = TeamLimitsBody,
    responses(
        (status = 200, description = "The team's limits and standing after the change", body = TeamLimitsView),
        (status = 400, description = "A negative, absurd or unknown value", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 404, description = "No such team", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn put_limits(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(which): Path<String>,
    ApiJson(body): ApiJson<TeamLimitsBody>,
) -> Result<Json<TeamLimitsView>, ApiError> {
    Ok(Json(svc.set_team_limits(&team, &which, body).await?))
}
