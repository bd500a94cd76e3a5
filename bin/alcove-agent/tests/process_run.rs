//! Phase-1 checks through the host client: run, exit codes, stdin, envs, cwd, users, health.

mod common;

use alcove_agent_client::{ClientError, RunRequest, alcove_envd_proto::connect::Code};
use common::*;

#[tokio::test]
async fn health_answers_204() {
    let agent = Agent::start();
    agent.client().await.health().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn echo_runs_and_exits_zero() {
    let agent = Agent::start();
    let c = agent.client().await;
    let out = run_ok(
        &c,
        RunRequest {
            cmd: "/bin/echo".into(),
            args: vec!["hello".into(), "world".into()],
            user: Some("root".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(text(&out.stdout), "hello world\n");
    assert_eq!(out.exit_code, 0);
    assert!(out.exited);
    assert_eq!(out.status, "exit status 0");
    assert_eq!(out.error, None);
    assert!(out.pid > 0);
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn exit_codes_and_stderr_are_reported() {
    let agent = Agent::start();
    let c = agent.client().await;
    let out = run_ok(&c, sh("echo oops >&2; exit 3")).await;
    assert_eq!(out.exit_code, 3);
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(out.error.as_deref(), Some("exit status 3"));
    let out = run_ok(&c, sh("kill -9 $$")).await;
    assert_eq!(out.exit_code, -1);
    assert!(!out.exited);
    assert_eq!(out.status, "signal: killed");
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn stdin_is_fed_and_closed() {
    let agent = Agent::start();
    let c = agent.client().await;
    let mut req = sh("tr a-z A-Z; echo done");
    req.stdin = Some(bytes::Bytes::from_static(b"hello stdin\n"));
    let out = run_ok(&c, req).await;
    assert_eq!(text(&out.stdout), "HELLO STDIN\ndone\n");
    // Without stdin the process reads EOF at once.
    let out = run_ok(&c, sh("cat; echo eof")).await;
    assert_eq!(text(&out.stdout), "eof\n");
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn envs_and_cwd_apply() {
    let agent = Agent::start();
    let c = agent.client().await;
    let mut req = sh("echo \"$FOO|$HOME|$USER|$(pwd)\"");
    req.envs.insert("FOO".into(), "bar baz".into());
    req.cwd = Some("/tmp".into());
    let out = run_ok(&c, req).await;
    assert_eq!(text(&out.stdout), "bar baz|/root|root|/tmp\n");
    // Default cwd is the user's home.
    let out = run_ok(&c, sh("pwd")).await;
    assert_eq!(text(&out.stdout), "/root\n");
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn missing_cwd_and_command_are_errors() {
    let agent = Agent::start();
    let c = agent.client().await;
    let mut req = sh("true");
    req.cwd = Some("/no/such/dir".into());
    match c.run(req).await {
        Err(ClientError::Rpc { code, message, .. }) => {
            assert_eq!(code, Code::InvalidArgument);
            assert!(message.contains("/no/such/dir"), "{message}");
        }
        other => panic!("expected invalid_argument, got {other:?}"),
    }
    let req = RunRequest {
        cmd: "/no/such/binary".into(),
        user: Some("root".into()),
        ..Default::default()
    };
    match c.run(req).await {
        Err(ClientError::Rpc { code, .. }) => assert_eq!(code, Code::NotFound),
        other => panic!("expected not_found, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs root: the agent runs commands as root and as `nobody`; run by scripts/test.sh"]
async fn runs_as_the_requested_user() {
    let agent = Agent::start();
    let c = agent.client().await;
    let out = run_ok(&c, sh("id -u; id -g")).await;
    assert_eq!(text(&out.stdout), "0\n0\n");
    let mut req = sh("id -un; id -u; echo $HOME");
    req.user = Some("nobody".into());
    req.cwd = Some("/tmp".into());
    let out = run_ok(&c, req).await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(
        text(&out.stdout),
        format!("nobody\n{}\n{}\n", nobody.uid, nobody.dir.display())
    );
    let mut req = sh("true");
    req.user = Some("no-such-user-alcove".into());
    match c.run(req).await {
        Err(ClientError::Rpc { code, .. }) => assert_eq!(code, Code::PermissionDenied),
        other => panic!("expected permission_denied, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn many_runs_share_one_connection() {
    let agent = Agent::start();
    let c = agent.client().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let out = c.run(sh(&format!("echo {i}"))).await.unwrap();
            assert_eq!(text(&out.stdout), format!("{i}\n"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn init_adds_env_vars_to_the_ones_the_guest_has() {
    // A sandbox restored from a snapshot keeps the snapshot's variables: the host no longer
    // stores values, so a later /init only adds (and overrides) its own.
    let agent = Agent::start();
    let c = agent.client().await;
    let first = alcove_agent_client::InitRequest {
        env_vars: Some(
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "1".to_owned()),
            ]
            .into(),
        ),
        ..Default::default()
    };
    c.init(&first, None).await.unwrap();
    let second = alcove_agent_client::InitRequest {
        env_vars: Some(
            [
                ("B".to_owned(), "2".to_owned()),
                ("C".to_owned(), "2".to_owned()),
            ]
            .into(),
        ),
        ..Default::default()
    };
    c.init(&second, None).await.unwrap();
    let out = run_ok(&c, sh("echo $A$B$C")).await;
    assert_eq!(text(&out.stdout), "122\n");
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn init_sets_env_defaults_and_token() {
    let agent = Agent::start();
    let c = agent.client().await;
    let init = alcove_agent_client::InitRequest {
        env_vars: Some([("FROM_INIT".to_owned(), "yes".to_owned())].into()),
        access_token: Some("secret-token".into()),
        timestamp: Some("2026-11-22T18:23:00Z".into()),
        hostname: Some("sbx-test".into()),
        entropy: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
        sandbox_id: Some("sbx-1".into()),
        ..Default::default()
    };
    c.init(&init, None).await.unwrap();
    // Without the token: refused.
    match c.run(sh("true")).await {
        Err(ClientError::Rpc { code, .. }) => assert_eq!(code, Code::Unauthenticated),
        other => panic!("expected unauthenticated, got {other:?}"),
    }
    let mut req = sh("echo $FROM_INIT");
    req.access_token = Some("secret-token".into());
    let out = run_ok(&c, req).await;
    assert_eq!(text(&out.stdout), "yes\n");
    // A second /init without the current token cannot take over.
    assert!(
        c.init(&alcove_agent_client::InitRequest::default(), None)
            .await
            .is_err()
    );
    // Too little entropy is refused.
    let bad = alcove_agent_client::InitRequest {
        entropy: Some("AAAA".into()),
        ..Default::default()
    };
    assert!(c.init(&bad, Some("secret-token")).await.is_err());
    c.health().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn template_start_cmd_runs_before_ready_and_is_reattachable() {
    use alcove_agent_client::alcove_envd_proto::process as pb;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let cfg = dir.path().join("template.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "start_cmd": format!("sleep 0.5; echo up > {}; echo serving; sleep 600", marker.display()),
            "ready_cmd": format!("test -f {}", marker.display()),
            "user": "root",
            "workdir": "/tmp",
            "envs": {"TEMPLATE_ENV": "1"},
        })
        .to_string(),
    )
    .unwrap();
    let agent = Agent::start_with(&["--template-config", cfg.to_str().unwrap()], &[]);
    // The ready line came only after ready_cmd succeeded.
    assert!(marker.exists());
    let c = agent.client().await;
    let list: pb::ListResponse = c
        .unary(
            "List",
            "/process.Process/List",
            &pb::ListRequest {},
            &root(),
        )
        .await
        .unwrap();
    let p = list
        .processes
        .iter()
        .find(|p| p.tag.as_deref() == Some("alcove-start-cmd"))
        .expect("start_cmd is in the process list");
    let pid = p.pid;
    let mut s = connect_to(&c, by_tag("alcove-start-cmd")).await;
    let mut out = Vec::new();
    while !text(&out).contains("serving") {
        match event_of(s.next().await.unwrap().unwrap().event) {
            Some(pb::process_event::Event::Data(d)) => {
                if let Some(pb::process_event::data_event::Output::Stdout(b)) = d.output {
                    out.extend_from_slice(&b);
                }
            }
            Some(pb::process_event::Event::Start(st)) => assert_eq!(st.pid, pid),
            other => panic!("unexpected {other:?}"),
        }
    }
    signal(&c, pid, pb::Signal::Sigkill).await;
}

#[tokio::test]
async fn a_template_that_never_gets_ready_still_boots() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("template.json");
    std::fs::write(&cfg, r#"{"ready_cmd": "false", "ready_timeout_secs": 1}"#).unwrap();
    let agent = Agent::start_with(&["--template-config", cfg.to_str().unwrap()], &[]);
    agent.client().await.health().await.unwrap();
}
