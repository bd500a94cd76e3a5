//! The gateway's HTTP side: MCP Streamable HTTP at `/mcp`, behind `Authorization: Bearer <token>`.
//!
//! Stateless (no `Mcp-Session-Id`): every POST is answered on its own with JSON, so a client that
//! goes away leaves nothing behind, and the gateway holds no per-client state to bound. The token
//! is compared in constant time; anything without it gets 401 before the MCP layer sees it.
//! Host and Origin checks are off: requests arrive through Alcove's proxy under the sandbox's
//! `50005-<id>.<domain>` name, and the token, not the name, is what grants access.
//!
//! The port listens before the servers have started (see [`crate::launch`]): an authorized
//! request that arrives meanwhile waits for them, and once a server has failed every request gets
//! 503 with the reason.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::gateway::{Handler, Phase, START_TIMEOUT};

/// Largest JSON-RPC request body accepted.
const MAX_BODY: usize = 4 << 20;

/// The router: `/mcp` (token required) and `/health` (open, says nothing but "ok").
pub fn router(
    phase: watch::Receiver<Phase>,
    token: String,
    stop: CancellationToken,
) -> axum::Router {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY)
        .with_cancellation_token(stop);
    let current = phase.clone();
    let service = StreamableHttpService::new(
        // `require_started` let the request through, so the gateway is there.
        move || match &*current.borrow() {
            Phase::Ready(g) => Ok(Handler(g.clone())),
            _ => Err(std::io::Error::other("the MCP gateway is not ready")),
        },
        Arc::new(NeverSessionManager::default()),
        config,
    );
    axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(phase, require_started))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ))
        .route("/health", axum::routing::get(|| async { "ok" }))
}

async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => unauthorized(
            "the bearer token is not this gateway's: use the sandbox's MCP token (get_mcp_token() in the SDK, /etc/mcp-gateway/.token in the sandbox)",
        ),
        None => unauthorized(
            "this MCP gateway needs `Authorization: Bearer <token>` with the sandbox's MCP token (get_mcp_token() in the SDK)",
        ),
    }
}

/// Holds a request until the servers have started; answers 503 with the reason if they failed.
async fn require_started(
    State(mut phase): State<watch::Receiver<Phase>>,
    req: Request,
    next: Next,
) -> Response {
    let settled = async {
        loop {
            // Cloned out at once: the watch's borrow must not be held across an await.
            let now: Option<Result<(), Arc<str>>> = match &*phase.borrow_and_update() {
                Phase::Starting => None,
                Phase::Ready(_) => Some(Ok(())),
                Phase::Failed(reason) => Some(Err(reason.clone())),
            };
            if let Some(outcome) = now {
                return outcome;
            }
            if phase.changed().await.is_err() {
                return Err(Arc::from("the gateway is stopping"));
            }
        }
    };
    let outcome = tokio::time::timeout(START_TIMEOUT, settled)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the MCP servers did not start within {}s",
                START_TIMEOUT.as_secs()
            )
            .into())
        });
    match outcome {
        Ok(()) => next.run(req).await,
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "error": "mcp_server_failed",
                "message": format!(
                    "{reason}; the gateway serves nothing else: see /var/log/mcp-gateway.log in the sandbox, and create a new sandbox with a corrected mcp config"
                ),
            })),
        )
            .into_response(),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": "unauthorized", "message": message })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mcp-gateway\""),
    );
    r
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Gateway;
    use axum::body::Body;
    use tower::ServiceExt;

    const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

    fn post(auth: Option<&str>) -> http::Request<Body> {
        let mut b = http::Request::post("/mcp")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("host", "50005-sbx.alcove.test");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Body::from(INIT)).unwrap()
    }

    async fn app() -> axum::Router {
        let g = Arc::new(Gateway::start(&[]).await.unwrap());
        let (_, rx) = watch::channel(Phase::Ready(g));
        router(rx, "s3cret".into(), CancellationToken::new())
    }

    async fn body(r: Response) -> serde_json::Value {
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn mcp_needs_the_bearer_token() {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic czNjcmV0"),
            Some("Bearer s3cre"),
        ] {
            let r = app().await.oneshot(post(auth)).await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
            assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
            let v = body(r).await;
            assert!(
                v["message"].as_str().unwrap().contains("get_mcp_token()"),
                "{v}"
            );
        }
    }

    #[tokio::test]
    async fn with_the_token_mcp_answers_under_the_sandbox_host_name() {
        for auth in ["Bearer s3cret", "bearer s3cret"] {
            let r = app().await.oneshot(post(Some(auth))).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let v = body(r).await;
            assert_eq!(v["id"], 1, "{v}");
            assert_eq!(
                v["result"]["serverInfo"]["name"], "alcove-mcp-gateway",
                "{v}"
            );
            assert!(v["result"]["capabilities"]["tools"].is_object(), "{v}");
        }
    }

    #[tokio::test]
    async fn requests_wait_for_the_start_and_then_get_its_outcome() {
        let (tx, rx) = watch::channel(Phase::Starting);
        let app = router(rx, "s3cret".into(), CancellationToken::new());
        // Without the token the answer is 401 at once, starting or not.
        let r = app.clone().oneshot(post(None)).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // With it, the request waits for the start.
        let pending = tokio::spawn(app.clone().oneshot(post(Some("Bearer s3cret"))));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!pending.is_finished());
        let g = Arc::new(Gateway::start(&[]).await.unwrap());
        tx.send(Phase::Ready(g)).unwrap();
        let r = pending.await.unwrap().unwrap();
        assert_eq!(r.status(), StatusCode::OK);

        // A failed start: every request gets 503 and the reason.
        let (tx, rx) = watch::channel(Phase::Starting);
        let app = router(rx, "s3cret".into(), CancellationToken::new());
        tx.send(Phase::Failed("MCP server `time` did not answer".into()))
            .unwrap();
        let r = app.oneshot(post(Some("Bearer s3cret"))).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let v = body(r).await;
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains("`time`") && msg.contains("new sandbox"), "{v}");
    }

    #[tokio::test]
    async fn health_is_open_and_says_nothing() {
        let r = app()
            .await
            .oneshot(http::Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}
