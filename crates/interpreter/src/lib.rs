//! Alcove's code interpreter: the HTTP server on port 49999 inside a `code-interpreter-v1`
//! sandbox that the official `e2b-code-interpreter` SDKs talk to, driving Jupyter kernels over
//! ZeroMQ (no Jupyter server).
//!
//! Wire protocol (as the SDKs call it): `POST /execute` streams NDJSON lines (`stdout`, `stderr`,
//! `result`, `error`, `number_of_executions`, `end_of_execution`); `/contexts` creates, lists,
//! restarts and deletes kernels; `GET /health`. A client that goes away mid-cell (the SDK's
//! `timeout`) interrupts the kernel, which stays usable. Python kernels load
//! `python/_alcove_kernel.py`: warm imports, chart extraction for matplotlib figures, and the helpers
//! that apply per-call environment variables.
//!
//! Runs as `alcove-agent interpreter` in the guest (see bin/alcove-agent); host tests run it
//! against kernels installed in a virtualenv.

pub mod contexts;
pub mod kernel;
mod output;

#[cfg(test)]
mod fuzz;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;

use contexts::{ContextError, Contexts};
use kernel::{KernelEnv, KernelError};

/// The helper module of Python kernels (charts, environment helpers, warm imports).
pub const PYTHON_HELPER: &str = include_str!("../python/_alcove_kernel.py");
/// IPython startup file: loads the helper without leaving names in the user's namespace.
const PYTHON_STARTUP: &str = "import _alcove_kernel\n_alcove_kernel.setup()\ndel _alcove_kernel\n";
/// Largest `/execute` or `/contexts` body accepted.
const BODY_LIMIT: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub kernel_dirs: Vec<PathBuf>,
    pub python: PathBuf,
    pub runtime_dir: PathBuf,
    /// Working directory of contexts created without one.
    pub default_cwd: PathBuf,
    /// JSON object of the sandbox's environment variables (written by the agent at `/init`);
    /// read before each cell so a sandbox's `envs` reach its kernels.
    pub sandbox_env_file: PathBuf,
    /// Holds an id the agent rewrites whenever it reseeds the kernel CRNG (every `/init` with
    /// entropy: boot, resume, restore, fork). A Python kernel that has not seen the current id
    /// reseeds `random` and numpy from `os.urandom` before its next cell.
    pub reseed_file: PathBuf,
    /// Start the default Python kernel, and a spare for the next Python context, before
    /// listening (the template snapshot then holds both warm, and `/health` only answers once
    /// they are ready).
    pub warm_python: bool,
}

impl Config {
    pub fn guest_defaults() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], alcove_guest_contract::CODE_INTERPRETER_PORT)),
            kernel_dirs: vec![
                "/usr/local/share/jupyter/kernels".into(),
                "/usr/share/jupyter/kernels".into(),
            ],
            python: "/usr/bin/python3".into(),
            runtime_dir: "/tmp/alcove-interpreter".into(),
            default_cwd: "/home/user".into(),
            sandbox_env_file: "/run/alcove/envs.json".into(),
            reseed_file: "/run/alcove/reseed-id".into(),
            warm_python: true,
        }
    }
}

struct AppState {
    contexts: Arc<Contexts>,
    sandbox_env_file: PathBuf,
    reseed_file: PathBuf,
}

/// Prepares the kernel environment (IPython profile with our startup file) and returns the
/// router. `serve` binds it; tests can drive it directly.
pub async fn app(cfg: &Config) -> std::io::Result<Router> {
    let ipython_dir = cfg.runtime_dir.join("ipython");
    let startup_dir = ipython_dir.join("profile_default").join("startup");
    std::fs::create_dir_all(&startup_dir)?;
    std::fs::write(startup_dir.join("00-alcove.py"), PYTHON_STARTUP)?;
    let pylib = cfg.runtime_dir.join("pylib");
    std::fs::create_dir_all(&pylib)?;
    std::fs::write(pylib.join("_alcove_kernel.py"), PYTHON_HELPER)?;
    let env = KernelEnv {
        kernel_dirs: cfg.kernel_dirs.clone(),
        python: cfg.python.clone(),
        runtime_dir: cfg.runtime_dir.clone(),
        env: vec![
            ("IPYTHONDIR".into(), ipython_dir.display().to_string()),
            (
                "MPLBACKEND".into(),
                "module://matplotlib_inline.backend_inline".into(),
            ),
            ("PYTHONUNBUFFERED".into(), "1".into()),
            ("PYTHONPATH".into(), pylib.display().to_string()),
        ],
    };
    let state = Arc::new(AppState {
        contexts: Arc::new(Contexts::new(env, cfg.default_cwd.clone())),
        sandbox_env_file: cfg.sandbox_env_file.clone(),
        reseed_file: cfg.reseed_file.clone(),
    });
    if cfg.warm_python {
        match state.contexts.default_for(Some("python")).await {
            Ok(ctx) => tracing::info!(context = %ctx.info.id, "default python kernel ready"),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "default python kernel failed to start"
                )
            }
        }
        state.contexts.keep_spare_python().await;
    }
    Ok(Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}", delete(delete_context))
        .route("/contexts/{id}/restart", post(restart_context))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state))
}

/// Serves until the process is killed.
pub async fn serve(cfg: Config) -> std::io::Result<()> {
    let router = app(&cfg).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    tracing::info!(addr = %cfg.listen, "code interpreter listening");
    // On SIGTERM/SIGINT the router (and with it every kernel, which kills its process group
    // when dropped) goes away: kernels never outlive their server.
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => std::future::pending().await,
        }
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

pub use alcove_guest_contract::error_chain;

/// Errors answered as `{"code": status, "message": ...}` (the SDK shows the body text).
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Context(#[from] ContextError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Context(ContextError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Context(ContextError::BadCwd(_)) => StatusCode::BAD_REQUEST,
            ApiError::Context(ContextError::TooMany(_)) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Context(ContextError::Kernel(KernelError::UnknownLanguage { .. })) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Context(ContextError::Kernel(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = error_chain(&self);
        if status.is_server_error() {
            tracing::error!(%message, "interpreter request failed");
        }
        (
            status,
            Json(serde_json::json!({ "code": status.as_u16(), "message": message })),
        )
            .into_response()
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "languages": state.contexts.kernel_env().available(),
    }))
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

async fn execute(
    State(state): State<Arc<AppState>>,
    Json(req): Json<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let ctx = match (&req.context_id, &req.language) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give either context_id or language, not both".into(),
            ));
        }
        (Some(id), None) => state.contexts.get(id)?,
        (None, lang) => state.contexts.default_for(lang.as_deref()).await?,
    };
    let kernel = state.contexts.kernel(&ctx).await?;
    let sandbox_env = read_env_file(&state.sandbox_env_file);
    let per_call = req.env_vars.unwrap_or_default();
    for k in sandbox_env.keys().chain(per_call.keys()) {
        if !valid_env_name(k) {
            return Err(ApiError::BadRequest(format!(
                "environment variable name {k:?} is invalid: use letters, digits and _, not starting with a digit"
            )));
        }
    }
    let (setup, teardown) = output::env_code(&ctx.info.language, &sandbox_env, &per_call);
    let guard = kernel.lock().await;
    if ctx.info.language == "python"
        && let Some(id) = read_small(&state.reseed_file, RESEED_ID_MAX)
        && kernel.needs_reseed(&id)
    {
        match kernel.run_silent(RESEED_PYTHON).await {
            Ok(None) => kernel.mark_reseeded(id),
            Ok(Some(err)) => tracing::warn!(%err, "reseeding the kernel's random state failed"),
            Err(e) => return Err(ApiError::Context(e.into())),
        }
    }
    if let Some(code) = &setup
        && let Some(err) = kernel
            .run_silent(code)
            .await
            .map_err(|e| ApiError::Context(e.into()))?
    {
        tracing::warn!(%err, "setting the cell's environment failed");
    }
    let exec = kernel
        .execute(guard, &req.code)
        .await
        .map_err(|e| ApiError::Context(e.into()))?;
    Ok(output::ndjson_response(
        ctx.info.language.clone(),
        exec,
        teardown,
    ))
}

fn valid_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Reseeds Python's `random` and numpy's global state from the kernel CRNG.
const RESEED_PYTHON: &str = "__import__('_alcove_kernel').reseed()";
/// The reseed id is a 32-character hex string; anything longer is not ours.
const RESEED_ID_MAX: u64 = 64;
/// The agent writes the sandbox's variables; more than this is refused (read as none).
const ENV_FILE_MAX: u64 = 1 << 20;

/// The file's bytes when it exists and holds at most `limit` bytes, as (trimmed) text.
fn read_small(path: &std::path::Path, limit: u64) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).ok()?;
    if buf.len() as u64 > limit {
        tracing::warn!(path = %path.display(), limit, "file too large, ignored");
        return None;
    }
    let s = String::from_utf8(buf).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

fn read_env_file(path: &std::path::Path) -> BTreeMap<String, String> {
    read_small(path, ENV_FILE_MAX)
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

#[derive(Debug, Deserialize)]
struct CreateContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

async fn create_context(
    State(state): State<Arc<AppState>>,
    body: Option<Json<CreateContext>>,
) -> Result<Json<contexts::ContextInfo>, ApiError> {
    let req = body.map(|b| b.0).unwrap_or(CreateContext {
        language: None,
        cwd: None,
    });
    let ctx = state
        .contexts
        .create(req.language.as_deref(), req.cwd.as_deref())
        .await?;
    Ok(Json(ctx.info.clone()))
}

async fn list_contexts(State(state): State<Arc<AppState>>) -> Json<Vec<contexts::ContextInfo>> {
    Json(state.contexts.list())
}

async fn delete_context(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.contexts.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_context(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.contexts.restart(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id");
        assert_eq!(read_small(&p, 8), None);
        std::fs::write(&p, "abc\n").unwrap();
        assert_eq!(read_small(&p, 8).as_deref(), Some("abc"));
        std::fs::write(&p, "0123456789").unwrap();
        assert_eq!(read_small(&p, 8), None);
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("FOO_1"));
        assert!(valid_env_name("_x"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A-B"));
        assert!(!valid_env_name(""));
    }
}
