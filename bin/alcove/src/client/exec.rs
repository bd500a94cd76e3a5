//! `exec` and `shell`: a process in a sandbox through [`EnvdClient`], its output on this
//! terminal.

use std::io::Write;
use std::sync::Arc;

use alcove_client::envd::process as pb;
use alcove_client::{EnvdClient, Output};

use super::terminal;

/// `exec`: runs `command` with bash (as the SDK's `commands.run` does), streaming its output,
/// and returns its exit code.
pub async fn exec(
    client: &EnvdClient,
    command: &str,
    cwd: Option<String>,
    envs: Vec<(String, String)>,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<i32> {
    let start = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), command.into()],
            envs: envs.into_iter().collect(),
            cwd,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut code = None;
    let mut failure = None;
    client
        .start(start, |o| match o {
            Output::Stdout(b) => {
                if json {
                    stdout.extend_from_slice(&b);
                } else {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
            }
            Output::Stderr(b) => {
                if json {
                    stderr.extend_from_slice(&b);
                } else {
                    let mut e = std::io::stderr();
                    let _ = e.write_all(&b);
                    let _ = e.flush();
                }
            }
            Output::Ended { exit_code, error } => {
                code = Some(exit_code);
                failure = error;
            }
            _ => {}
        })
        .await?;
    let code = code.unwrap_or(-1);
    if json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({
                "exit_code": code,
                "stdout": String::from_utf8_lossy(&stdout),
                "stderr": String::from_utf8_lossy(&stderr),
                "error": failure,
            }),
        )?;
        writeln!(out)?;
    } else if let Some(e) = failure {
        eprintln!("{e}");
    }
    Ok(code)
}

/// `shell`: an interactive login shell on a PTY in the sandbox; local keystrokes go in, the
/// terminal's size follows the local one. Returns the shell's exit code.
pub async fn shell(client: Arc<EnvdClient>, cwd: Option<String>) -> anyhow::Result<i32> {
    let (rows, cols) = terminal::size();
    let start = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-i".into(), "-l".into()],
            envs: [(
                "TERM".to_string(),
                std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
            )]
            .into_iter()
            .collect(),
            cwd,
        }),
        pty: Some(pb::Pty {
            size: Some(pb::pty::Size {
                cols: u32::from(cols),
                rows: u32::from(rows),
            }),
        }),
        tag: None,
        stdin: Some(true),
    };
    let raw = terminal::RawMode::enter();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<u32>();
    let input_client = client.clone();
    // Keystrokes: a blocking reader thread feeds a task that sends them in order.
    let input = tokio::spawn(async move {
        let Ok(pid) = pid_rx.await else { return };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            tokio::select! {
                data = rx.recv() => match data {
                    Some(d) => {
                        if input_client.send_pty_input(pid, d).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending().await } } => {
                    let (r, c) = terminal::size();
                    let _ = input_client.resize(pid, r, c).await;
                }
            }
        }
    });
    let mut pid_tx = Some(pid_tx);
    let mut code = 0;
    let result = client
        .start(start, |o| match o {
            Output::Started(pid) => {
                if let Some(tx) = pid_tx.take() {
                    let _ = tx.send(pid);
                }
            }
            Output::Pty(b) | Output::Stdout(b) | Output::Stderr(b) => {
                let mut so = std::io::stdout();
                let _ = so.write_all(&b);
                let _ = so.flush();
            }
            Output::Ended { exit_code, .. } => code = exit_code,
        })
        .await;
    input.abort();
    drop(raw);
    result?;
    Ok(code)
}
