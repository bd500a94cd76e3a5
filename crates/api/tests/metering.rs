//! Metering, usage reports, billing events, team limits and spend caps through the REST API,
//! over the fake backend and a real SQLite file: compute is charged for the time a sandbox ran
//! (bounded by the wall clock around it, never asserted as a latency), a restart neither loses
//! nor doubles it, a cap warns through a signed webhook to a real local HTTP server, refuses
//! creates and pauses what runs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alcove_api::{Limits, MeteringConfig, Prices, Webhook};
use common::{Api, FakeBackend, TestServer, assert_error, fast_limits, tenant};
use serde_json::{Value, json};

fn metering(prices: Prices, webhook: Option<Webhook>) -> MeteringConfig {
    MeteringConfig {
        interval: Duration::from_millis(200),
        prices,
        webhook,
        ..MeteringConfig::default()
    }
}

async fn start(dir: &std::path::Path, backend: Arc<FakeBackend>, m: MeteringConfig) -> TestServer {
    TestServer::start_metered(dir, backend, fast_limits(), m, |s| s).await
}

async fn usage(api: &Api, query: &str) -> Value {
    let r = api.get(&format!("/alcove/v1/usage?{query}")).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    r.json
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn compute_is_the_time_a_sandbox_ran_across_a_restart_and_a_team_sees_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = start(
        dir.path(),
        backend.clone(),
        metering(Prices::default(), None),
    )
    .await;
    let api = s.client();
    let outer_start = Instant::now();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 600}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let inner_start = Instant::now();
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let d = api.get(&format!("/sandboxes/{id}")).await.json;
    let cpu = f(&d["cpuCount"]);
    let mem_gib = f(&d["memoryMB"]) / 1024.0;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The server stops and starts again while the VM goes on running: that time is charged.
    s.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = start(
        dir.path(),
        backend.clone(),
        metering(Prices::default(), None),
    )
    .await;
    let api = s.client();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inner_end = Instant::now();
    let r = api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    assert_eq!(r.status, 204, "{:?}", r.json);
    let outer_end = Instant::now();
    // Paused: nothing more is charged for compute.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let u = usage(&api, "groupBy=sandbox").await;
    let item = u["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["key"] == id.as_str())
        .unwrap_or_else(|| panic!("{u}"))
        .clone();
    let ran = f(&item["vcpuSeconds"]) / cpu;
    let (lo, hi) = (
        (inner_end - inner_start).as_secs_f64(),
        (outer_end - outer_start).as_secs_f64(),
    );
    assert!(
        lo - 0.05 <= ran && ran <= hi + 0.05,
        "ran {ran} s, not within [{lo}, {hi}]"
    );
    assert!((f(&item["memoryGibSeconds"]) - ran * mem_gib).abs() < 1e-6);
    assert_eq!(item["sandboxes"], 1);
    let p = Prices::default();
    let want_cost = f(&item["vcpuSeconds"]) * p.vcpu_second
        + f(&item["memoryGibSeconds"]) * p.memory_gib_second;
    assert!((f(&item["costUsd"]) - want_cost).abs() < 1e-12, "{item}");
    assert!((f(&u["total"]["vcpuSeconds"]) - f(&item["vcpuSeconds"])).abs() < 1e-9);

    // The billing feed: the same compute, each event once, numbered; a re-poll after the last
    // seq has nothing new about this interval.
    let r = api.get("/alcove/v1/usage/events?limit=10000").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = r.json.as_str().unwrap().to_owned();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keys: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), events.len(), "idempotency keys are unique");
    let compute: f64 = events
        .iter()
        .filter(|e| e["kind"] == "compute" && e["sandboxID"] == id.as_str())
        .map(|e| f(&e["vcpuSeconds"]))
        .sum();
    assert!((compute - f(&item["vcpuSeconds"])).abs() < 1e-6);
    let last = r.headers["x-alcove-next-after"]
        .to_str()
        .unwrap()
        .to_owned();
    let again = api
        .get(&format!("/alcove/v1/usage/events?after={last}"))
        .await;
    assert!(
        again
            .json
            .as_str()
            .unwrap_or("")
            .lines()
            .all(|l| !l.contains("\"compute\"")),
        "no compute after the pause: {}",
        again.json
    );

    // Another team sees none of it, and may not ask for the admin's.
    let (_, key) = tenant(dir.path(), "tenant");
    let other = Api {
        key: Some(key),
        ..s.client()
    };
    let u = usage(&other, "groupBy=team").await;
    assert_eq!(u["items"], json!([]));
    let r = other.get("/alcove/v1/usage?team=admin").await;
    assert_error(&r, 403, "admin_key_required");
    let r = other.get("/alcove/v1/usage?team=*").await;
    assert_error(&r, 403, "admin_key_required");
    // The admin may ask for any team, or all.
    assert_eq!(usage(&api, "team=tenant").await["items"], json!([]));
    assert_eq!(
        usage(&api, "team=*&groupBy=team").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Bad queries are 400s that say what to write.
    for q in [
        "start=yesterday",
        "groupBy=planet",
        "start=2026-12-02T00:00:00Z&end=2026-12-01T00:00:00Z",
    ] {
        let r = api.get(&format!("/alcove/v1/usage?{q}")).await;
        assert_error(&r, 400, "invalid_query");
    }
    let r = api.get("/alcove/v1/usage/events?limit=0").await;
    assert_error(&r, 400, "invalid_query");

    // Prometheus: per-team gauges, one series per team.
    let r = api.get("/metrics").await;
    let text = r.json.as_str().unwrap();
    assert!(
        text.contains("alcove_team_sandboxes_paused{team=\"admin\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("alcove_team_sandboxes_running{team=\"tenant\"} 0"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("alcove_team_month_vcpu_seconds{team=\"admin\"}"))
        .unwrap();
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - f(&item["vcpuSeconds"])).abs() < 0.5, "{line}");
    s.stop().await;
}

/// A webhook receiver on 127.0.0.1: every request's headers and body; `fail_first` requests
/// are answered 500 (the server must retry).
async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<(http::HeaderMap, String)>>>) {
    use axum::routing::post;
    let got: Arc<Mutex<Vec<(http::HeaderMap, String)>>> = Arc::default();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: http::HeaderMap, body: String| {
            let (g, seen) = (g.clone(), seen.clone());
            async move {
                if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                g.lock().unwrap().push((headers, body));
                http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, got)
}

#[tokio::test]
async fn a_spend_cap_warns_by_a_signed_webhook_refuses_creates_and_pauses_what_runs() {
    use hmac::{KeyInit, Mac};
    let dir = tempfile::tempdir().unwrap();
    let (url, got) = receiver(1).await;
    let secret = "0123456789abcdef-test-secret";
    // A dollar per vCPU-second: a 2-vCPU sandbox passes a $0.50 cap in a quarter second.
    let prices = Prices {
        vcpu_second: 1.0,
        ..Prices::default()
    };
    let hook = Webhook {
        url,
        secret: secret.into(),
    };
    let s = start(
        dir.path(),
        Arc::new(FakeBackend::new()),
        metering(prices, Some(hook)),
    )
    .await;
    let api = s.client();
    let (tenant_id, tenant_key) = tenant(dir.path(), "tenant");
    let tenant_api = Api {
        key: Some(tenant_key),
        ..s.client()
    };

    // Bad limits are refused, each naming the field; only the admin may set them.
    for (body, code, status) in [
        (
            json!({"monthlySpendCapUsd": -1}),
            "invalid_request_body",
            400,
        ),
        (json!({"maxRunning": 1e12}), "invalid_request_body", 400),
        (json!({"warnAtPercent": [0]}), "invalid_request_body", 400),
        (json!({"onCap": "explode"}), "invalid_request_body", 400),
        (json!({"spendCap": 5}), "invalid_request_body", 400),
    ] {
        let r = api
            .put("/alcove/v1/teams/tenant/limits", body.clone())
            .await;
        assert_error(&r, status, code);
    }
    let r = tenant_api
        .put(
            "/alcove/v1/teams/tenant/limits",
            json!({"monthlySpendCapUsd": 1000}),
        )
        .await;
    assert_error(&r, 403, "admin_key_required");
    let r = api.get("/alcove/v1/teams/nobody/limits").await;
    assert_error(&r, 404, "team_not_found");
    // A tenant reads its own limits (the defaults so far), by name or id.
    let r = tenant_api
        .get(&format!("/alcove/v1/teams/{tenant_id}/limits"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["monthlySpendCapUsd"], Value::Null);
    assert_eq!(r.json["effective"]["maxRunning"], 100);

    let r = api
        .put(
            "/alcove/v1/teams/tenant/limits",
            json!({"monthlySpendCapUsd": 0.5, "warnAtPercent": [50, 100], "onCap": "pause", "maxRunning": 3}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["effective"]["maxRunning"], 3);
    assert_eq!(r.json["capped"], false);

    let r = tenant_api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 600}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();

    // At the cap: the running sandbox is paused and the next create refused, naming the cap.
    wait_for("the pause at the cap", async || {
        let r = tenant_api.get(&format!("/sandboxes/{id}")).await;
        r.json["state"] == "paused"
    })
    .await;
    let r = tenant_api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_error(&r, 402, "spend_cap_reached");
    let msg = r.json["message"].as_str().unwrap();
    assert!(
        msg.contains("$0.5000") && msg.contains("monthly spend cap"),
        "{msg}"
    );
    // A resume is new spend too.
    let r = tenant_api
        .post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}))
        .await;
    assert_error(&r, 402, "spend_cap_reached");
    // Other teams are not capped.
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);

    // Both warnings reached the webhook (the first attempt was refused and retried), signed.
    wait_for("two delivered warnings", async || {
        got.lock().unwrap().len() >= 2
    })
    .await;
    let got = got.lock().unwrap().clone();
    let mut percents = Vec::new();
    for (headers, body) in &got {
        let ts = headers["x-alcove-timestamp"].to_str().unwrap();
        let sig = headers["x-alcove-signature"].to_str().unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.{body}").as_bytes());
        assert_eq!(
            sig,
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "spend.warning");
        assert_eq!(v["teamName"], "tenant");
        assert_eq!(v["capUsd"], 0.5);
        percents.push(v["percent"].as_u64().unwrap());
    }
    percents.sort();
    assert_eq!(&percents[..2], &[50, 100]);
    let r = tenant_api.get("/alcove/v1/teams/tenant/limits").await;
    assert_eq!(r.json["capped"], true, "{:?}", r.json);
    assert!(f(&r.json["monthSpendUsd"]) >= 0.5);
    let notices = r.json["notices"].as_array().unwrap();
    assert_eq!(notices.len(), 2);
    assert!(
        notices.iter().all(|n| n["deliveredAt"].is_string()),
        "{notices:?}"
    );

    // Raising the cap lifts it at once.
    let r = api
        .put(
            "/alcove/v1/teams/tenant/limits",
            json!({"monthlySpendCapUsd": 1000}),
        )
        .await;
    assert_eq!(r.json["capped"], false);
    let r = tenant_api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    s.stop().await;
}

#[tokio::test]
async fn a_team_limit_replaces_the_servers_default_running_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_metered(
        dir.path(),
        Arc::new(FakeBackend::new()),
        Limits {
            max_concurrent_sandboxes: 5,
            ..fast_limits()
        },
        MeteringConfig::default(),
        |s| s,
    )
    .await;
    let api = s.client();
    let r = api
        .put("/alcove/v1/teams/admin/limits", json!({"maxRunning": 1}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(r.status, 201);
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_error(&r, 429, "sandbox_limit_reached");
    // Back to the server's default.
    let r = api.put("/alcove/v1/teams/admin/limits", json!({})).await;
    assert_eq!(r.json["effective"]["maxRunning"], 5);
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(r.status, 201);
    s.stop().await;
}

#[tokio::test]
async fn metrics_history_is_a_series_the_sdk_can_window() {
    let dir = tempfile::tempdir().unwrap();
    let m = MeteringConfig {
        sample_interval: Duration::from_millis(100),
        ..MeteringConfig::default()
    };
    let s = start(dir.path(), Arc::new(FakeBackend::new()), m).await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 600}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    wait_for("samples", async || {
        let r = api.get(&format!("/sandboxes/{id}/metrics")).await;
        r.json.as_array().is_some_and(|a| a.len() >= 5)
    })
    .await;
    let r = api
        .get(&format!(
            "/sandboxes/{id}/metrics?start={}&end={}",
            t0 - 5,
            t0 + 3600
        ))
        .await;
    assert_eq!(r.status, 200);
    let series = r.json.as_array().unwrap();
    assert!(series.len() >= 5, "{series:?}");
    let times: Vec<&str> = series
        .iter()
        .map(|m| m["timestamp"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {times:?}"
    );
    assert_eq!(series[0]["cpuCount"], 2);
    // After the kill the history stays readable; nothing new is added.
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = api.get(&format!("/sandboxes/{id}/metrics")).await;
    assert_eq!(after.status, 200);
    let n = after.json.as_array().unwrap().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = api.get(&format!("/sandboxes/{id}/metrics")).await;
    assert_eq!(again.json.as_array().unwrap().len(), n);
    s.stop().await;
}
