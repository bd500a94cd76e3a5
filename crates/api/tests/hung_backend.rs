//! A backend that never answers: every call about a hung sandbox stays pending. The API's
//! deadlines must cut those calls off, give the caller a structured timeout error, and keep the
//! reaper and the liveness check working for every other sandbox.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alcove_api::{BackendDeadlines, Limits};
use common::{FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::json;

/// Longer than the reaper needs for a healthy sandbox, so a reaper that waited on the hung
/// call first would miss the checks below.
const DEADLINE: Duration = Duration::from_secs(4);

async fn state(api: &common::Api, id: &str) -> String {
    let rec = api.get(&format!("/alcove/v1/sandboxes/{id}")).await;
    rec.json["state"].as_str().unwrap_or_default().to_owned()
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_hung_backend_call_times_out_and_the_reaper_and_liveness_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let limits = Limits {
        backend: BackendDeadlines::all(DEADLINE),
        ..fast_limits()
    };
    let s = TestServer::start(dir.path(), backend.clone(), limits).await;
    let api = s.client();
    let create = |timeout: Option<u64>| {
        let body = match timeout {
            Some(t) => json!({"templateID": "base", "timeout": t}),
            None => json!({"templateID": "base"}),
        };
        let api = &api;
        async move {
            let r = api.post("/v2/sandboxes", body).await;
            assert_eq!(r.status, 201, "{:?}", r.json);
            r.json["sandboxID"].as_str().unwrap().to_owned()
        }
    };

    // `hung` expires first and its kill never answers; `healthy` expires half a second later.
    let hung = create(Some(1)).await;
    backend.hang(&hung);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let healthy = create(Some(1)).await;
    let healthy_created = Instant::now();
    // Two VMs die underneath the server; asking about `silent` hangs too.
    let crashed = create(None).await;
    let silent = create(None).await;
    backend.hang(&silent);
    backend.crash(&crashed, "qemu exited: signal 9");
    backend.crash(&silent, "qemu exited: signal 11");

    // The reaper kills `healthy` at its end time while the kill of `hung` is still pending, and
    // the liveness check marks `crashed` lost while the status of `silent` is.
    assert!(
        eventually(Duration::from_secs(3), || async {
            state(&api, &healthy).await == "killed" && state(&api, &crashed).await == "lost"
        })
        .await,
        "healthy: {}, crashed: {}",
        state(&api, &healthy).await,
        state(&api, &crashed).await
    );
    assert!(healthy_created.elapsed() < DEADLINE);
    assert_eq!(state(&api, &hung).await, "running");
    assert_eq!(state(&api, &silent).await, "running");

    // A request on the hung sandbox gets a structured timeout at the deadline, not a hang.
    let t0 = Instant::now();
    let r = api.delete(&format!("/sandboxes/{hung}")).await;
    let took = t0.elapsed();
    assert_error(&r, 504, "backend_timeout");
    let msg = r.json["message"].as_str().unwrap();
    assert!(msg.contains(&hung) && msg.contains("Retry"), "{msg}");
    assert!(
        took >= DEADLINE && took < DEADLINE + Duration::from_secs(2),
        "{took:?}"
    );
    // The server keeps serving meanwhile, and says what timed out.
    let prom = api.get("/metrics").await;
    let text = prom.json.as_str().unwrap();
    assert!(
        text.contains("alcove_backend_timeouts_total{op=\"kill\"}"),
        "{text}"
    );

    // The status of `silent` is cut off at its deadline too: it is lost with that reason.
    assert!(
        eventually(DEADLINE, || async { state(&api, &silent).await == "lost" }).await,
        "silent: {}",
        state(&api, &silent).await
    );
    let rec = api.get(&format!("/alcove/v1/sandboxes/{silent}")).await;
    let reason = rec.json["endReason"].as_str().unwrap();
    assert!(reason.contains("could not report"), "{reason}");

    // Once the backend answers again the reaper finishes the job.
    backend.unhang(&hung);
    assert!(
        eventually(DEADLINE + Duration::from_secs(2), || async {
            state(&api, &hung).await == "killed"
        })
        .await
    );
    s.stop().await;
}
