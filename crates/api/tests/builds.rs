//! Template builds through E2B's `Template` API, end to end over HTTP against the fake backend
//! (the node's builder microVMs are tested in crates/node; the SDK suites drive both).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Api, FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::{Value, json};

const HASH: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// Requests a build of `name`; answers (templateID, buildID).
async fn request(api: &Api, name: &str, tags: Value) -> (String, String) {
    let r = api
        .post("/v3/templates", json!({"name": name, "tags": tags}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    (
        r.json["templateID"].as_str().unwrap().to_owned(),
        r.json["buildID"].as_str().unwrap().to_owned(),
    )
}

/// Uploads `bytes` under `hash` through the signed URL, with no API key.
async fn upload(server: &TestServer, api: &Api, tid: &str, hash: &str, bytes: Vec<u8>) -> u16 {
    let r = api.get(&format!("/templates/{tid}/files/{hash}")).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let url = r.json["url"].as_str().unwrap().to_owned();
    let anon = Api {
        key: None,
        ..server.client()
    };
    let path = url.strip_prefix(&anon.base).expect("URL on this server");
    anon.send("PUT", path, &[], bytes).await.status
}

async fn wait_finished(api: &Api, tid: &str, bid: &str) -> Value {
    for _ in 0..200 {
        let r = api
            .get(&format!("/templates/{tid}/builds/{bid}/status"))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        if matches!(r.json["status"].as_str(), Some("ready" | "error")) {
            return r.json;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("build {bid} did not finish");
}

#[tokio::test]
async fn a_build_uploads_runs_and_its_template_creates_sandboxes_by_name_and_tag() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let server = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = server.client();

    let (tid, bid) = request(&api, "my-app", json!(["v1"])).await;
    let r = api.get(&format!("/templates/{tid}/files/{HASH}")).await;
    assert_eq!(r.json["present"], false);
    assert_eq!(
        upload(&server, &api, &tid, HASH, b"tar bytes".to_vec()).await,
        200
    );
    let r = api.get(&format!("/templates/{tid}/files/{HASH}")).await;
    assert_eq!(
        r.json["present"], true,
        "content-addressed: found the second time"
    );

    let body = json!({
        "fromTemplate": "base",
        "steps": [
            {"type": "COPY", "args": ["app", "/app/", "user", "0755"], "filesHash": HASH, "force": false},
            {"type": "RUN", "args": ["pip install six", "root"], "force": false},
            {"type": "ENV", "args": ["MODE", "prod"], "force": false},
            {"type": "WORKDIR", "args": ["/app"], "force": false},
            {"type": "USER", "args": ["user"], "force": false}
        ],
        "startCmd": "python3 -m http.server 8000",
        "readyCmd": "[ -n \"$(ss -Htuln sport = :8000)\" ]",
        "force": false
    });
    let r = api
        .post(&format!("/v2/templates/{tid}/builds/{bid}"), body.clone())
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    // A build runs once.
    let again = api
        .post(&format!("/v2/templates/{tid}/builds/{bid}"), body)
        .await;
    assert_error(&again, 409, "build_already_started");

    let status = wait_finished(&api, &tid, &bid).await;
    assert_eq!(status["status"], "ready", "{status:?}");
    let logs = status["logEntries"].as_array().unwrap();
    assert!(logs.iter().any(|l| l["step"] == "2"), "{logs:?}");
    let spec = backend.builds.lock().unwrap()[0].clone();
    assert_eq!(spec.steps.len(), 5);
    assert_eq!(
        spec.vcpus, 2,
        "the parent's resources when none are asked for"
    );
    assert!(spec.files_dir.join(HASH).is_file());

    // Logs page from an offset.
    let all = status["logEntries"].as_array().unwrap().len();
    let r = api
        .get(&format!(
            "/templates/{tid}/builds/{bid}/status?logsOffset=2&limit=1"
        ))
        .await;
    assert_eq!(
        r.json["logEntries"].as_array().unwrap().len(),
        1.min(all - 2)
    );

    // Creates by name, by id, and by name:tag reach the backend with the build's key.
    for name in ["my-app", tid.as_str(), "my-app:v1", "my-app:default"] {
        let r = api.post("/sandboxes", json!({"templateID": name})).await;
        if name == "my-app:default" {
            // Tags asked for replace the default one.
            assert_error(&r, 404, "tag_not_found");
            continue;
        }
        assert_eq!(r.status, 201, "{name}: {:?}", r.json);
        assert_eq!(r.json["templateID"], tid);
        let sid = r.json["sandboxID"].as_str().unwrap();
        let vm = backend.vms.lock().unwrap()[sid].clone();
        assert_eq!(
            vm.template_id.len(),
            16,
            "a built template's key: {}",
            vm.template_id
        );
    }

    // Listed with its build.
    let r = api.get("/templates").await;
    let mine = r
        .json
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == tid)
        .cloned()
        .unwrap();
    assert_eq!(mine["buildStatus"], "ready");
    assert_eq!(mine["aliases"], json!(["my-app"]));
    let r = api.get(&format!("/templates/{tid}/tags")).await;
    assert_eq!(r.json[0]["tag"], "v1");
    assert_eq!(r.json[0]["buildID"], bid);

    // Another team neither sees nor uses nor rebuilds it.
    let (_, other) = common::tenant(dir.path(), "other");
    let api2 = Api {
        key: Some(other),
        ..server.client()
    };
    let r = api2
        .post("/sandboxes", json!({"templateID": "my-app"}))
        .await;
    assert_error(&r, 404, "template_not_found");
    let r = api2.get("/templates/aliases/my-app").await;
    assert_error(&r, 403, "template_forbidden");
    let r = api2.post("/v3/templates", json!({"name": "my-app"})).await;
    assert_error(&r, 409, "template_name_taken");
    let r = api2
        .get(&format!("/templates/{tid}/builds/{bid}/status"))
        .await;
    assert_error(&r, 403, "template_forbidden");
    let r = api.post("/v3/templates", json!({"name": "base"})).await;
    assert_error(&r, 409, "template_name_taken");
    // A host template's tags: refused, saying so (not that it "cannot be rebuilt").
    let r = api
        .send(
            "DELETE",
            "/templates/tags",
            &[],
            json!({"name": "base", "tags": ["x"]})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_error(&r, 409, "host_template_read_only");
    let m = r.json["message"].as_str().unwrap();
    assert!(m.contains("untag") && !m.contains("rebuilt"), "{m}");
    let r = api
        .post("/templates/tags", json!({"target": "base", "tags": ["v1"]}))
        .await;
    assert_error(&r, 409, "host_template_read_only");
    // Made public, other teams create from it (and still can't change it).
    let r = api
        .send(
            "PATCH",
            &format!("/v2/templates/{tid}"),
            &[],
            json!({"public": true}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["names"], json!(["my-app"]));
    let r = api2
        .post("/sandboxes", json!({"templateID": "my-app"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let r = api2
        .send(
            "PATCH",
            &format!("/templates/{tid}"),
            &[],
            json!({"public": false}).to_string().into_bytes(),
        )
        .await;
    assert_error(&r, 403, "template_forbidden");

    // A rebuild of the name reuses the template; the first build, superseded but tagged v1,
    // stays until its tag goes.
    let (tid2, bid2) = request(&api, "my-app", json!([])).await;
    assert_eq!(tid2, tid);
    let r = api
        .post(
            &format!("/v2/templates/{tid}/builds/{bid2}"),
            json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["echo 2"]}]}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    assert_eq!(wait_finished(&api, &tid, &bid2).await["status"], "ready");
    assert!(backend.deleted_templates.lock().unwrap().is_empty());
    let r = api
        .send(
            "DELETE",
            "/templates/tags",
            &[],
            json!({"name": "my-app", "tags": ["v1"]})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r.status, 204, "{:?}", r.json);
    assert_eq!(backend.deleted_templates.lock().unwrap().len(), 1);

    // Deleting the template: no more creates; its files are handed back.
    let r = api.delete(&format!("/templates/{tid}")).await;
    assert_eq!(r.status, 204, "{:?}", r.json);
    let r = api
        .post("/sandboxes", json!({"templateID": "my-app"}))
        .await;
    assert_error(&r, 404, "template_not_found");
    assert_eq!(backend.deleted_templates.lock().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_builds_get_clear_errors_and_failures_name_their_step() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let mut limits = fast_limits();
    limits.max_upload_bytes = 1000;
    let server = TestServer::start(dir.path(), backend.clone(), limits).await;
    let api = server.client();
    let (tid, bid) = request(&api, "bad", json!([])).await;
    let path = format!("/v2/templates/{tid}/builds/{bid}");

    let r = api
        .post(
            &path,
            json!({"fromTemplate": "base", "steps": [{"type": "HEALTHCHECK", "args": ["x"]}]}),
        )
        .await;
    assert_error(&r, 400, "invalid_request_body");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("step 1 has type 'HEALTHCHECK'")
    );
    let r = api
        .post(
            &path,
            json!({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/a"], "filesHash": HASH}]}),
        )
        .await;
    assert_error(&r, 400, "invalid_request_body");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("never uploaded"),
        "{:?}",
        r.json
    );
    let r = api.post(&path, json!({"steps": []})).await;
    assert_error(&r, 400, "invalid_request_body");
    let r = api
        .post(&path, json!({"fromTemplate": "no-such", "steps": []}))
        .await;
    assert_error(&r, 404, "template_not_found");
    let r = api
        .post(
            &format!("/v2/templates/{tid}/builds/00000000-0000-4000-8000-000000000000"),
            json!({"fromTemplate": "base"}),
        )
        .await;
    assert_error(&r, 404, "build_not_found");

    // Uploads: over the cap, and a URL used twice or tampered with.
    let r = api.get(&format!("/templates/{tid}/files/{HASH}")).await;
    let url = r.json["url"].as_str().unwrap().to_owned();
    let anon = Api {
        key: None,
        ..server.client()
    };
    let p = url.strip_prefix(&anon.base).unwrap().to_owned();
    // Declared too large: refused before reading, and the URL is not used up.
    let r = anon.send("PUT", &p, &[], vec![0u8; 2000]).await;
    assert_error(&r, 413, "upload_too_large");
    // Streamed past the cap without a declared size.
    let r2 = api.get(&format!("/templates/{tid}/files/{HASH}")).await;
    let p2 = r2.json["url"]
        .as_str()
        .unwrap()
        .strip_prefix(&anon.base)
        .unwrap()
        .to_owned();
    let chunked = {
        use http_body_util::BodyExt;
        let chunks = futures::stream::iter((0..4).map(|_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![
                0u8;
                500
            ])))
        }));
        let body = http_body_util::StreamBody::new(chunks).boxed();
        let client = hyper_util::client::legacy::Client::builder(
            hyper_util::rt::TokioExecutor::new(),
        )
        .build_http::<http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>>(
        );
        let resp = client
            .request(
                http::Request::put(format!("{}{p2}", anon.base))
                    .body(body)
                    .unwrap(),
            )
            .await
            .unwrap();
        resp.status().as_u16()
    };
    assert_eq!(chunked, 413);
    let r = anon.send("PUT", &p2, &[], vec![0u8; 10]).await;
    assert_error(&r, 403, "upload_url_rejected");
    let r = anon.send("PUT", &p, &[], vec![0u8; 10]).await;
    assert_eq!(
        r.status, 200,
        "the first URL was not used by the refused upload: {:?}",
        r.json
    );
    let p = p2;
    let tampered = p.replace(HASH, &"f".repeat(64));
    let r = anon.send("PUT", &tampered, &[], vec![0u8; 10]).await;
    assert_error(&r, 403, "upload_url_rejected");
    // The refused uploads left nothing behind: only the 10 accepted bytes.
    let stored: Vec<_> = std::fs::read_dir(dir.path().join("template-files"))
        .unwrap()
        .flatten()
        .flat_map(|team| std::fs::read_dir(team.path()).unwrap().flatten())
        .map(|f| {
            (
                f.file_name().into_string().unwrap(),
                f.metadata().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(stored, [(HASH.to_string(), 10)]);

    // A failing step: error status, the step's index, its log lines.
    let r = api
        .post(
            &path,
            json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["echo ok"]}, {"type": "RUN", "args": ["exit 3"]}]}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    let s = wait_finished(&api, &tid, &bid).await;
    assert_eq!(s["status"], "error");
    assert_eq!(s["reason"]["step"], "2");
    assert!(s["reason"]["message"].as_str().unwrap().contains("exit 3"));
    assert!(!s["reason"]["logEntries"].as_array().unwrap().is_empty());
    let r = api.post("/sandboxes", json!({"templateID": "bad"})).await;
    assert_error(&r, 400, "template_not_ready");
    server.stop().await;
}

#[tokio::test]
async fn a_second_build_of_a_name_waits_and_a_restart_interrupts_unfinished_builds() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    *backend.build_delay.lock().unwrap() = Duration::from_millis(600);
    let server = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = server.client();
    let (tid, b1) = request(&api, "queued", json!([])).await;
    let (_, b2) = request(&api, "queued", json!([])).await;
    for b in [&b1, &b2] {
        let r = api
            .post(
                &format!("/v2/templates/{tid}/builds/{b}"),
                json!({"fromTemplate": "base"}),
            )
            .await;
        assert_eq!(r.status, 202);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s1 = api
        .get(&format!("/templates/{tid}/builds/{b1}/status"))
        .await;
    let s2 = api
        .get(&format!("/templates/{tid}/builds/{b2}/status"))
        .await;
    assert_eq!(s1.json["status"], "building");
    assert_eq!(
        s2.json["status"], "waiting",
        "the second build of a name waits"
    );
    server.stop().await;

    // A new server on the same data: nothing half-built is served.
    let server = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = server.client();
    for b in [&b1, &b2] {
        let s = api
            .get(&format!("/templates/{tid}/builds/{b}/status"))
            .await;
        assert_eq!(s.json["status"], "error", "{:?}", s.json);
        assert!(
            s.json["reason"]["message"]
                .as_str()
                .unwrap()
                .contains("interrupted")
        );
    }
    let r = api
        .post("/sandboxes", json!({"templateID": "queued"}))
        .await;
    assert_error(&r, 400, "template_not_ready");
    server.stop().await;
}
