//! The agent's HTTP surface: envd's plain endpoints (`/health`, `/init`, `/envs`, `/metrics`,
//! `/files`) beside the Connect services, one access-token check in front of all of them.

pub mod files;
pub mod init;
pub mod metrics;
pub mod tunnel;
pub mod volumes;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{Method, StatusCode};

use crate::state::{AgentState, Counters};

pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/init", post(init::post_init))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics::get_metrics))
        .route(
            "/files",
            get(files::download)
                .post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/alcove/tunnel",
            post(tunnel::open).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            alcove_volume::wire::PATH,
            post(volumes::session).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/process.Process/{method}",
            post(crate::rpc::process::handle),
        )
        .route(
            "/filesystem.Filesystem/{method}",
            post(crate::rpc::filesystem::handle),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state)
}

/// Errors of the plain HTTP endpoints, in envd's JSON shape `{"code": <status>, "message"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error(
        "missing or wrong access token: send the sandbox's envd access token in X-Access-Token"
    )]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("not enough disk space in the sandbox: {0}")]
    NoSpace(String),
    #[error("internal error in the sandbox agent; retry, and report it if it persists")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(detail) => {
                tracing::error!(detail, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let body = serde_json::json!({ "code": status.as_u16(), "message": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}

/// Once /init set a token, every call must carry it, except the health check, /init itself
/// (which checks on its own) and /files (which also accepts a signed URL).
async fn authorize(State(state): State<Arc<AgentState>>, req: Request, next: Next) -> Response {
    Counters::inc(&state.counters.requests);
    let path = req.uri().path();
    let exempt = (req.method() == Method::GET && path == "/health")
        || (req.method() == Method::POST && path == "/init")
        || path == "/files";
    if !exempt && state.token_is_set() {
        let presented = req
            .headers()
            .get(ACCESS_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        if !state.token_matches(presented) {
            Counters::inc(&state.counters.unauthorized);
            let response = unauthorized(path);
            drain_refused(req.into_body()).await;
            return response;
        }
    }
    next.run(req).await
}

/// The most of a refused request's body read before answering.
const DRAIN_LIMIT: usize = 1 << 20;
/// How long a refused request's body is read before answering.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads (and drops) a refused request's body, bounded in size and time, before the refusal is
/// sent. Answering while the client is still writing makes the server close a connection with
/// unread bytes: the peer sees a reset ("broken pipe") instead of the 401 (or 400) it was sent,
/// which is what a streaming Connect client hit when its token was wrong.
pub(crate) async fn drain_refused(body: axum::body::Body) {
    let _ = tokio::time::timeout(DRAIN_TIME, axum::body::to_bytes(body, DRAIN_LIMIT)).await;
}

/// Connect clients expect a Connect error body; others get envd's JSON error.
fn unauthorized(path: &str) -> Response {
    if path.starts_with("/process.") || path.starts_with("/filesystem.") {
        crate::rpc::unary_error(&crate::rpc::RpcError::new(
            alcove_envd_proto::connect::Code::Unauthenticated,
            ApiError::Unauthorized.to_string(),
        ))
    } else {
        ApiError::Unauthorized.into_response()
    }
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The default environment processes get (set by /init).
async fn envs(
    State(state): State<Arc<AgentState>>,
) -> axum::Json<std::collections::BTreeMap<String, String>> {
    axum::Json(state.defaults().env_vars)
}
