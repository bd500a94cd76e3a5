//! Operational endpoints: health and the OpenAPI document (open), Prometheus metrics (the admin
//! key: they describe the whole host).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::{Admin, AppState};
use crate::error::ErrorBody;
use crate::metrics::METRICS;

/// Liveness of the API server itself.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, description = "The server is up", body = String)))]
pub async fn health() -> &'static str {
    "ok"
}

/// The server's own metrics in Prometheus text format. Host-wide, so the admin key only.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String),
        (status = 401, description = "No or bad API key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn prometheus(State(svc): State<AppState>, _admin: Admin) -> impl IntoResponse {
    let running = svc.active_sandboxes().await as u64;
    let mut body = METRICS.render(&[(
        "alcove_sandboxes_running",
        "Sandboxes in state running.",
        running,
    )]);
    body.push_str(&svc.team_metrics_text().await);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// This API's OpenAPI document (the same as `openapi/alcove.json` in the repository).
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
}
