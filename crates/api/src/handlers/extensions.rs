//! Alcove's additive endpoints, under `/alcove/v1/`: nothing E2B defines lives here.

use axum::Json;
use axum::extract::{Path, State};

use super::{AppState, Team};
use crate::error::{ApiError, ErrorBody};
use crate::models::SandboxRecordView;

/// Any sandbox the team ever created, including killed and lost ones, with why it ended and
/// its full state history.
#[utoipa::path(get, path = "/alcove/v1/sandboxes/{sandboxID}", tag = "alcove",
    params(("sandboxID" = String, Path)),
    responses(
        (status = 200, description = "The sandbox record", body = SandboxRecordView),
        (status = 404, description = "Unknown sandbox", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn sandbox_record(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<SandboxRecordView>, ApiError> {
    Ok(Json(svc.record(&team, &id).await?))
}
