//! The edge against a hostile client (issue 13): tokens on every platform port, no waking a
//! paused sandbox for a stranger, no control-plane credentials into the guest, host-wide
//! endpoints for the admin only, and the listener's caps (slow headers, connections, streams).
//! A real server on 127.0.0.1 over the fake backend; raw TCP where the HTTP client would hide
//! what is tested.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_with(limits: alcove_api::Limits) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), limits).await;
    (dir, s)
}

/// Creates a sandbox; its id and envd access token.
async fn sandbox(s: &TestServer, body: serde_json::Value) -> (String, String) {
    let r = s.client().post("/v2/sandboxes", body).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    (
        r.json["sandboxID"].as_str().unwrap().to_owned(),
        r.json["envdAccessToken"].as_str().unwrap().to_owned(),
    )
}

/// Sends a keyless request to `port` of sandbox `id` with extra headers.
async fn to_sandbox(
    s: &TestServer,
    id: &str,
    port: u16,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> common::Reply {
    let mut c = s.client();
    c.key = None;
    let port = port.to_string();
    let mut h = vec![("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", port.as_str())];
    h.extend_from_slice(extra);
    c.send(method, path, &h, b"{}".to_vec()).await
}

#[tokio::test]
async fn every_platform_port_needs_the_sandboxs_own_access_token() {
    let (_dir, s) = start_with(fast_limits()).await;
    let (id, token) = sandbox(&s, json!({"templateID": "code-interpreter-v1"})).await;
    let (_other, other_token) = sandbox(&s, json!({"templateID": "base"})).await;
    assert_ne!(token, other_token);

    for port in alcove_api::proxy::PLATFORM_PORTS {
        for path in ["/execute", "/files", "/process.Process/Start"] {
            for bad in [None, Some("wrong"), Some(other_token.as_str())] {
                let h: Vec<(&str, &str)> = bad.iter().map(|t| ("X-Access-Token", *t)).collect();
                let r = to_sandbox(&s, &id, *port, "POST", path, &h).await;
                assert_error(&r, 401, "invalid_access_token");
            }
        }
        let ok = to_sandbox(
            &s,
            &id,
            *port,
            "POST",
            "/execute",
            &[("X-Access-Token", &token)],
        )
        .await;
        assert_eq!(ok.status, 200, "{:?}", ok.json);
        assert_eq!(ok.json["port"], *port);
        // Health stays open, as in envd.
        assert_eq!(
            to_sandbox(&s, &id, *port, "GET", "/health", &[])
                .await
                .status,
            200
        );
    }
    // The SDKs manage interpreter contexts without the token (no code runs there); a token that
    // is sent must still be right.
    let ctx = to_sandbox(&s, &id, 49999, "GET", "/contexts", &[]).await;
    assert_eq!(ctx.status, 200, "{:?}", ctx.json);
    assert_error(
        &to_sandbox(
            &s,
            &id,
            49999,
            "POST",
            "/contexts/x/restart",
            &[("X-Access-Token", "wrong")],
        )
        .await,
        401,
        "invalid_access_token",
    );
    // The host form is guarded the same way.
    let mut c = s.client();
    c.key = None;
    let host = format!("49999-{id}.localhost:{}", s.addr.port());
    let r = c
        .send("POST", "/execute", &[("host", host.as_str())], vec![])
        .await;
    assert_error(&r, 401, "invalid_access_token");
    s.stop().await;
}

#[tokio::test]
async fn control_plane_credentials_never_reach_the_guest() {
    let (_dir, s) = start_with(fast_limits()).await;
    let (id, token) = sandbox(&s, json!({"templateID": "base"})).await;
    let key = s.key.clone();
    let bearer = format!("Bearer {key}");

    let r = to_sandbox(
        &s,
        &id,
        49983,
        "POST",
        "/files",
        &[
            ("X-Access-Token", &token),
            ("X-API-KEY", &key),
            ("Authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["apiKeyHeader"], false, "X-API-KEY is stripped");
    assert!(r.json["authorization"].is_null(), "{:?}", r.json);
    assert_eq!(r.json["accessTokenHeader"], true, "envd checks its token");
    // envd names the user with Basic auth: that one is kept.
    let basic = "Basic dXNlcjo=";
    let r = to_sandbox(
        &s,
        &id,
        49983,
        "POST",
        "/files",
        &[("X-Access-Token", &token), ("Authorization", basic)],
    )
    .await;
    assert_eq!(r.json["authorization"], basic);
    // A user port sees none of them, nor the sandbox's access token.
    let r = to_sandbox(
        &s,
        &id,
        8000,
        "GET",
        "/",
        &[
            ("X-Access-Token", &token),
            ("x-api-key", &key),
            ("authorization", "bearer whatever"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["apiKeyHeader"], false);
    assert_eq!(r.json["accessTokenHeader"], false);
    assert!(r.json["authorization"].is_null(), "{:?}", r.json);
    s.stop().await;
}

#[tokio::test]
async fn auto_resume_wakes_a_sandbox_only_for_authorized_traffic() {
    let (_dir, s) = start_with(fast_limits()).await;
    let api = s.client();
    let (id, token) = sandbox(
        &s,
        json!({"templateID": "base", "autoResume": {"enabled": true},
               "network": {"allowPublicTraffic": false}}),
    )
    .await;
    let state = || async {
        api.get(&format!("/sandboxes/{id}")).await.json["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await
            .status,
        204
    );
    assert_error(
        &to_sandbox(&s, &id, 49983, "POST", "/files", &[]).await,
        401,
        "invalid_access_token",
    );
    assert_error(
        &to_sandbox(
            &s,
            &id,
            49999,
            "POST",
            "/execute",
            &[("X-Access-Token", "x")],
        )
        .await,
        401,
        "invalid_access_token",
    );
    assert_error(
        &to_sandbox(&s, &id, 8000, "GET", "/", &[]).await,
        403,
        "invalid_traffic_access_token",
    );
    assert_eq!(state().await, "paused", "refused traffic must not wake it");
    assert!(s.backend.paused.lock().unwrap().contains(&id));

    let ok = to_sandbox(
        &s,
        &id,
        49983,
        "POST",
        "/files",
        &[("X-Access-Token", &token)],
    )
    .await;
    assert_eq!(ok.status, 200, "{:?}", ok.json);
    assert_eq!(state().await, "running");
    s.stop().await;
}

#[tokio::test]
async fn host_wide_endpoints_need_the_admin_key() {
    let (dir, s) = start_with(fast_limits()).await;
    let store =
        alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir.path())).unwrap();
    let team = store.create_team("tenant").unwrap();
    let tenant_key = store.create_api_key(&team.id, "t").unwrap().secret;
    // Team names are unique: no tenant can name itself "admin".
    assert!(store.create_team("admin").is_err());
    drop(store);

    let mut anon = s.client();
    anon.key = None;
    assert_error(&anon.get("/metrics").await, 401, "unauthenticated");
    {
        let mut c = s.client();
        c.key = Some(tenant_key);
        assert_error(&c.get("/metrics").await, 403, "admin_key_required");
        assert_error(
            &c.get("/alcove/v1/warm-pool").await,
            403,
            "admin_key_required",
        );
        // The tenant's own API still works.
        assert_eq!(c.get("/v2/sandboxes").await.status, 200);
    }
    let admin = s.client();
    let m = admin.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(
        m.json
            .as_str()
            .unwrap()
            .contains("alcove_http_requests_total")
    );
    assert_eq!(admin.get("/alcove/v1/warm-pool").await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn the_first_start_key_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = alcove_api::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    config.database = Some(alcove_store::Database::from_test_env(dir.path()));
    let server = alcove_api::Server::bind(config, Arc::new(FakeBackend::new()))
        .await
        .unwrap();
    let key = server.first_start_key().unwrap().to_owned();
    let env = server.sdk_env();
    assert!(!env.contains(&key), "{env}");
    assert!(env.contains(alcove_api::API_KEY_FILE), "{env}");
}

fn limits_with(f: impl FnOnce(&mut alcove_api::ConnectionLimits)) -> alcove_api::Limits {
    let mut l = fast_limits();
    f(&mut l.connections);
    l
}

/// Reads until the peer closes (or resets); what it sent before.
async fn read_to_close(conn: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let (_dir, s) = start_with(limits_with(|c| {
        c.header_read_timeout = Duration::from_millis(500)
    }))
    .await;
    // Headers that never finish (slowloris).
    let mut slow = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: ")
        .await
        .unwrap();
    assert!(
        read_to_close(&mut slow, Duration::from_secs(10))
            .await
            .is_some(),
        "a connection that never finishes its headers is closed"
    );
    // A connection that never sends anything.
    let mut idle = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    assert!(
        read_to_close(&mut idle, Duration::from_secs(10))
            .await
            .is_some()
    );
    // A keep-alive connection idle after its first request.
    let mut ka = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut ka, Duration::from_secs(10)).await;
    assert!(got.is_some_and(|g| g.starts_with("HTTP/1.1 200")));
    assert_eq!(s.client().get("/health").await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_the_server_keeps_serving() {
    let (_dir, s) = start_with(limits_with(|c| {
        c.max_connections = 4;
        c.header_read_timeout = Duration::from_secs(60);
    }))
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        held.push(c);
    }
    // Give the accept loop time to take all four.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let mut extra = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let got = read_to_close(&mut extra, Duration::from_secs(10))
            .await
            .expect("refused at once, not queued");
        assert!(!got.contains("200 OK"), "{got}");
        if !got.is_empty() {
            assert!(got.starts_with("HTTP/1.1 503"), "{got}");
            assert!(got.contains("too_many_connections"), "{got}");
        }
    }
    drop(held);
    let api = s.client();
    let mut ok = false;
    for _ in 0..50 {
        if tokio::time::timeout(Duration::from_secs(2), api.get("/health"))
            .await
            .is_ok_and(|r| r.status == 200)
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "serving again once connections closed");
    s.stop().await;
}

#[tokio::test]
async fn proxied_streams_are_capped_per_sandbox_and_in_total() {
    let (_dir, s) = start_with(limits_with(|c| {
        c.max_proxied_streams_per_sandbox = 1;
        c.max_proxied_streams = 2;
    }))
    .await;
    let (a, _) = sandbox(&s, json!({"templateID": "base"})).await;
    let (b, _) = sandbox(&s, json!({"templateID": "base"})).await;
    let (c, _) = sandbox(&s, json!({"templateID": "base"})).await;
    s.backend.hang(&a);
    s.backend.hang(&b);
    let s = Arc::new(s);
    let open = |id: String| {
        let s = s.clone();
        tokio::spawn(async move { to_sandbox(&s, &id, 8000, "GET", "/", &[]).await })
    };
    let first = open(a.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = to_sandbox(&s, &a, 8000, "GET", "/", &[]).await;
    assert_error(&r, 429, "too_many_streams");
    assert!(r.json["message"].as_str().unwrap().contains(&a));
    let second = open(b.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = to_sandbox(&s, &c, 8000, "GET", "/", &[]).await;
    assert_error(&r, 429, "too_many_streams");

    s.backend.unhang(&a);
    s.backend.unhang(&b);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    let r = to_sandbox(&s, &c, 8000, "GET", "/", &[]).await;
    assert_eq!(r.status, 200, "permits come back when streams end");
    Arc::try_unwrap(s).ok().unwrap().stop().await;
}

#[tokio::test]
async fn a_declared_oversize_body_is_refused_before_it_is_sent() {
    let (_dir, s) = start_with(fast_limits()).await;
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: {}\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{{",
        s.key
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // The 10 GB never come: the answer must not wait for them (nor for the request deadline).
    let text = read_head(&mut conn, Duration::from_secs(5))
        .await
        .expect("an answer within 5 s, without the body");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// Reads an answer's head (status line and headers); `None` if the connection ended first
/// (closed or reset) or `within` passed.
async fn read_head(conn: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(within, async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        Some(String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .ok()?
}

#[tokio::test]
async fn a_refused_streaming_request_gets_its_error_not_a_reset() {
    // A Connect client streams its body (chunked); refused before forwarding (wrong token, a
    // sandbox that is not there, a malformed route), it must read the error, not a broken pipe.
    let (_dir, s) = start_with(fast_limits()).await;
    let (id, _token) = sandbox(&s, json!({"templateID": "base"})).await;
    for (sandbox_id, want) in [
        (id.as_str(), "401"),
        ("nosuchsandbox", "502"),
        ("not-an-id", "400"),
    ] {
        let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let head = format!(
            "POST /process.Process/Start HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {sandbox_id}\r\n\
             E2b-Sandbox-Port: 49983\r\nX-Access-Token: wrong\r\n\
             Content-Type: application/connect+json\r\nTransfer-Encoding: chunked\r\n\r\n\
             400\r\n{}\r\n",
            "x".repeat(1024)
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // 769 KiB in all, under the 1 MiB the server reads of a refused body.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let more = format!("40000\r\n{}\r\n", "x".repeat(0x40000));
            conn.write_all(more.as_bytes())
                .await
                .expect("the server kept reading the refused body");
        }
        conn.write_all(b"0\r\n\r\n").await.unwrap();
        let text = read_head(&mut conn, Duration::from_secs(5))
            .await
            .expect("an answer, not a reset");
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want}")),
            "{sandbox_id}: {text}"
        );
    }
    s.stop().await;
}
