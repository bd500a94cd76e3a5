//! Pause/resume, autoPause/autoResume, snapshots, forks and the checkpoint tree through the
//! REST API and proxy, against the fake backend: status codes and bodies as the SDKs expect,
//! lifetimes, restarts, and the failure paths. The real-VM behaviour is covered by the SDK suites.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::json;

async fn start() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;
    (dir, s)
}

/// `memory: false` on pause keeps the disk alone; on connect or resume it reboots from the disk
/// (the SDKs' `mode="filesystem"` and `on_resume="reboot"`); absent, the backend resumes from
/// what the pause kept.
#[tokio::test]
async fn filesystem_only_pause_and_reboot_reach_the_backend() {
    use alcove_api::Keep;
    let (_dir, s) = start().await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 60}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let pause_path = format!("/sandboxes/{id}/pause");
    let pause = |body| api.post(&pause_path, body);
    assert_eq!(pause(json!({"memory": false})).await.status, 204);
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.json["state"],
        "paused"
    );
    let c = api
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 60}),
        )
        .await;
    assert_eq!(c.status, 201, "{}", c.json);
    assert_eq!(pause(json!({})).await.status, 204);
    let c = api
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 60, "memory": false}),
        )
        .await;
    assert_eq!(c.status, 201, "{}", c.json);
    // On a running sandbox, `memory: false` changes nothing: it is not rebooted.
    let c = api
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 60, "memory": false}),
        )
        .await;
    assert_eq!(c.status, 200, "{}", c.json);
    // A filesystem-only snapshot; sandboxes are made from it as from any snapshot.
    let snap = api
        .post(
            &format!("/sandboxes/{id}/snapshots"),
            json!({"memory": false}),
        )
        .await;
    assert_eq!(snap.status, 201, "{}", snap.json);
    let child = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": snap.json["snapshotID"], "timeout": 60}),
        )
        .await;
    assert_eq!(child.status, 201, "{}", child.json);
    let calls = s.backend.persist_calls.lock().unwrap().clone();
    let id2 = id.clone();
    assert_eq!(
        calls,
        vec![
            (id2.clone(), "pause", Keep::DiskOnly),
            (id2.clone(), "resume", Keep::Memory),
            (id2.clone(), "pause", Keep::Memory),
            (id2.clone(), "resume", Keep::DiskOnly),
            (id2, "snapshot", Keep::DiskOnly),
        ]
    );
}

#[tokio::test]
async fn pause_resume_and_connect_answer_like_e2b() {
    let (dir, s) = start().await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 60}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();

    assert_eq!(
        api.post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await
            .status,
        204
    );
    assert!(s.backend.paused.lock().unwrap().contains(&id));
    assert_error(
        &api.post(&format!("/sandboxes/{id}/pause"), json!({})).await,
        409,
        "sandbox_already_paused",
    );
    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.json["state"], "paused");
    let listed = api.get("/v2/sandboxes?state=paused").await;
    assert_eq!(listed.json[0]["sandboxID"], id.as_str());
    // Traffic to a paused sandbox without autoResume: the SDK's "not running" error.
    let t = api
        .send(
            "GET",
            "/health",
            &[("e2b-sandbox-id", &id), ("e2b-sandbox-port", "8000")],
            vec![],
        )
        .await;
    assert_error(&t, 502, "sandbox_not_running");
    assert_error(
        &api.post(&format!("/sandboxes/{id}/pause"), json!({"memory": false}))
            .await,
        409,
        "sandbox_already_paused",
    );

    // A paused sandbox survives a server restart.
    let backend = s.backend.clone();
    drop(api);
    s.stop().await;
    let s = TestServer::start(dir.path(), backend, fast_limits()).await;
    let api = s.client();
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.json["state"],
        "paused"
    );

    // connect resumes (201) with a fresh lifetime; connecting again is a 200.
    let c = api
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 120}),
        )
        .await;
    assert_eq!(c.status, 201, "{:?}", c.json);
    assert_eq!(c.json["sandboxID"], id.as_str());
    assert!(c.json["envdAccessToken"].as_str().is_some());
    assert!(!s.backend.paused.lock().unwrap().contains(&id));
    let c = api
        .post(&format!("/v2/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(c.status, 200);
    // /resume on a running sandbox is a conflict; after a pause it is a 201.
    assert_error(
        &api.post(&format!("/sandboxes/{id}/resume"), json!({}))
            .await,
        409,
        "sandbox_already_running",
    );
    api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    let r = api
        .post(&format!("/sandboxes/{id}/resume"), json!({"timeout": 30}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);

    let hist = api.get(&format!("/alcove/v1/sandboxes/{id}")).await.json["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(
        hist,
        [
            "creating", "running", "paused", "running", "paused", "running"
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn a_corrupt_pause_state_is_a_clear_error_and_the_sandbox_stays_paused() {
    let (_dir, s) = start().await;
    let api = s.client();
    let id = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await
        .json["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    s.backend.corrupt.lock().unwrap().insert(id.clone());
    let r = api
        .post(&format!("/v2/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_error(&r, 500, "snapshot_corrupt");
    let msg = r.json["message"].as_str().unwrap();
    assert!(
        msg.contains("checksum") && msg.contains("left as it is"),
        "{msg}"
    );
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.json["state"],
        "paused"
    );
    // Killing it still works.
    assert_eq!(api.delete(&format!("/sandboxes/{id}")).await.status, 204);
    s.stop().await;
}

/// `autoPauseMemory: false`: the timeout pause keeps the disk alone; it cannot go with
/// `autoResume` (traffic cannot wake a sandbox that must cold-boot).
#[tokio::test]
async fn a_timeout_pause_can_keep_only_the_disk() {
    use alcove_api::Keep;
    let (_dir, s) = start().await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 1, "autoPause": true,
                   "autoPauseMemory": false, "autoResume": {"enabled": true}}),
        )
        .await;
    assert_error(&r, 400, "invalid_request_body");
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 1, "autoPause": true, "autoPauseMemory": false}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.json["state"], "paused", "{:?}", d.json);
    assert_eq!(
        s.backend.persist_calls.lock().unwrap().clone(),
        vec![(id.clone(), "pause", Keep::DiskOnly)]
    );
}

#[tokio::test]
async fn auto_pause_at_timeout_and_auto_resume_on_traffic() {
    let (_dir, s) = start().await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 1, "autoPause": true,
                   "autoResume": {"enabled": true}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.json["lifecycle"]["onTimeout"], "pause");
    assert_eq!(d.json["lifecycle"]["autoResume"], true);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.json["state"], "paused", "{:?}", d.json);
    // It stays paused (paused sandboxes never expire).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.json["state"],
        "paused"
    );
    // Traffic resumes it and is served.
    let t = api
        .send(
            "GET",
            "/x",
            &[("e2b-sandbox-id", &id), ("e2b-sandbox-port", "8000")],
            vec![],
        )
        .await;
    assert_eq!(t.status, 200, "{:?}", t.json);
    assert_eq!(t.json["sandbox"], id.as_str());
    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.json["state"], "running");
    let rec = api.get(&format!("/alcove/v1/sandboxes/{id}")).await;
    let reasons: Vec<_> = rec.json["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("autoPause")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("autoResume")),
        "{reasons:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn snapshots_restore_any_number_of_times_list_delete_and_form_a_tree() {
    let (_dir, s) = start().await;
    let api = s.client();
    let id = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "envVars": {"A": "1"}}),
        )
        .await
        .json["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let snap = api
        .post(&format!("/sandboxes/{id}/snapshots"), json!({"name": "cp"}))
        .await;
    assert_eq!(snap.status, 201, "{:?}", snap.json);
    let snap_id = snap.json["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(snap.json["names"], json!(["cp"]));
    // The sandbox goes on running.
    assert_eq!(
        api.get(&format!("/sandboxes/{id}")).await.json["state"],
        "running"
    );
    // Three sandboxes from it, by id and by name.
    let mut children = Vec::new();
    for t in [snap_id.as_str(), "cp", snap_id.as_str()] {
        let c = api.post("/v2/sandboxes", json!({"templateID": t})).await;
        assert_eq!(c.status, 201, "{:?}", c.json);
        let cid = c.json["sandboxID"].as_str().unwrap().to_owned();
        assert_eq!(s.backend.env_of(&cid).unwrap()["A"], "1", "inherits env");
        children.push(cid);
    }
    // A snapshot of a child hangs under the first.
    let grand = api
        .post(&format!("/sandboxes/{}/snapshots", children[0]), json!({}))
        .await;
    let grand_id = grand.json["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(grand.json["names"], json!([grand_id.clone()]));

    let list = api.get("/snapshots").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json.as_array().unwrap().len(), 2);
    let mine = api.get(&format!("/snapshots?sandboxID={id}")).await;
    assert_eq!(mine.json, json!([{"snapshotID": snap_id, "names": ["cp"]}]));
    let page = api.get("/snapshots?limit=1").await;
    assert_eq!(page.json.as_array().unwrap().len(), 1);
    assert!(page.headers.contains_key("x-next-token"));

    let tree = api.get("/alcove/v1/snapshots/tree").await;
    assert_eq!(tree.status, 200);
    let root = &tree.json["roots"][0];
    assert_eq!(root["snapshotID"], snap_id.as_str());
    assert_eq!(root["children"][0]["snapshotID"], grand_id.as_str());
    let on_root: Vec<_> = root["sandboxes"].as_array().unwrap().to_vec();
    // The source sandbox now descends from its snapshot, and so do the two children that
    // were not snapshotted again.
    assert_eq!(on_root.len(), 3, "{root:?}");

    // Deleting the parent keeps its children running and its place in the tree.
    assert_eq!(
        api.delete(&format!("/templates/{snap_id}")).await.status,
        204
    );
    assert_error(
        &api.delete(&format!("/templates/{snap_id}")).await,
        404,
        "snapshot_not_found",
    );
    assert_error(
        &api.post("/v2/sandboxes", json!({"templateID": snap_id}))
            .await,
        404,
        "template_not_found",
    );
    for c in &children {
        assert_eq!(
            api.get(&format!("/sandboxes/{c}")).await.json["state"],
            "running"
        );
    }
    let tree = api.get("/alcove/v1/snapshots/tree").await;
    assert_eq!(tree.json["roots"][0]["deleted"], true);
    assert_eq!(
        tree.json["roots"][0]["children"][0]["snapshotID"],
        grand_id.as_str()
    );
    assert_error(
        &api.delete("/templates/base").await,
        400,
        "unsupported_feature",
    );
    s.stop().await;
}

#[tokio::test]
async fn fork_makes_independent_children_and_validates_count() {
    let (_dir, s) = start().await;
    let api = s.client();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"allowPublicTraffic": false},
                   "metadata": {"k": "v"}}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let f = api
        .post(&format!("/sandboxes/{id}/fork"), json!({"count": 5}))
        .await;
    assert_eq!(f.status, 201, "{:?}", f.json);
    let kids: Vec<_> = f.json.as_array().unwrap().to_vec();
    assert_eq!(kids.len(), 5);
    let mut ids = std::collections::HashSet::new();
    let mut tokens = std::collections::HashSet::new();
    for k in &kids {
        let sbx = &k["sandbox"];
        assert!(k.get("error").is_none(), "{k:?}");
        ids.insert(sbx["sandboxID"].as_str().unwrap().to_owned());
        tokens.insert(sbx["envdAccessToken"].as_str().unwrap().to_owned());
        assert!(sbx["trafficAccessToken"].as_str().is_some(), "{sbx:?}");
        assert_ne!(sbx["trafficAccessToken"], r.json["trafficAccessToken"]);
    }
    assert_eq!(ids.len(), 5);
    assert_eq!(tokens.len(), 5);
    assert!(!ids.contains(&id));
    let d = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(d.json["state"], "running", "the parent goes on");
    let child = kids[0]["sandbox"]["sandboxID"].as_str().unwrap();
    assert_eq!(
        api.get(&format!("/sandboxes/{child}")).await.json["metadata"]["k"],
        "v"
    );
    // The fork's checkpoint is not a listed snapshot, but it is in the tree (deleted, with
    // its children on it).
    assert_eq!(api.get("/snapshots").await.json, json!([]));
    let tree = api.get("/alcove/v1/snapshots/tree").await;
    assert_eq!(tree.json["roots"][0]["kind"], "fork");
    assert_eq!(tree.json["roots"][0]["deleted"], true);
    assert_eq!(
        tree.json["roots"][0]["sandboxes"].as_array().unwrap().len(),
        6
    );

    let ext = api
        .post(
            &format!("/alcove/v1/sandboxes/{id}/fork"),
            json!({"count": 2}),
        )
        .await;
    assert_eq!(ext.status, 201, "{:?}", ext.json);
    assert_eq!(ext.json["children"].as_array().unwrap().len(), 2);
    assert!(ext.json["snapshotID"].as_str().is_some());
    for bad in [0, 101] {
        assert_error(
            &api.post(&format!("/sandboxes/{id}/fork"), json!({"count": bad}))
                .await,
            400,
            "invalid_request_body",
        );
    }
    assert_error(
        &api.post("/sandboxes/nope/fork", json!({})).await,
        404,
        "sandbox_not_found",
    );
    api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    assert_error(
        &api.post(&format!("/sandboxes/{id}/fork"), json!({})).await,
        409,
        "sandbox_paused",
    );
    s.stop().await;
}

#[tokio::test]
async fn a_fork_that_cannot_read_the_parents_rules_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    let rules = json!({"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"]});
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "network": rules.clone()}),
        )
        .await;
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    backend
        .network_unreadable
        .lock()
        .unwrap()
        .insert(id.clone());
    for path in [
        format!("/sandboxes/{id}/fork"),
        format!("/alcove/v1/sandboxes/{id}/fork"),
    ] {
        let f = api.post(&path, json!({"count": 2})).await;
        assert_error(&f, 503, "fork_network_unknown");
        assert!(
            f.json["message"].as_str().unwrap().contains("Retry"),
            "{:?}",
            f.json
        );
    }
    assert_eq!(backend.vms.lock().unwrap().len(), 1, "no child was started");
    assert!(
        backend.snapshots.lock().unwrap().is_empty(),
        "no snapshot taken"
    );
    // Once readable, the children get exactly the parent's rules.
    backend.network_unreadable.lock().unwrap().clear();
    let f = api
        .post(&format!("/sandboxes/{id}/fork"), json!({"count": 2}))
        .await;
    assert_eq!(f.status, 201, "{:?}", f.json);
    let parent = backend.vms.lock().unwrap()[&id].network.clone();
    assert!(!parent.allow_out.is_empty());
    for k in f.json.as_array().unwrap() {
        let child = k["sandbox"]["sandboxID"].as_str().unwrap();
        assert_eq!(backend.vms.lock().unwrap()[child].network, parent);
    }
    s.stop().await;
}

#[tokio::test]
async fn a_restart_takes_the_backends_word_on_paused_or_running() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    let mk = || async {
        api.post("/v2/sandboxes", json!({"templateID": "base"}))
            .await
            .json["sandboxID"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (a, b) = (mk().await, mk().await);
    api.post(&format!("/sandboxes/{b}/pause"), json!({})).await;
    drop(api);
    s.stop().await;
    // While the server is down: a finished pause of a, a finished resume of b.
    backend.paused.lock().unwrap().insert(a.clone());
    backend.paused.lock().unwrap().remove(&b);
    let s = TestServer::start(dir.path(), backend, fast_limits()).await;
    let api = s.client();
    assert_eq!(
        api.get(&format!("/sandboxes/{a}")).await.json["state"],
        "paused"
    );
    assert_eq!(
        api.get(&format!("/sandboxes/{b}")).await.json["state"],
        "running"
    );
    s.stop().await;
}
