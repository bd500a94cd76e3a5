//! `alcove sandbox create|exec|ls|kill`, driving the node library directly (no server needed).

use std::collections::BTreeMap;
use std::io::Write;

use alcove_agent_client::RunRequest;
use alcove_node::CreateOptions;

use crate::config::Global;

#[derive(clap::Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox from a template and print its id.
    Create {
        #[arg(long, short, default_value = "base")]
        template: String,
        /// Environment variable for every process in the sandbox (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        envs: Vec<String>,
    },
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec {
        id: String,
        /// Run as this user (`user` or `root`).
        #[arg(long, default_value = "user")]
        user: String,
        #[arg(long)]
        cwd: Option<String>,
        /// The command. One argument is run by `bash -l -c`; several are run as they are.
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// List sandboxes.
    Ls,
    /// Pause a sandbox to disk (memory, processes, files kept; no CPU or RAM used while paused).
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume { id: String },
    /// Kill sandboxes and remove every trace of them.
    Kill {
        ids: Vec<String>,
        #[arg(long)]
        all: bool,
    },
}

fn parse_envs(envs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    envs.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("--env `{kv}` must look like KEY=VALUE"),
        })
        .collect()
}

/// The request `alcove sandbox exec` sends: one argument means a shell command line.
pub fn run_request(command: &[String], user: &str, cwd: Option<String>) -> RunRequest {
    let (cmd, args) = if command.len() == 1 {
        (
            "/bin/bash".to_string(),
            vec!["-l".to_string(), "-c".to_string(), command[0].clone()],
        )
    } else {
        (command[0].clone(), command[1..].to_vec())
    };
    RunRequest {
        cmd,
        args,
        user: Some(user.to_string()),
        cwd,
        ..Default::default()
    }
}

pub async fn run(g: &Global, cmd: SandboxCmd) -> anyhow::Result<u8> {
    let node = g.node().await?;
    match cmd {
        SandboxCmd::Create { template, envs } => {
            let opts = CreateOptions {
                template,
                envs: parse_envs(&envs)?,
                ..Default::default()
            };
            let (info, t) = node.create(opts).await?;
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({ "sandbox": info, "timings_ms": {
                        "spawn_to_qmp": t.restore.spawn_to_qmp.as_secs_f64() * 1e3,
                        "restored": t.restore.resumed.as_secs_f64() * 1e3,
                        "agent_connected": t.agent_connected.as_secs_f64() * 1e3,
                        "ready": t.ready.as_secs_f64() * 1e3,
                    }})
                );
            } else {
                println!("{}", info.id);
                eprintln!(
                    "sandbox {} ready in {} ms (template {})",
                    info.id,
                    t.ready.as_millis(),
                    info.template
                );
            }
            Ok(0)
        }
        SandboxCmd::Exec {
            id,
            user,
            cwd,
            command,
        } => {
            let out = node.run(&id, run_request(&command, &user, cwd)).await?;
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "stdout": String::from_utf8_lossy(&out.stdout),
                        "stderr": String::from_utf8_lossy(&out.stderr),
                        "exit_code": out.exit_code,
                        "error": out.error,
                    })
                );
            } else {
                std::io::stdout().write_all(&out.stdout)?;
                std::io::stderr().write_all(&out.stderr)?;
                if let Some(e) = &out.error {
                    eprintln!("alcove: {e}");
                }
            }
            Ok(u8::try_from(out.exit_code).unwrap_or(1))
        }
        SandboxCmd::Ls => {
            let list = node.list();
            if g.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!(
                    "{:<22} {:<14} {:<8} {:>8} STATE",
                    "ID", "TEMPLATE", "PID", "MEM_MIB"
                );
                for s in list {
                    println!(
                        "{:<22} {:<14} {:<8} {:>8} {}",
                        s.id, s.template, s.pid, s.memory_mib, s.state
                    );
                }
            }
            Ok(0)
        }
        SandboxCmd::Pause { id } => {
            let t = node.pause(&id).await?;
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({ "paused": id, "ms": t.total.as_secs_f64() * 1e3, "state_bytes": t.state_bytes })
                );
            } else {
                println!(
                    "paused {id} in {} ms ({} MiB of state)",
                    t.total.as_millis(),
                    t.state_bytes >> 20
                );
            }
            Ok(0)
        }
        SandboxCmd::Resume { id } => {
            let d = node.resume(&id).await?;
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({ "resumed": id, "ms": d.as_secs_f64() * 1e3 })
                );
            } else {
                println!("resumed {id} in {} ms", d.as_millis());
            }
            Ok(0)
        }
        SandboxCmd::Kill { ids, all } => {
            let ids: Vec<String> = if all {
                node.list().into_iter().map(|s| s.id).collect()
            } else {
                ids
            };
            if ids.is_empty() {
                anyhow::bail!("name the sandboxes to kill, or pass --all");
            }
            for id in &ids {
                node.kill(id).await?;
            }
            if g.json {
                println!("{}", serde_json::json!({ "killed": ids }));
            } else {
                for id in ids {
                    println!("killed {id}");
                }
            }
            Ok(0)
        }
    }
}
