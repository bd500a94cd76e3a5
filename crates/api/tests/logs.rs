//! What a server logs at the default level (info): one line per request with its method, route,
//! status, latency, request id and sandbox id; every sandbox state change with its reason; the
//! cause of a 5xx once, inside the request's span, and never in the response.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::json;

/// Everything the subscriber writes, for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn requests_state_changes_and_internal_causes_are_logged_once() {
    let out = Captured::default();
    let writer = out.clone();
    tracing_subscriber::fmt()
        .with_env_filter("alcove_api=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;
    let api = s.client();
    let r = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(r.status, 201);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();

    // The fake backend has no per-sandbox network: an internal error whose cause stays here.
    let r = api
        .send(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            &[],
            json!({"allowOut": ["1.1.1.1"]}).to_string().into_bytes(),
        )
        .await;
    assert_error(&r, 500, "internal_server_error");
    let body = r.json.to_string();
    assert!(!body.contains("update_network"), "{body}");
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);
    s.stop().await;

    let lines = out.lines();
    let with = |needles: &[&str]| -> Vec<&String> {
        lines
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect()
    };
    // One line per request, at info, with everything needed to find it again.
    let created = with(&[
        " INFO ",
        "request{",
        "method=POST",
        "route=/v2/sandboxes",
        &format!("sandbox_id={id}"),
        "status=201",
        "latency_ms=",
    ]);
    assert_eq!(created.len(), 1, "{lines:#?}");
    assert!(created[0].contains("request_id="));
    let killed = with(&[
        "route=/sandboxes/{sandboxID}",
        "method=DELETE",
        "status=204",
    ]);
    assert_eq!(killed.len(), 1, "{lines:#?}");
    assert!(killed[0].contains(&format!("sandbox_id={id}")));

    // The 5xx: its cause once, in the request's span, on the request's own line.
    let failed = with(&["update_network"]);
    assert_eq!(failed.len(), 1, "{lines:#?}");
    let line = failed[0];
    for part in [
        " ERROR ",
        "request_id=",
        "route=/sandboxes/{sandboxID}/network",
        "status=500",
        "error_code=\"internal_server_error\"",
        "the backend's update_network call failed: network update is not supported",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    assert!(line.contains(&format!("sandbox_id={id}")), "{line}");

    // Every state change, with its reason.
    for (state, reason) in [("running", "started"), ("killed", "killed by API request")] {
        let changed = with(&["sandbox state changed", &format!("state={state}"), reason]);
        assert_eq!(changed.len(), 1, "{state}: {lines:#?}");
    }
}
