//! The CLI pieces against a live server (fake backend) and its data directory.

mod common;

use std::sync::Arc;

use alcove_api::cli::{
    ClientArgs, KeysArgs, KeysCommand, SandboxArgs, SandboxCommand, TemplateArgs, TemplateCommand,
    run_keys, run_sandbox, run_template,
};
use common::{FakeBackend, TestServer, fast_limits};

fn keys(dir: &std::path::Path, json: bool, command: KeysCommand) -> String {
    let mut out = Vec::new();
    run_keys(
        KeysArgs {
            data_dir: Some(dir.into()),
            json,
            command,
        },
        &mut out,
    )
    .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn keys_and_client_commands() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;

    let created: serde_json::Value = serde_json::from_str(&keys(
        dir.path(),
        true,
        KeysCommand::Create {
            name: "ci".into(),
            team: None,
        },
    ))
    .unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    let listed = keys(dir.path(), false, KeysCommand::List);
    assert!(
        listed.contains("ci") && listed.contains("admin (first start)"),
        "{listed}"
    );
    assert!(!listed.contains(&secret), "list never shows secrets");

    let client = |json| ClientArgs {
        api_url: format!("http://{}", s.addr),
        api_key: Some(secret.clone()),
        data_dir: None,
        json,
    };
    let mut out = Vec::new();
    run_sandbox(
        SandboxArgs {
            client: client(false),
            command: SandboxCommand::Create {
                template: "base".into(),
                timeout: Some(60),
                metadata: vec![("owner".into(), "cli test".into())],
                env: vec![],
            },
        },
        &mut out,
    )
    .await
    .unwrap();
    let id = String::from_utf8(out).unwrap().trim().to_owned();
    assert_eq!(id.len(), 20);

    let mut out = Vec::new();
    run_sandbox(
        SandboxArgs {
            client: client(true),
            command: SandboxCommand::Ls {
                state: None,
                metadata: vec![("owner".into(), "cli test".into())],
            },
        },
        &mut out,
    )
    .await
    .unwrap();
    let ls: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(ls[0]["sandboxID"], id.as_str());

    for cmd in [
        SandboxCommand::Kill { id: id.clone() },
        SandboxCommand::Info { id: id.clone() },
    ] {
        let mut out = Vec::new();
        run_sandbox(
            SandboxArgs {
                client: client(false),
                command: cmd,
            },
            &mut out,
        )
        .await
        .unwrap();
    }
    let mut out = Vec::new();
    run_sandbox(
        SandboxArgs {
            client: client(false),
            command: SandboxCommand::Logs { id },
        },
        &mut out,
    )
    .await
    .unwrap();
    let logs = String::from_utf8(out).unwrap();
    assert!(logs.contains("killed by API request"), "{logs}");

    let mut out = Vec::new();
    run_template(
        TemplateArgs {
            client: client(false),
            command: TemplateCommand::Ls,
        },
        &mut out,
    )
    .await
    .unwrap();
    let t = String::from_utf8(out).unwrap();
    assert!(
        t.starts_with("ID") && t.contains("code-interpreter-v1"),
        "{t}"
    );

    let key_id = created["id"].as_str().unwrap().to_owned();
    keys(dir.path(), false, KeysCommand::Revoke { id: key_id });
    let mut out = Vec::new();
    let err = run_template(
        TemplateArgs {
            client: client(false),
            command: TemplateCommand::Ls,
        },
        &mut out,
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    s.stop().await;
}
