//! Team quotas (running, paused, snapshots, bytes stored), the paused-sandbox retention and
//! the atomicity of capacity checks, through the REST API against the fake backend: racing
//! requests pass exactly the limit, refusals are 429s that name the quota, its use and what
//! to do.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use alcove_api::Limits;
use common::{Api, FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::json;

async fn start(limits: Limits) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), limits).await;
    (dir, s)
}

async fn create(api: &Api, body: serde_json::Value) -> String {
    let r = api.post("/v2/sandboxes", body).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    r.json["sandboxID"].as_str().unwrap().to_owned()
}

async fn create_base(api: &Api) -> String {
    create(api, json!({"templateID": "base", "timeout": 600})).await
}

async fn pause(api: &Api, id: &str) -> u16 {
    api.post(&format!("/sandboxes/{id}/pause"), json!({}))
        .await
        .status
}

fn statuses(replies: &[common::Reply]) -> (usize, usize) {
    let ok = replies.iter().filter(|r| r.status < 300).count();
    let refused = replies.iter().filter(|r| r.status == 429).count();
    (ok, refused)
}

#[tokio::test]
async fn racing_creates_pass_exactly_the_running_limit() {
    let (_dir, s) = start(Limits {
        max_concurrent_sandboxes: 3,
        ..fast_limits()
    })
    .await;
    *s.backend.create_delay.lock().unwrap() = Duration::from_millis(100);
    let api = s.client();
    let replies = futures::future::join_all(
        (0..10).map(|_| api.post("/v2/sandboxes", json!({"templateID": "base"}))),
    )
    .await;
    assert_eq!(statuses(&replies), (3, 7));
    let refused = replies.iter().find(|r| r.status == 429).unwrap();
    assert_error(refused, 429, "sandbox_limit_reached");
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("--team-max-running")
    );
    s.stop().await;
}

#[tokio::test]
async fn racing_resumes_and_creates_pass_exactly_the_running_limit() {
    let (_dir, s) = start(Limits {
        max_concurrent_sandboxes: 2,
        ..fast_limits()
    })
    .await;
    let api = s.client();
    let mut paused = Vec::new();
    for _ in 0..2 {
        paused.push(create_base(&api).await);
    }
    for id in &paused {
        assert_eq!(pause(&api, id).await, 204);
    }
    let _running = create_base(&api).await;
    // One slot is free; two resumes (slow, so they overlap) and a create race for it.
    *s.backend.resume_delay.lock().unwrap() = Duration::from_millis(300);
    let paths: Vec<String> = paused
        .iter()
        .map(|id| format!("/sandboxes/{id}/resume"))
        .collect();
    let resumes = paths.iter().map(|p| api.post(p, json!({"timeout": 60})));
    // The create arrives while the resumes are still restoring.
    let late_create = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        api.post("/v2/sandboxes", json!({"templateID": "base"}))
            .await
    };
    let (mut replies, created) =
        futures::future::join(futures::future::join_all(resumes), late_create).await;
    replies.push(created);
    assert_eq!(
        statuses(&replies),
        (1, 2),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let running = api.get("/v2/sandboxes?state=running").await;
    assert_eq!(running.json.as_array().unwrap().len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_fork_counts_all_its_children_up_front() {
    let (_dir, s) = start(Limits {
        max_concurrent_sandboxes: 3,
        ..fast_limits()
    })
    .await;
    let api = s.client();
    let id = create_base(&api).await;
    let r = api
        .post(&format!("/sandboxes/{id}/fork"), json!({"count": 3}))
        .await;
    assert_error(&r, 429, "sandbox_limit_reached");
    // Refused whole: no snapshot was taken, no child exists.
    assert!(s.backend.snapshots.lock().unwrap().is_empty());
    assert_eq!(s.backend.vms.lock().unwrap().len(), 1);
    let r = api
        .post(&format!("/sandboxes/{id}/fork"), json!({"count": 2}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let children = r.json.as_array().unwrap();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| c["sandbox"].is_object()));
    s.stop().await;
}

#[tokio::test]
async fn paused_sandboxes_are_limited_and_racing_pauses_pass_exactly_the_limit() {
    let (_dir, s) = start(Limits {
        max_paused_sandboxes: 2,
        ..fast_limits()
    })
    .await;
    let api = s.client();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create_base(&api).await);
    }
    let paths: Vec<String> = ids
        .iter()
        .map(|id| format!("/sandboxes/{id}/pause"))
        .collect();
    let replies = futures::future::join_all(paths.iter().map(|p| api.post(p, json!({})))).await;
    assert_eq!(statuses(&replies), (2, 3));
    let refused = replies.iter().find(|r| r.status == 429).unwrap();
    assert_error(refused, 429, "paused_sandbox_quota_exceeded");
    let msg = refused.json["message"].as_str().unwrap();
    assert!(
        msg.contains("has 2 paused") && msg.contains("limit is 2"),
        "{msg}"
    );
    assert!(msg.contains("--team-max-paused"), "{msg}");
    s.stop().await;
}

#[tokio::test]
async fn snapshots_are_limited_until_one_is_deleted() {
    let (_dir, s) = start(Limits {
        max_snapshots: 1,
        ..fast_limits()
    })
    .await;
    let api = s.client();
    let id = create_base(&api).await;
    let first = api
        .post(&format!("/sandboxes/{id}/snapshots"), json!({}))
        .await;
    assert_eq!(first.status, 201, "{:?}", first.json);
    let second = api
        .post(&format!("/sandboxes/{id}/snapshots"), json!({}))
        .await;
    assert_error(&second, 429, "snapshot_quota_exceeded");
    assert!(
        second.json["message"]
            .as_str()
            .unwrap()
            .contains("--team-max-snapshots")
    );
    let snap = first.json["snapshotID"].as_str().unwrap();
    assert_eq!(api.delete(&format!("/templates/{snap}")).await.status, 204);
    let third = api
        .post(&format!("/sandboxes/{id}/snapshots"), json!({}))
        .await;
    assert_eq!(third.status, 201, "{:?}", third.json);
    s.stop().await;
}

#[tokio::test]
async fn bytes_stored_by_paused_sandboxes_and_snapshots_are_limited() {
    let (_dir, s) = start(Limits {
        max_stored_bytes: 1500,
        ..fast_limits()
    })
    .await;
    s.backend
        .bytes_per_saved_state
        .store(1000, Ordering::SeqCst);
    let api = s.client();
    let a = create_base(&api).await;
    let b = create_base(&api).await;
    assert_eq!(pause(&api, &a).await, 204);
    let snap = api
        .post(&format!("/sandboxes/{b}/snapshots"), json!({}))
        .await;
    assert_eq!(snap.status, 201, "{:?}", snap.json);
    // 2000 bytes stored now, over 1500: neither another snapshot nor a pause.
    let r = api
        .post(&format!("/sandboxes/{b}/snapshots"), json!({}))
        .await;
    assert_error(&r, 429, "storage_quota_exceeded");
    let msg = r.json["message"].as_str().unwrap();
    assert!(msg.contains("2000 bytes") && msg.contains("1500"), "{msg}");
    let r = api.post(&format!("/sandboxes/{b}/pause"), json!({})).await;
    assert_error(&r, 429, "storage_quota_exceeded");
    // Killing the paused sandbox frees its share.
    assert_eq!(api.delete(&format!("/sandboxes/{a}")).await.status, 204);
    assert_eq!(pause(&api, &b).await, 204);
    s.stop().await;
}

/// The reason the store recorded for a sandbox's end, once it has one (at most 5 s).
async fn end_reason(dir: &std::path::Path, id: &str) -> String {
    let store = alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir)).unwrap();
    for _ in 0..100 {
        if let Some(r) = store.sandbox(id).unwrap().and_then(|r| r.end_reason) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} never ended");
}

#[tokio::test]
async fn paused_sandboxes_past_the_retention_are_deleted_with_a_reason() {
    let (dir, s) = start(Limits {
        paused_retention: Some(Duration::from_millis(300)),
        ..fast_limits()
    })
    .await;
    let api = s.client();
    let id = create_base(&api).await;
    let kept = create_base(&api).await;
    assert_eq!(pause(&api, &id).await, 204);
    let reason = end_reason(dir.path(), &id).await;
    assert!(reason.contains("retention"), "{reason}");
    assert!(!s.backend.vms.lock().unwrap().contains_key(&id));
    assert!(s.backend.vms.lock().unwrap().contains_key(&kept));
    assert_eq!(api.get(&format!("/sandboxes/{id}")).await.status, 404);
    s.stop().await;
}

#[tokio::test]
async fn an_auto_pause_the_paused_quota_cannot_hold_kills_with_the_reason() {
    let (dir, s) = start(Limits {
        max_paused_sandboxes: 0,
        ..fast_limits()
    })
    .await;
    let api = s.client();
    let id = create(
        &api,
        json!({"templateID": "base", "timeout": 1, "autoPause": true}),
    )
    .await;
    let reason = end_reason(dir.path(), &id).await;
    assert!(reason.contains("quota"), "{reason}");
    s.stop().await;
}

#[tokio::test]
#[ignore = "needs root: reads the data dir as the unprivileged user `nobody` via runuser"]
async fn a_fresh_data_dir_is_owner_only_and_other_users_cannot_read_the_database() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    // A parent others may enter, as /var/lib or a home directory is.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("data");
    let s = TestServer::start(&data, Arc::new(FakeBackend::new()), fast_limits()).await;
    let api = s.client();
    create_base(&api).await;
    let mut todo = vec![data.clone()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "{} is {:o}",
            p.display(),
            meta.mode()
        );
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    for name in [alcove_store::DB_FILE, alcove_api::API_KEY_FILE] {
        let out = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--", "cat"])
            .arg(data.join(name))
            .output()
            .expect("runuser runs");
        assert!(!out.status.success(), "nobody read {name}");
    }
    s.stop().await;
}
