//! The gateway's HTTP side: MCP Streamable HTTP at `/mcp`, behind `Authorization: Bearer <token>`.
//!
//! Stateless (no `Mcp-Session-Id`): every POST is answered on its own with JSON, so a client that
//! goes away leaves nothing behind, and the gateway holds no per-client state to bound. The token
//! is compared in constant time; anything without it gets 401 before the MCP layer sees it.
//! Host and Origin checks are off: requests arrive through Alcove's proxy under the sandbox's
//! `50005-<id>.<domain>` name, and the token, not the name, is what grants access.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, Handler};

/// Largest JSON-RPC request body accepted.
const MAX_BODY: usize = 4 << 20;

/// The router: `/mcp` (token required) and `/health` (open, says nothing but "ok").
pub fn router(gateway: Arc<Gateway>, token: String, stop: CancellationToken) -> axum::Router {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY)
        .with_cancellation_token(stop);
    let g = gateway.clone();
    let service = StreamableHttpService::new(
        move || Ok(Handler(g.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    axum::Router::new()
        .nest_service("/mcp", service)
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
        router(g, "s3cret".into(), CancellationToken::new())
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
    async fn health_is_open_and_says_nothing() {
        let r = app()
            .await
            .oneshot(http::Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}
