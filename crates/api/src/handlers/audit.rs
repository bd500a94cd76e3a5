//! Run traces and the audit log (`docs/audit.md`): a sandbox's events (paged or followed as
//! server-sent events) and the team's audit export.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::{AppState, Team, param};
use crate::error::{ApiError, ErrorBody};
use crate::models::{AuditEventView, parse_rfc3339};
use crate::service::Service;

/// Largest page of events.
pub const MAX_EVENTS: usize = 10_000;
/// How long one `follow=true` stream stays open at most; the client reconnects with `after`.
const FOLLOW_FOR: Duration = Duration::from_secs(3600);
/// How often a followed stream looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

fn int_param(raw: Option<&str>, name: &str, default: i64) -> Result<i64, ApiError> {
    match param(raw, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ApiError::InvalidQuery {
            detail: format!("{name}={v:?} must be an integer"),
        }),
    }
}

fn limit_param(raw: Option<&str>) -> Result<usize, ApiError> {
    let n = int_param(raw, "limit", 1000)?;
    if !(1..=MAX_EVENTS as i64).contains(&n) {
        return Err(ApiError::InvalidQuery {
            detail: format!("limit={n} must be between 1 and {MAX_EVENTS}"),
        });
    }
    Ok(n as usize)
}

/// A sandbox's run trace: API calls on it, state changes, processes started in it (command,
/// user, cwd, exit code or signal, duration, bytes out), file operations (path, op, bytes) and
/// egress connections (destination, SNI or Host, the rule's verdict, bytes), oldest first. With
/// `follow=true` the answer is a stream of server-sent events (`id` is the `seq`), new events
/// as they are written, until the sandbox ends or an hour passes.
#[utoipa::path(get, path = "/alcove/v1/sandboxes/{sandboxID}/events", tag = "alcove",
    params(("sandboxID" = String, Path),
        ("after" = Option<i64>, Query, description = "Only events with seq above this (default 0)"),
        ("limit" = Option<usize>, Query, description = "At most this many (1-10000, default 1000)"),
        ("follow" = Option<bool>, Query, description = "Stream new events as server-sent events")),
    responses(
        (status = 200, description = "The events (or, with follow, text/event-stream)", body = [AuditEventView]),
        (status = 400, description = "A malformed after or limit", body = ErrorBody),
        (status = 404, description = "No such sandbox of this team", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn sandbox_events(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let raw = raw.as_deref();
    let after = int_param(raw, "after", 0)?;
    let limit = limit_param(raw)?;
    let follow = matches!(param(raw, "follow").as_deref(), Some("true" | "1"));
    // Checks the sandbox is the team's (404 otherwise) before anything streams.
    let first = svc.sandbox_events(&team, &id, after, limit).await?;
    if !follow {
        return Ok(Json(first).into_response());
    }
    Ok(follow_events(svc, team, id, after, first).into_response())
}

fn follow_events(
    svc: Arc<Service>,
    team: String,
    id: String,
    after: i64,
    first: Vec<AuditEventView>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct St {
        svc: Arc<Service>,
        team: String,
        id: String,
        cursor: i64,
        pending: Vec<AuditEventView>,
        deadline: Instant,
        done: bool,
    }
    let cursor = first.last().map_or(after, |e| e.seq);
    let st = St {
        svc,
        team,
        id,
        cursor,
        pending: first,
        deadline: Instant::now() + FOLLOW_FOR,
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if !st.pending.is_empty() {
                let batch = std::mem::take(&mut st.pending);
                return Some((batch, st));
            }
            if st.done || Instant::now() >= st.deadline {
                return None;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
            // Whether the sandbox had ended before this read: then this read has its last
            // events, and the stream ends after them.
            let ended = st.svc.sandbox_ended(&st.team, &st.id).await.unwrap_or(true);
            match st
                .svc
                .sandbox_events(&st.team, &st.id, st.cursor, 1000)
                .await
            {
                Ok(ev) => {
                    if let Some(last) = ev.last() {
                        st.cursor = last.seq;
                    }
                    st.pending = ev;
                    st.done = ended;
                }
                Err(_) => return None,
            }
        }
    })
    .flat_map(|batch| {
        futures::stream::iter(batch.into_iter().map(|e| {
            Ok(Event::default()
                .id(e.seq.to_string())
                .event(e.kind.clone())
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().comment("unserialisable event")))
        }))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The team's audit records as JSONL (one `AuditEventView` per line), oldest first, for
/// `alcove audit export`. Each team's records chain by SHA-256, so an export verifies alone
/// (`alcove audit verify`). The admin key may pass `team=` (another team, or `*` for all).
#[utoipa::path(get, path = "/alcove/v1/audit", tag = "alcove",
    params(
        ("since" = Option<String>, Query, description = "RFC 3339: records at or after it"),
        ("until" = Option<String>, Query, description = "RFC 3339: records before it"),
        ("after" = Option<i64>, Query, description = "Only records with seq above this (paging)"),
        ("limit" = Option<usize>, Query, description = "At most this many (1-10000, default 1000)"),
        ("team" = Option<String>, Query, description = "Admin key only: another team, or *")),
    responses(
        (status = 200, description = "application/x-ndjson: one record per line; X-Alcove-Next-After has the last seq", content_type = "application/x-ndjson", body = AuditEventView),
        (status = 400, description = "A malformed parameter", body = ErrorBody),
        (status = 403, description = "Another team, without the admin key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn audit_export(
    State(svc): State<AppState>,
    Team(team): Team,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let raw = raw.as_deref();
    let time = |name: &str| -> Result<Option<i64>, ApiError> {
        match param(raw, name) {
            None => Ok(None),
            Some(v) => parse_rfc3339(&v)
                .map(Some)
                .ok_or_else(|| ApiError::InvalidQuery {
                    detail: format!("{name}={v:?} is not an RFC 3339 time (2026-12-01T00:00:00Z)"),
                }),
        }
    };
    let (since, until) = (time("since")?, time("until")?);
    let after = int_param(raw, "after", 0)?;
    let limit = limit_param(raw)?;
    let who = param(raw, "team");
    let records = svc
        .audit_export(&team, who.as_deref(), since, until, after, limit)
        .await?;
    super::ndjson(&records, |e| e.seq, after)
}
