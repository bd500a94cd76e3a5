//! Run traces and the audit log through the REST API over the fake backend and real SQLite:
//! API calls with their key, state changes, a process start (with `traceparent` passed on as
//! `TRACEPARENT`) and file transfers appear in order in a sandbox's events, paged and followed
//! as server-sent events; the export verifies and shows an edited record.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alcove_api::MeteringConfig;
use common::{Api, FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::{Value, json};

async fn start(dir: &std::path::Path) -> TestServer {
    TestServer::start_metered(
        dir,
        Arc::new(FakeBackend::new()),
        fast_limits(),
        MeteringConfig::default(),
        |s| s,
    )
    .await
}

/// Polls the sandbox's events until `pred` holds (events are written by a background task).
async fn events_until(api: &Api, id: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = api.get(&format!("/alcove/v1/sandboxes/{id}/events")).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        let ev = r.json.as_array().unwrap().clone();
        if pred(&ev) {
            return ev;
        }
        assert!(Instant::now() < deadline, "events never matched: {ev:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn connect_json_envelope(v: &Value) -> Vec<u8> {
    let payload = v.to_string().into_bytes();
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

#[tokio::test]
async fn a_sandboxs_run_trace_lists_calls_state_processes_and_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 600}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let token = r.json["envdAccessToken"].as_str().unwrap().to_owned();
    assert_eq!(api.get(&format!("/sandboxes/{id}")).await.status, 200);

    // A process start through the proxy, as the SDK sends it (Connect streaming JSON), with
    // a W3C traceparent.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let start_req = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "echo hi"],
        "envs": {"SECRET_NAME": "v"}, "cwd": "/home/user"}});
    let mut sbx = s.client();
    sbx.key = None;
    let r = sbx
        .send(
            "POST",
            "/process.Process/Start",
            &[
                ("E2b-Sandbox-Id", &id),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", &token),
                ("content-type", "application/connect+json"),
                ("authorization", "Basic cm9vdDo="),
                ("traceparent", tp),
            ],
            connect_json_envelope(&start_req),
        )
        .await;
    assert_eq!(r.status, 200);
    // The agent received TRACEPARENT among the envs (the fake echoes the body it got).
    let got = r.json["body"].as_str().unwrap();
    assert!(got.contains(&format!("\"TRACEPARENT\":\"{tp}\"")), "{got}");
    assert!(got.contains("\"SECRET_NAME\":\"v\""), "{got}");
    // An upload through /files.
    let r = sbx
        .send(
            "POST",
            "/files?path=/home/user/a.txt&username=user",
            &[
                ("E2b-Sandbox-Id", &id),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", &token),
            ],
            vec![b'x'; 1000],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);

    let ev = events_until(&api, &id, |ev| {
        ev.iter()
            .any(|e| e["kind"] == "state" && e["action"] == "running -> killed")
            && ev.iter().any(|e| e["kind"] == "file")
            && ev
                .iter()
                .any(|e| e["kind"] == "api" && e["action"] == "DELETE /sandboxes/{sandboxID}")
    })
    .await;
    let kinds: Vec<String> = ev
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap(),
                e["action"].as_str().unwrap()
            )
        })
        .collect();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("{k} not in {kinds:#?}"))
    };
    assert!(pos("state -> creating") < pos("state creating -> running"));
    assert!(pos("state creating -> running") < pos("process start"));
    assert!(pos("process start") < pos("file write"));
    assert!(pos("file write") < pos("state running -> killed"));
    let p = &ev[pos("process start")];
    assert_eq!(p["target"], "/bin/bash -c echo hi");
    assert_eq!(p["detail"]["user"], "root");
    assert_eq!(p["detail"]["cwd"], "/home/user");
    assert_eq!(p["detail"]["envNames"], json!(["SECRET_NAME"]));
    assert_eq!(p["detail"]["traceparent"], tp);
    assert!(
        !p.to_string().contains("\"v\""),
        "env values are never recorded: {p}"
    );
    let f = &ev[pos("file write")];
    assert_eq!(f["target"], "/home/user/a.txt");
    assert_eq!(f["detail"]["bytes"], 1000);
    let call = &ev[pos("api GET /sandboxes/{sandboxID}")];
    assert_eq!(call["result"], "200");
    let actor = call["actor"].as_str().unwrap();
    assert!(!actor.is_empty() && actor != "system", "{actor}");

    // Paging with after.
    let third = ev[2]["seq"].as_i64().unwrap();
    let r = api
        .get(&format!(
            "/alcove/v1/sandboxes/{id}/events?after={third}&limit=2"
        ))
        .await;
    let page = r.json.as_array().unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["seq"], ev[3]["seq"]);
    assert_error(
        &api.get(&format!("/alcove/v1/sandboxes/{id}/events?limit=0"))
            .await,
        400,
        "invalid_query",
    );
    // Another team cannot read it.
    let (_, other) = common::tenant(dir.path(), "tenant");
    let tenant = Api {
        key: Some(other),
        ..s.client()
    };
    assert_error(
        &tenant
            .get(&format!("/alcove/v1/sandboxes/{id}/events"))
            .await,
        404,
        "sandbox_not_found",
    );

    // The export: JSONL, each team's chain verifies; an edited record breaks it.
    let r = api.get("/alcove/v1/audit?limit=10000").await;
    assert_eq!(r.status, 200);
    let lines: Vec<alcove_api::models::AuditEventView> = r
        .json
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= ev.len());
    let records: Vec<_> = lines.iter().map(alcove_api::service::record_of).collect();
    alcove_store::verify_chain(&records).unwrap();
    let mut edited = records.clone();
    let i = edited.len() / 2;
    edited[i].event.result = "999".into();
    assert!(alcove_store::verify_chain(&edited).is_err());
    // A tenant exports only its own (nothing yet), and not the admin's.
    let r = tenant.get("/alcove/v1/audit").await;
    assert_eq!(r.status, 200);
    assert!(
        r.json
            .as_str()
            .unwrap_or("")
            .lines()
            .all(|l| !l.contains(&id)),
        "{:?}",
        r.json
    );
    assert_error(
        &tenant.get("/alcove/v1/audit?team=admin").await,
        403,
        "admin_key_required",
    );
    s.stop().await;
}

#[tokio::test]
async fn following_a_sandboxs_events_streams_them_as_they_happen() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 600}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    // Open the stream, then act: the events arrive on it, and it ends after the kill.
    let url = format!(
        "http://{}/alcove/v1/sandboxes/{id}/events?follow=true",
        s.addr
    );
    let key = s.key.clone();
    let reader = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = http::Request::get(url)
            .header("X-API-KEY", key)
            .body(http_body_util::Full::default())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .expect("the stream ends after the sandbox does")
            .unwrap()
            .to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await
            .status,
        204
    );
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);
    let text = reader.await.unwrap();
    let datas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let actions: Vec<&str> = datas
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    let i = actions
        .iter()
        .position(|a| *a == "running -> paused")
        .expect("pause streamed");
    let j = actions
        .iter()
        .position(|a| *a == "paused -> killed")
        .expect("kill streamed");
    assert!(i < j, "{actions:?}");
    assert!(text.contains("id: "), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn spans_reach_an_otlp_receiver_under_the_callers_trace() {
    use prost::Message;
    use std::sync::Mutex;
    // An OTLP/HTTP receiver: every span it is sent.
    let got: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| {
            let g = g.clone();
            async move {
                let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
                    .expect("an OTLP protobuf body");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        g.lock().unwrap().extend(ss.spans);
                    }
                }
                http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_metered(
        dir.path(),
        Arc::new(FakeBackend::new()),
        fast_limits(),
        MeteringConfig {
            otlp_endpoint: Some(endpoint),
            ..MeteringConfig::default()
        },
        |s| s,
    )
    .await;
    let api = s.client();
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let token = r.json["envdAccessToken"].as_str().unwrap().to_owned();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (api_parent, proc_parent) = ("00f067aa0ba902b7", "1111222233334444");
    let r = api
        .send(
            "GET",
            &format!("/sandboxes/{id}"),
            &[("traceparent", &format!("00-{trace}-{api_parent}-01"))],
            vec![],
        )
        .await;
    assert_eq!(r.status, 200);
    let mut sbx = s.client();
    sbx.key = None;
    let start_req = json!({"process": {"cmd": "/bin/true"}});
    let r = sbx
        .send(
            "POST",
            "/process.Process/Start",
            &[
                ("E2b-Sandbox-Id", &id),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", &token),
                ("content-type", "application/connect+json"),
                ("traceparent", &format!("00-{trace}-{proc_parent}-01")),
            ],
            connect_json_envelope(&start_req),
        )
        .await;
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = got.lock().unwrap().clone();
        let ours: Vec<_> = spans
            .iter()
            .filter(|s| hex::encode(&s.trace_id) == trace)
            .collect();
        let api_span = ours
            .iter()
            .find(|s| s.name == "api GET /sandboxes/{sandboxID}");
        let proc_span = ours.iter().find(|s| s.name == "process start");
        if let (Some(a), Some(p)) = (api_span, proc_span) {
            assert_eq!(hex::encode(&a.parent_span_id), api_parent);
            assert_eq!(hex::encode(&p.parent_span_id), proc_parent);
            assert!(p.attributes.iter().any(|kv| kv.key == "alcove.sandbox_id"));
            // Spans without a caller's trace have their own.
            assert!(spans.iter().any(|s| s.name == "api POST /v2/sandboxes"
                && hex::encode(&s.trace_id) != trace
                && s.parent_span_id.is_empty()));
            break;
        }
        assert!(Instant::now() < deadline, "spans: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}
