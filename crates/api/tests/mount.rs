//! Services the binary mounts beside the API (`Server::mount_authenticated`, how `/mcp` is
//! served): behind the API key with the API's structured 401, with the REST body-size refusal,
//! and never shadowing the API's own routes.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use common::{FakeBackend, TestServer, assert_error, fast_limits};

async fn start() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let echo = tower::service_fn(|req: Request| async move {
        Ok::<_, Infallible>(http::Response::new(Body::from(format!(
            "{} {}",
            req.method(),
            req.uri().path()
        ))))
    });
    let s = TestServer::start_with(
        dir.path(),
        Arc::new(FakeBackend::new()),
        fast_limits(),
        |server| server.mount_authenticated("/mounted", echo),
    )
    .await;
    (dir, s)
}

#[tokio::test]
async fn a_mounted_service_needs_a_valid_key() {
    let (_dir, s) = start().await;
    let mut anon = s.client();
    anon.key = None;
    let r = anon.post("/mounted", serde_json::json!({})).await;
    assert_error(&r, 401, "unauthenticated");
    let r = anon
        .send("POST", "/mounted", &[("X-API-KEY", "e2b_wrong")], vec![])
        .await;
    assert_error(&r, 401, "unauthenticated");
    let r = anon
        .send(
            "POST",
            "/mounted",
            &[("Authorization", "Bearer nope")],
            vec![],
        )
        .await;
    assert_error(&r, 401, "unauthenticated");

    let r = s.client().post("/mounted", serde_json::json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json, "POST /mounted");
    let bearer = format!("Bearer {}", s.key);
    let r = anon
        .send(
            "GET",
            "/mounted",
            &[("Authorization", bearer.as_str())],
            vec![],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json, "GET /mounted");
    // The API's own routes are untouched.
    assert_eq!(s.client().get("/v2/sandboxes").await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_mounted_service_keeps_the_body_limit() {
    let (_dir, s) = start().await;
    let too_big = vec![b'x'; (1 << 20) + 1];
    let r = s.client().send("POST", "/mounted", &[], too_big).await;
    assert_error(&r, 413, "request_too_large");
    s.stop().await;
}
