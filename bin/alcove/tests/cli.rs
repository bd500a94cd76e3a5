//! `alcove keys` and the REST client commands, run as the binary against a live API server over
//! a fake backend (the API's own test harness) and its data directory.

#[path = "../../../crates/api/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use common::{FakeBackend, TestServer, fast_limits};

/// Runs `alcove ARGS`; its exit code, stdout and stderr.
async fn alcove(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_alcove"))
        .args(args)
        .env_remove("E2B_API_URL")
        .env_remove("E2B_API_KEY")
        .env_remove("ALCOVE_DATA_DIR")
        .env_remove("ALCOVE_LOG")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `alcove keys` on `dir`; its stdout, after checking it succeeded.
async fn keys(dir: &Path, json: bool, command: &[&str]) -> String {
    let mut args = vec!["keys", "--data-dir", dir.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    args.extend(command);
    let (code, out, err) = alcove(&args).await;
    assert_eq!(code, 0, "{err}");
    out
}

#[tokio::test]
async fn keys_and_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;

    let created: serde_json::Value =
        serde_json::from_str(&keys(dir.path(), true, &["create", "--name", "ci"]).await).unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    let listed = keys(dir.path(), false, &["list"]).await;
    assert!(
        listed.contains("ci") && listed.contains("admin (first start)"),
        "{listed}"
    );
    assert!(!listed.contains(&secret), "list never shows secrets");

    let url = format!("http://{}", s.addr);
    let client = |command: &[&str]| {
        let mut args = vec!["client"];
        args.extend(&command[..1]);
        args.extend(["--api-url", url.as_str(), "--api-key", secret.as_str()]);
        args.extend(&command[1..]);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        alcove(&args).await
    };

    let (code, out, err) = run(client(&[
        "sandbox",
        "create",
        "base",
        "--timeout",
        "60",
        "-m",
        "owner=cli test",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 20);

    let (code, out, err) = run(client(&["sandbox", "--json", "ls", "-m", "owner=cli test"])).await;
    assert_eq!(code, 0, "{err}");
    let ls: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ls[0]["sandboxID"], id.as_str());

    for cmd in ["kill", "info"] {
        let (code, _, err) = run(client(&["sandbox", cmd, &id])).await;
        assert_eq!(code, 0, "{cmd}: {err}");
    }
    let (code, logs, err) = run(client(&["sandbox", "logs", &id])).await;
    assert_eq!(code, 0, "{err}");
    assert!(logs.contains("killed by API request"), "{logs}");

    let (code, t, err) = run(client(&["template", "ls"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        t.starts_with("ID") && t.contains("code-interpreter-v1"),
        "{t}"
    );

    let key_id = created["id"].as_str().unwrap().to_owned();
    keys(dir.path(), false, &["revoke", &key_id]).await;
    let (code, out, err) = run(client(&["template", "ls"])).await;
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("401"), "{err}");

    // With --json, a failure is one JSON document on stdout.
    let (code, out, _) = run(client(&["template", "--json", "ls"])).await;
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(doc["error"].as_str().unwrap().contains("401"), "{out}");
    s.stop().await;
}

#[tokio::test]
async fn info_says_tcg_is_not_a_security_boundary() {
    let (code, out, err) = alcove(&["info", "--accel", "tcg", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["accel"], "tcg");
    assert_eq!(v["security_boundary"], false, "{v}");
    assert!(
        v["warning"]
            .as_str()
            .is_some_and(|w| w.contains("not a security boundary") && w.contains("--require-kvm")),
        "{v}"
    );
    let (code, out, err) = alcove(&["info", "--accel", "tcg"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("warning: TCG"), "{out}");
    assert!(out.contains("jail: on"), "{out}");
}

#[tokio::test]
async fn server_with_require_kvm_refuses_to_start_under_tcg() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = alcove(&[
        "server",
        "--require-kvm",
        "--accel",
        "tcg",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--warm-pool",
        "",
    ])
    .await;
    assert_ne!(code, 0);
    assert!(
        err.contains("--require-kvm") && err.contains("KVM"),
        "{err}"
    );
}
