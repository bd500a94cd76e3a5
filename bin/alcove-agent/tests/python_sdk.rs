//! Drives the agent with the official e2b Python SDK (2.63.0, unmodified): commands, PTY,
//! files and watchers through `tests/python/sdk_envd.py`, first without and then with an
//! access token.
//!
//! The SDK is installed into a venv under the test's temp dir (needs PyPI). To reuse an
//! interpreter that already has it: `ALCOVE_TEST_E2B_PYTHON=/path/to/python`. To skip:
//! `ALCOVE_SKIP_PYTHON_SDK=1`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Agent;

const E2B_VERSION: &str = "2.63.0";

fn python_with_sdk(tmp: &std::path::Path) -> PathBuf {
    if let Ok(p) = std::env::var("ALCOVE_TEST_E2B_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = tmp.join("venv");
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("run python3 -m venv")
        .success();
    assert!(ok, "python3 -m venv failed");
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", &format!("e2b=={E2B_VERSION}")])
        .status()
        .expect("run pip")
        .success();
    assert!(
        ok,
        "pip install e2b=={E2B_VERSION} failed (PyPI unreachable? set ALCOVE_SKIP_PYTHON_SDK=1)"
    );
    venv.join("bin/python")
}

fn run_script(python: &std::path::Path, url: &str, scratch: &std::path::Path, token: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_envd.py");
    let out = Command::new(python)
        .arg(script)
        .arg(url)
        .arg(scratch)
        .arg(token)
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("SDK OK"),
        "SDK script failed (token {token}, {}):\n{stdout}\n{stderr}",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the SDK script runs commands as root; run by scripts/test.sh"]
async fn official_python_sdk_works_against_the_agent() {
    if std::env::var("ALCOVE_SKIP_PYTHON_SDK").as_deref() == Ok("1") {
        eprintln!("skipped: ALCOVE_SKIP_PYTHON_SDK=1");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let python = tokio::task::spawn_blocking({
        let t = tmp.path().to_path_buf();
        move || python_with_sdk(&t)
    })
    .await
    .unwrap();
    let agent = Agent::start();
    let url = agent.url("");
    let (p, u, s) = (python.clone(), url.clone(), tmp.path().join("open"));
    tokio::task::spawn_blocking(move || run_script(&p, &u, &s, "-"))
        .await
        .unwrap();

    let c = agent.client().await;
    c.init(
        &alcove_agent_client::InitRequest {
            access_token: Some("sdk-token".into()),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let s = tmp.path().join("secured");
    tokio::task::spawn_blocking(move || run_script(&python, &url, &s, "sdk-token"))
        .await
        .unwrap();
}
