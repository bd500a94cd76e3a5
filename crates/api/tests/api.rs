//! The REST API and proxy over real HTTP, against a fake backend: lifecycle, filters,
//! pagination, error paths, limits, reaper, restart reconcile and sandbox traffic routing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use alcove_api::Limits;
use common::{FakeBackend, TestServer, assert_error, fake::CLOSED_PORT, fast_limits};
use serde_json::{Value, json};

async fn start() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;
    (dir, s)
}

#[tokio::test]
async fn first_start_writes_a_private_key_and_a_restart_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let key_file = dir.path().join("api-key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = s.key.clone();
    // E2B's format (the SDKs that check it want `e2b_` and hex).
    assert!(key.starts_with("e2b_"), "{key}");
    assert!(
        key[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let api = s.client();
    let created = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "metadata": {"k": "v"}}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let id = created.json["sandboxID"].as_str().unwrap().to_owned();
    drop(api);
    s.stop().await;

    let s = TestServer::start(dir.path(), backend, fast_limits()).await;
    assert_eq!(s.key, key, "the key file is not rewritten");
    let got = s.client().get(&format!("/sandboxes/{id}")).await;
    assert_eq!(got.status, 200, "reattached after restart: {:?}", got.json);
    assert_eq!(got.json["metadata"]["k"], "v");
    s.stop().await;
}

#[tokio::test]
async fn sandbox_lifecycle_as_the_sdk_drives_it() {
    let (_dir, s) = start().await;
    let api = s.client();

    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 60, "metadata": {"user": "alice"},
                   "envVars": {"SECRET": "hunter2"}, "autoPause": false, "autoPauseMemory": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    assert_eq!(r.json["templateID"], "tpl-base-0001");
    assert_eq!(r.json["alias"], "base");
    assert_eq!(r.json["envdVersion"], "0.2.0");
    assert!(r.json["envdAccessToken"].as_str().unwrap().len() >= 32);
    assert_eq!(r.json["domain"], format!("localhost:{}", s.addr.port()));
    assert_eq!(s.backend.env_of(&id).unwrap()["SECRET"], "hunter2");

    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.json["state"], "running");
    assert_eq!(d.json["cpuCount"], 2);
    assert_eq!(d.json["memoryMB"], 512);
    assert_eq!(d.json["lifecycle"]["onTimeout"], "kill");
    let end1 = d.json["endAt"].as_str().unwrap().to_owned();

    assert_eq!(
        api.post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 600}))
            .await
            .status,
        204
    );
    let end2 = api.get(&format!("/sandboxes/{id}")).await.json["endAt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(end2 > end1, "{end2} > {end1}");
    assert_eq!(
        api.post(
            &format!("/sandboxes/{id}/refreshes"),
            json!({"duration": 10})
        )
        .await
        .status,
        204,
        "refresh never shortens"
    );
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.json["endAt"],
        end2.as_str()
    );

    let c = api
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 30}),
        )
        .await;
    assert_eq!(c.status, 200, "{:?}", c.json);
    assert_eq!(c.json["envdAccessToken"], r.json["envdAccessToken"]);

    let m = api.get(&format!("/sandboxes/{id}/metrics")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json[0]["cpuCount"], 2);
    assert!(m.json[0]["memTotal"].as_u64().unwrap() > 0);
    // A window long before the sandbox existed holds nothing; a malformed one is a 400.
    let ranged = api
        .get(&format!("/sandboxes/{id}/metrics?start=1&end=2"))
        .await;
    assert_eq!(ranged.json, json!([]));
    assert_error(
        &api.get(&format!("/sandboxes/{id}/metrics?start=yesterday"))
            .await,
        400,
        "invalid_query",
    );
    assert_error(
        &api.get(&format!("/sandboxes/{id}/metrics?start=20&end=10"))
            .await,
        400,
        "invalid_query",
    );
    let mm = api
        .get(&format!("/sandboxes/metrics?sandbox_ids={id}"))
        .await;
    assert_eq!(mm.json["sandboxes"][&id]["cpuCount"], 2);

    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);
    assert_error(
        &api.get(&format!("/sandboxes/{id}")).await,
        404,
        "sandbox_not_found",
    );
    assert_error(
        &api.delete(&format!("/sandboxes/{id}")).await,
        404,
        "sandbox_not_found",
    );
    assert!(s.backend.vms.lock().unwrap().is_empty());

    let logs = api.get(&format!("/sandboxes/{id}/logs")).await;
    assert_eq!(logs.status, 200);
    let lines: Vec<_> = logs.json["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].contains("killed by API request"));
    let v2 = api
        .get(&format!(
            "/v2/sandboxes/{id}/logs?direction=backward&limit=1"
        ))
        .await;
    assert_eq!(v2.json["logs"].as_array().unwrap().len(), 1);

    let rec = api.get(&format!("/alcove/v1/sandboxes/{id}")).await;
    assert_eq!(rec.json["state"], "killed");
    assert_eq!(rec.json["endReason"], "killed by API request");
    assert_eq!(rec.json["envVarNames"], json!(["SECRET"]));
    assert!(
        !rec.json.to_string().contains("hunter2"),
        "env values never stored"
    );
    s.stop().await;
}

#[tokio::test]
async fn list_filters_by_metadata_and_state_and_pages() {
    let (_dir, s) = start().await;
    let api = s.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = api
            .post(
                "/sandboxes",
                json!({"templateID": "base", "secure": true,
                       "metadata": {"idx": i.to_string(), "group": if i % 2 == 0 {"even"} else {"odd"},
                                    "odd key&=": "a value/with?chars"}}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.json);
        ids.push(r.json["sandboxID"].as_str().unwrap().to_owned());
    }
    api.delete(&format!("/sandboxes/{}", ids[4])).await;

    let all = api.get("/v2/sandboxes").await;
    assert_eq!(all.json.as_array().unwrap().len(), 4);
    assert!(all.headers.get("x-next-token").is_none());

    // As the Python SDK encodes {"group": "even"}: urlencode({quote(k): quote(v)}), then the
    // query encoding.
    let even = api.get("/v2/sandboxes?metadata=group%3Deven").await;
    let got: Vec<_> = even
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metadata"]["idx"].clone())
        .collect();
    // Newest first when no order is named, as E2B lists.
    assert_eq!(got, [json!("2"), json!("0")]);
    let odd_key = api
        .get("/v2/sandboxes?metadata=odd%2520key%2526%253D%3Da%2520value%252Fwith%253Fchars%26group%3Dodd")
        .await;
    assert_eq!(
        odd_key.json.as_array().unwrap().len(),
        2,
        "{:?}",
        odd_key.json
    );
    let v1 = api.get("/sandboxes?metadata=group%3Dodd").await;
    assert_eq!(v1.json.as_array().unwrap().len(), 2);

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v2/sandboxes?limit=3&order=desc&nextToken={t}"),
            None => "/v2/sandboxes?limit=3&order=desc".into(),
        };
        let page = api.get(&path).await;
        assert_eq!(page.status, 200);
        seen.extend(
            page.json
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["sandboxID"].as_str().unwrap().to_owned()),
        );
        match page.headers.get("x-next-token") {
            Some(t) => token = Some(t.to_str().unwrap().to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<_> = ids[..4].to_vec();
    expected.reverse();
    assert_eq!(seen, expected);

    let killed = api.get("/v2/sandboxes?state=killed").await;
    assert_eq!(
        killed.json.as_array().unwrap().len(),
        1,
        "extension: terminal states listable"
    );
    assert_error(
        &api.get("/v2/sandboxes?state=zombie").await,
        400,
        "invalid_query",
    );
    assert_error(
        &api.get("/v2/sandboxes?nextToken=garbage").await,
        400,
        "invalid_query",
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_input_gets_structured_4xx_and_the_server_keeps_serving() {
    let (_dir, s) = start().await;
    let mut api = s.client();

    assert_error(
        &api.post("/v2/sandboxes", json!({"templateID": "nope"}))
            .await,
        404,
        "template_not_found",
    );
    assert_error(
        &api.send("POST", "/v2/sandboxes", &[], b"{\"templateID\": ".to_vec())
            .await,
        400,
        "invalid_request_body",
    );
    assert_error(
        &api.post("/v2/sandboxes", json!({"templateID": "base", "tmeout": 5}))
            .await,
        400,
        "invalid_request_body",
    );
    assert_error(
        &api.post("/v2/sandboxes", json!({"templateID": "base", "timeout": 0}))
            .await,
        400,
        "timeout_out_of_range",
    );
    assert_error(
        &api.post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 10_000_000}),
        )
        .await,
        400,
        "timeout_out_of_range",
    );
    assert_error(
        &api.post(
            "/v2/sandboxes",
            json!({"templateID": "base", "autoResume": {"enabled": "yes"}}),
        )
        .await,
        400,
        "invalid_request_body",
    );
    assert_error(
        &api.post(
            "/v2/sandboxes",
            json!({"templateID": "base", "metadata": {"a": 1}}),
        )
        .await,
        400,
        "invalid_request_body",
    );
    let huge = format!(
        "{{\"templateID\":\"base\",\"metadata\":{{\"x\":\"{}\"}}}}",
        "a".repeat(2 << 20)
    );
    assert_error(
        &api.send("POST", "/v2/sandboxes", &[], huge.into_bytes())
            .await,
        413,
        "request_too_large",
    );
    assert_error(&api.get("/no/such/route").await, 404, "route_not_found");
    assert_error(
        &api.send("PATCH", "/sandboxes", &[], vec![]).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &api.get("/sandboxes/..%2F..%2Fetc%2Fpasswd").await,
        404,
        "sandbox_not_found",
    );
    assert_error(
        &api.post("/sandboxes/nope/timeout", json!({"timeout": 5}))
            .await,
        404,
        "sandbox_not_found",
    );
    assert_error(
        &api.post("/sandboxes/nope/pause", json!({})).await,
        404,
        "sandbox_not_found",
    );

    let good_key = api.key.take();
    assert_error(&api.get("/v2/sandboxes").await, 401, "unauthenticated");
    for i in 0..1000 {
        api.key = Some(format!("alcove_bad{i}"));
        let r = api.get("/v2/sandboxes").await;
        assert_eq!(r.status, 401);
    }
    api.key = Some("x".repeat(10_000));
    assert_error(&api.get("/v2/sandboxes").await, 401, "unauthenticated");
    api.key = good_key;
    let ok = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "code-interpreter-v1"}),
        )
        .await;
    assert_eq!(
        ok.status, 201,
        "still serving after bad input: {:?}",
        ok.json
    );

    let prom = api.get("/metrics").await;
    let text = prom.json.as_str().unwrap();
    // Counters are process-wide and tests run in parallel: at least this test's failures.
    let failures: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("alcove_auth_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(failures >= 1002, "{text}");
    assert!(text.contains("alcove_sandboxes_running 1"));
    s.stop().await;
}

#[tokio::test]
async fn limits_create_failures_and_the_reaper() {
    let dir = tempfile::tempdir().unwrap();
    let limits = alcove_api::Limits {
        max_concurrent_sandboxes: 2,
        ..fast_limits()
    };
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), limits).await;
    let api = s.client();
    let a = api
        .post("/v2/sandboxes", json!({"templateID": "base", "timeout": 1}))
        .await;
    assert_eq!(a.status, 201);
    assert_eq!(
        api.post("/v2/sandboxes", json!({"templateID": "base"}))
            .await
            .status,
        201
    );
    assert_error(
        &api.post("/v2/sandboxes", json!({"templateID": "base"}))
            .await,
        429,
        "sandbox_limit_reached",
    );

    let id = a.json["sandboxID"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_error(
        &api.get(&format!("/sandboxes/{id}")).await,
        404,
        "sandbox_not_found",
    );
    let rec = api.get(&format!("/alcove/v1/sandboxes/{id}")).await;
    assert_eq!(rec.json["state"], "killed");
    assert!(
        rec.json["endReason"]
            .as_str()
            .unwrap()
            .starts_with("timeout")
    );
    assert!(!s.backend.vms.lock().unwrap().contains_key(&id));

    s.backend.fail_creates.store(true, Ordering::SeqCst);
    let f = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_error(&f, 500, "sandbox_create_failed");
    assert!(
        !f.json["message"].as_str().unwrap().contains("qemu"),
        "5xx hides internals"
    );
    let failed = api.get("/v2/sandboxes?state=killed").await;
    let reasons: Vec<_> =
        futures::future::join_all(
            failed.json.as_array().unwrap().iter().map(|s| {
                let id = s["sandboxID"].as_str().unwrap().to_owned();
                let api = &api;
                async move {
                    api.get(&format!("/alcove/v1/sandboxes/{id}")).await.json["endReason"].clone()
                }
            }),
        )
        .await;
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("create failed")),
        "{reasons:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn vanished_vms_are_lost_with_a_reason_live_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    let id = |r: &common::Reply| r.json["sandboxID"].as_str().unwrap().to_owned();
    let a = id(&api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await);
    let b = id(&api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await);

    backend.crash(&a, "qemu exited: signal 9 (killed from outside)");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rec = api.get(&format!("/alcove/v1/sandboxes/{a}")).await;
    assert_eq!(rec.json["state"], "lost");
    assert_eq!(
        rec.json["endReason"],
        "lost while running: qemu exited: signal 9 (killed from outside)"
    );
    drop(api);
    s.stop().await;

    // While the server is down the host reboots: the backend forgets b, and a stray VM appears.
    backend.vms.lock().unwrap().remove(&b);
    backend
        .vms
        .lock()
        .unwrap()
        .insert("stray".into(), fake_create("stray"));
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    let rec = api.get(&format!("/alcove/v1/sandboxes/{b}")).await;
    assert_eq!(rec.json["state"], "lost");
    assert_eq!(
        rec.json["endReason"],
        "lost at server restart: the backend has no VM for it"
    );
    assert!(
        !backend.vms.lock().unwrap().contains_key("stray"),
        "unknown VMs are killed"
    );
    let hist: Vec<_> = rec.json["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].clone())
        .collect();
    assert_eq!(hist, [json!("creating"), json!("running"), json!("lost")]);
    s.stop().await;
}

fn fake_create(id: &str) -> alcove_api::CreateSandbox {
    alcove_api::CreateSandbox {
        sandbox_id: id.into(),
        template_id: "tpl-base-0001".into(),
        env_vars: Default::default(),
        metadata: Default::default(),
        envd_access_token: None,
        allow_internet_access: None,
        network: Default::default(),
        cpu_count: 1,
        memory_mb: 1,
        snapshot_id: None,
        volume_mounts: Vec::new(),
    }
}

#[tokio::test]
async fn sandbox_traffic_is_routed_and_the_access_token_enforced() {
    let (_dir, s) = start().await;
    let api = s.client();
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let token = r.json["envdAccessToken"].as_str().unwrap().to_owned();
    let mut sbx = s.client();
    sbx.key = None;

    let hdr = |port: &'static str, tok: Option<&str>| {
        let mut h = vec![
            ("E2b-Sandbox-Id", id.clone()),
            ("E2b-Sandbox-Port", port.to_string()),
        ];
        if let Some(t) = tok {
            h.push(("X-Access-Token", t.to_owned()));
        }
        h
    };
    let send = |h: Vec<(&'static str, String)>, path: &'static str| {
        let sbx = &sbx;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            sbx.send("POST", path, &h, b"hello".to_vec()).await
        }
    };

    let ok = send(hdr("49983", Some(&token)), "/process.Process/Start?x=1").await;
    assert_eq!(ok.status, 200, "{:?}", ok.json);
    assert_eq!(ok.json["port"], 49983);
    assert_eq!(ok.json["uri"], "/process.Process/Start?x=1");
    assert_eq!(ok.json["bodyLen"], 5);
    assert_eq!(
        ok.json["routingHeaders"], false,
        "routing headers are stripped"
    );

    assert_error(
        &send(hdr("49983", None), "/files").await,
        401,
        "invalid_access_token",
    );
    assert_error(
        &send(hdr("49983", Some("wrong")), "/files").await,
        401,
        "invalid_access_token",
    );
    let health = sbx
        .send("GET", "/health", &[("E2b-Sandbox-Id", id.as_str())], vec![])
        .await;
    assert_eq!(health.status, 200, "envd health is open");
    let ci = send(hdr("49999", Some(&token)), "/execute").await;
    assert_eq!(
        ci.json["port"], 49999,
        "the code interpreter takes the same token"
    );
    let user = send(hdr("8000", None), "/").await;
    assert_eq!(user.json["port"], 8000, "user ports need no envd token");

    let closed = send(hdr("1234", None), "/").await;
    assert_error(&closed, 502, "port_not_open");
    assert!(
        closed.json["message"]
            .as_str()
            .unwrap()
            .contains("port is not open")
    );
    assert_eq!(CLOSED_PORT, 1234);

    let host = format!("8080-{id}.localhost:{}", s.addr.port());
    let by_host = sbx
        .send("GET", "/index.html", &[("host", host.as_str())], vec![])
        .await;
    assert_eq!(by_host.json["port"], 8080, "{:?}", by_host.json);

    api.delete(&format!("/sandboxes/{id}")).await;
    let gone = send(hdr("49983", Some(&token)), "/files").await;
    assert_error(&gone, 502, "sandbox_not_running");
    assert!(
        gone.json["message"]
            .as_str()
            .unwrap()
            .contains("was not found")
    );
    assert_error(
        &sbx.send("GET", "/", &[("E2b-Sandbox-Id", "nosuch")], vec![])
            .await,
        502,
        "sandbox_not_running",
    );
    assert_error(
        &sbx.send("GET", "/", &[("E2b-Sandbox-Id", "a/b")], vec![])
            .await,
        400,
        "invalid_sandbox_route",
    );
    s.stop().await;
}

#[tokio::test]
async fn templates_and_aliases() {
    let (_dir, s) = start().await;
    let api = s.client();
    let t = api.get("/templates").await;
    assert_eq!(t.status, 200);
    let list = t.json.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["aliases"], json!(["base"]));
    assert_eq!(list[0]["buildStatus"], "ready");
    assert!(
        uuid_like(list[1]["buildID"].as_str().unwrap()),
        "non-UUID build ids are mapped"
    );
    assert_eq!(api.get("/default-templates").await.json, t.json);
    let a = api.get("/templates/aliases/code-interpreter-v1").await;
    assert_eq!(a.json["templateID"], "tpl-ci-0001");
    let one = api.get("/templates/base").await;
    assert_eq!(one.json["templateID"], "tpl-base-0001");
    assert_eq!(one.json["builds"][0]["status"], "ready");
    assert_error(
        &api.get("/templates/aliases/nope").await,
        404,
        "template_not_found",
    );
    s.stop().await;
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn traffic_tokens_guard_ports_when_public_traffic_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"allowPublicTraffic": false}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let envd = r.json["envdAccessToken"].as_str().unwrap().to_owned();
    let traffic = r.json["trafficAccessToken"].as_str().unwrap().to_owned();
    assert!(traffic.len() >= 32);
    assert_ne!(traffic, envd);

    let mut sbx = s.client();
    sbx.key = None;
    let get = |port: &'static str, tok: Option<&'static str>| {
        let (sbx, id) = (&sbx, id.clone());
        async move {
            let mut h = vec![("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", port.into())];
            if let Some(t) = tok {
                h.push(("e2b-traffic-access-token", t.into()));
            }
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            sbx.send("GET", "/", &h, vec![]).await
        }
    };
    let denied = get("8000", None).await;
    assert_error(&denied, 403, "invalid_traffic_access_token");
    assert!(
        denied.json["message"]
            .as_str()
            .unwrap()
            .contains("e2b-traffic-access-token")
    );
    assert_error(
        &get("8000", Some("wrong")).await,
        403,
        "invalid_traffic_access_token",
    );
    let tok: &'static str = Box::leak(traffic.clone().into_boxed_str());
    let ok = get("8000", Some(tok)).await;
    assert_eq!(ok.status, 200, "{:?}", ok.json);
    assert_eq!(
        ok.json["trafficHeader"], false,
        "the token is not forwarded"
    );
    // The host form is guarded the same way.
    let host = format!("8000-{id}.localhost:{}", s.addr.port());
    let by_host = sbx
        .send("GET", "/", &[("host", host.as_str())], vec![])
        .await;
    assert_error(&by_host, 403, "invalid_traffic_access_token");
    // The agent port keeps its own rule: the envd token, no traffic token needed.
    let envd_ok = sbx
        .send(
            "GET",
            "/envs",
            &[
                ("E2b-Sandbox-Id", id.as_str()),
                ("X-Access-Token", envd.as_str()),
            ],
            vec![],
        )
        .await;
    assert_eq!(envd_ok.status, 200, "{:?}", envd_ok.json);

    // Connect hands the token out again, and it survives a restart (it lives in the store).
    let c = api
        .post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 60}))
        .await;
    assert_eq!(c.json["trafficAccessToken"], traffic.as_str());
    drop(api);
    s.stop().await;
    let s = TestServer::start(dir.path(), backend, fast_limits()).await;
    let mut sbx = s.client();
    sbx.key = None;
    let h = [
        ("E2b-Sandbox-Id", id.as_str()),
        ("E2b-Sandbox-Port", "8000"),
    ];
    assert_error(
        &sbx.send("GET", "/", &h, vec![]).await,
        403,
        "invalid_traffic_access_token",
    );
    let h = [
        ("E2b-Sandbox-Id", id.as_str()),
        ("E2b-Sandbox-Port", "8000"),
        ("e2b-traffic-access-token", traffic.as_str()),
    ];
    assert_eq!(sbx.send("GET", "/", &h, vec![]).await.status, 200);

    // Public sandboxes get no token; egress rules are checked at create; what is not supported
    // is refused, not ignored.
    let api = s.client();
    let open = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"allowPublicTraffic": true}}),
        )
        .await;
    assert_eq!(open.status, 201);
    assert!(open.json["trafficAccessToken"].is_null());
    let rules = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"]}}),
        )
        .await;
    assert_eq!(rules.status, 201, "{:?}", rules.json);
    let bad = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"denyOut": ["example.com"]}}),
        )
        .await;
    assert_error(&bad, 400, "invalid_request_body");
    assert!(
        bad.json["message"].as_str().unwrap().contains("allowOut"),
        "{:?}",
        bad.json
    );
    let proxy = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"egressProxy": {"address": "p:1080"}}}),
        )
        .await;
    assert_error(&proxy, 400, "unsupported_feature");
    s.stop().await;
}

#[tokio::test]
async fn upgrades_pass_through_the_proxy_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, s) = start().await;
    let api = s.client();
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: 8000-{id}.localhost:{}\r\nConnection: Upgrade\r\n\
         Upgrade: echo\r\n\r\n",
        s.addr.port()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "head: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    conn.write_all(b"ping through the upgrade").await.unwrap();
    let mut got = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping through the upgrade");
    s.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_makes_one_sandbox_per_body() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    let body = json!({"templateID": "base", "metadata": {"run": "1"}});
    let create = |key: &'static str, body: Value| {
        let api = s.client();
        async move {
            api.send(
                "POST",
                "/v2/sandboxes",
                &[("Idempotency-Key", key)],
                body.to_string().into_bytes(),
            )
            .await
        }
    };

    // Two requests with one key while the first is still creating: one sandbox, both get it.
    *backend.create_delay.lock().unwrap() = Duration::from_millis(600);
    let (a, b) = tokio::join!(create("run-1", body.clone()), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        create("run-1", body.clone()).await
    });
    *backend.create_delay.lock().unwrap() = Duration::ZERO;
    assert_eq!(a.status, 201, "{:?}", a.json);
    assert_eq!(b.status, 201, "{:?}", b.json);
    let id = a.json["sandboxID"].as_str().unwrap().to_owned();
    assert_eq!(b.json["sandboxID"], a.json["sandboxID"]);
    assert_eq!(b.json["envdAccessToken"], a.json["envdAccessToken"]);
    let listed = api.get("/v2/sandboxes").await;
    assert_eq!(
        listed.json.as_array().unwrap().len(),
        1,
        "{:?}",
        listed.json
    );

    // Later, the same again; another body is refused; another key is another sandbox.
    let again = create("run-1", body.clone()).await;
    assert_eq!(again.json["sandboxID"], id.as_str());
    let other = create("run-1", json!({"templateID": "base"})).await;
    assert_error(&other, 422, "idempotency_key_reused");
    let fresh = create("run-2", body.clone()).await;
    assert_eq!(fresh.status, 201);
    assert_ne!(fresh.json["sandboxID"], id.as_str());

    // Once its sandbox is killed, the key says so instead of making another.
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);
    let ended = create("run-1", body.clone()).await;
    assert_error(&ended, 409, "idempotent_sandbox_ended");
    assert!(ended.json["message"].as_str().unwrap().contains(&id));

    // A failed create frees its key: the retry creates.
    let bad = create("run-3", json!({"templateID": "no-such-template"})).await;
    assert_eq!(bad.status, 404);
    let retried = create("run-3", json!({"templateID": "base"})).await;
    assert_eq!(retried.status, 201, "{:?}", retried.json);

    let invalid = create("has space", body.clone()).await;
    assert_error(&invalid, 400, "invalid_idempotency_key");
    s.stop().await;
}

#[tokio::test]
async fn limits_tell_the_sdk_not_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_concurrent_sandboxes: 1,
        ..fast_limits()
    };
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), limits).await;
    let api = s.client();
    let first = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(first.status, 201);
    assert!(first.headers.get("should-retry").is_none());
    let over = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_error(&over, 429, "sandbox_limit_reached");
    assert_eq!(over.headers["should-retry"], "false");
    s.stop().await;
}

#[tokio::test]
async fn a_timeout_of_zero_ends_the_sandbox_now() {
    let (_dir, s) = start().await;
    let api = s.client();
    let kill = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    let pause = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "autoPause": true}),
        )
        .await;
    for r in [&kill, &pause] {
        let id = r.json["sandboxID"].as_str().unwrap();
        let t = api
            .post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 0}))
            .await;
        assert_eq!(t.status, 204, "{:?}", t.json);
    }
    let (k, p) = (
        kill.json["sandboxID"].as_str().unwrap(),
        pause.json["sandboxID"].as_str().unwrap(),
    );
    let mut ended = (false, false);
    for _ in 0..50 {
        ended.0 = api.get(&format!("/sandboxes/{k}")).await.status == 404;
        ended.1 = api.get(&format!("/sandboxes/{p}")).await.json["state"] == "paused";
        if ended == (true, true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ended, (true, true), "killed, paused");
    // Below zero is still refused.
    let neg = api
        .post(&format!("/sandboxes/{p}/timeout"), json!({"timeout": -1}))
        .await;
    assert_error(&neg, 400, "timeout_out_of_range");
    s.stop().await;
}
