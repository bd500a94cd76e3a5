//! `alcove client sandbox create|ls|info|kill|logs|exec|record|shell`.

use std::io::Write;
use std::sync::Arc;

use alcove_client::{EnvdClient, NewSandbox, SandboxFilter};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{ClientArgs, exec, parse_kv, str_of, table};

/// `alcove client sandbox ...`.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and print its id.
    Create {
        /// Template id or alias.
        #[arg(default_value = "base")]
        template: String,
        /// Lifetime in seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", short = 'm', value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
        /// Environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_kv)]
        env: Vec<(String, String)>,
    },
    /// List sandboxes (running and paused unless --state says otherwise).
    Ls {
        /// Comma-separated states: running, paused, creating, killed, lost.
        #[arg(long)]
        state: Option<String>,
        /// Metadata filter, KEY=VALUE (repeatable; all must match).
        #[arg(long = "metadata", short = 'm', value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    /// Show a sandbox's full record and state history.
    Info { id: String },
    /// Kill a sandbox.
    Kill { id: String },
    /// Print a sandbox's log (lifecycle events and its own lines).
    Logs { id: String },
    /// Run a command in a sandbox (bash -l -c, as the SDK's commands.run); exits with its code.
    Exec {
        id: String,
        /// Run as this user (default: the sandbox's default user).
        #[arg(long)]
        user: Option<String>,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// The command; several words are joined with spaces.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Record a sandbox's screen to an MP4 in the sandbox (the desktop template's recorder).
    Record {
        #[command(subcommand)]
        command: RecordCommand,
    },
    /// An interactive shell on a terminal in the sandbox.
    Shell {
        id: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum RecordCommand {
    /// Start recording; prints the recording id.
    Start {
        id: String,
        /// Where the MP4 goes in the sandbox (default ~/recordings/<recording id>.mp4).
        #[arg(long)]
        path: Option<String>,
        /// Frames per second, 1-30 (default 5).
        #[arg(long)]
        fps: Option<u32>,
        /// Stop by itself after this many seconds (default 3600).
        #[arg(long)]
        max_seconds: Option<u32>,
        /// The X display (default :0).
        #[arg(long)]
        display: Option<String>,
    },
    /// Stop a recording; prints its file, size and length.
    Stop { id: String, recording: String },
    /// List a sandbox's recordings.
    Ls { id: String },
}

/// Runs a client sandbox command; returns the process exit code (`exec`, `shell`) or 0.
pub async fn run_sandbox(args: SandboxArgs, out: &mut (dyn Write + Send)) -> anyhow::Result<i32> {
    let api = args.client.client()?;
    let json_out = args.client.json;
    let envd = |id: &str, info: &Value, user: Option<String>| {
        let token = info
            .get("envdAccessToken")
            .and_then(|t| t.as_str())
            .map(str::to_owned);
        EnvdClient::new(&args.client.api_url, id, token, user)
    };
    match args.command {
        SandboxCommand::Exec {
            id,
            user,
            cwd,
            env,
            command,
        } => {
            let info = api.sandbox(&id).await?;
            let client = envd(&id, &info, user);
            return exec::exec(&client, &command.join(" "), cwd, env, json_out, out).await;
        }
        SandboxCommand::Record { command } => record(&api, command, json_out, out).await?,
        SandboxCommand::Shell { id, user, cwd } => {
            let info = api.sandbox(&id).await?;
            let client = Arc::new(envd(&id, &info, user));
            return exec::shell(client, cwd).await;
        }
        SandboxCommand::Create {
            template,
            timeout,
            metadata,
            env,
        } => {
            let r = api
                .create_sandbox(&NewSandbox {
                    template,
                    timeout,
                    metadata: metadata.into_iter().collect(),
                    env_vars: env.into_iter().collect(),
                })
                .await?;
            if json_out {
                writeln!(out, "{r}")?;
            } else {
                writeln!(out, "{}", r["sandboxID"].as_str().unwrap_or_default())?;
            }
        }
        SandboxCommand::Ls { state, metadata } => {
            let items = api
                .list_sandboxes(&SandboxFilter { state, metadata })
                .await?;
            if json_out {
                writeln!(out, "{}", Value::Array(items))?;
            } else {
                let rows = items
                    .iter()
                    .map(|s| {
                        let meta = s["metadata"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        vec![
                            str_of(&s["sandboxID"]),
                            s["alias"]
                                .as_str()
                                .map_or_else(|| str_of(&s["templateID"]), str::to_owned),
                            str_of(&s["state"]),
                            str_of(&s["startedAt"]),
                            str_of(&s["endAt"]),
                            meta,
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["ID", "TEMPLATE", "STATE", "STARTED", "ENDS", "METADATA"],
                    rows,
                )?;
            }
        }
        SandboxCommand::Info { id } => {
            let j = api.sandbox_record(&id).await?;
            if json_out {
                writeln!(out, "{j}")?;
            } else {
                writeln!(out, "id:       {}", str_of(&j["sandboxID"]))?;
                writeln!(out, "template: {}", str_of(&j["templateID"]))?;
                writeln!(out, "state:    {}", str_of(&j["state"]))?;
                if let Some(reason) = j["endReason"].as_str() {
                    writeln!(out, "ended:    {reason}")?;
                }
                writeln!(out, "history:")?;
                for h in j["history"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "  {}  {:<9} {}",
                        str_of(&h["at"]),
                        str_of(&h["to"]),
                        str_of(&h["reason"])
                    )?;
                }
            }
        }
        SandboxCommand::Kill { id } => {
            api.kill_sandbox(&id).await?;
            if json_out {
                writeln!(out, "{}", json!({"sandboxID": id, "killed": true}))?;
            } else {
                writeln!(out, "Killed {id}.")?;
            }
        }
        SandboxCommand::Logs { id } => {
            let r = api.sandbox_logs(&id).await?;
            if json_out {
                writeln!(out, "{r}")?;
            } else {
                for l in r["logs"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{} {:<5} {}",
                        str_of(&l["timestamp"]),
                        str_of(&l["level"]),
                        str_of(&l["message"])
                    )?;
                }
            }
        }
    }
    Ok(0)
}

async fn record(
    api: &alcove_client::ApiClient,
    command: RecordCommand,
    json_out: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let line = |r: &Value| {
        format!(
            "{}  {:<9} {}  {} bytes  {} s{}",
            str_of(&r["recordingID"]),
            str_of(&r["state"]),
            str_of(&r["path"]),
            r["sizeBytes"].as_u64().unwrap_or(0),
            r["durationSeconds"].as_f64().unwrap_or(0.0),
            r["error"]
                .as_str()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        )
    };
    let r = match command {
        RecordCommand::Start {
            id,
            path,
            fps,
            max_seconds,
            display,
        } => {
            let body =
                json!({"path": path, "fps": fps, "maxSeconds": max_seconds, "display": display});
            let r = api.start_recording(&id, &body).await?;
            if !json_out {
                writeln!(out, "{}", str_of(&r["recordingID"]))?;
                return Ok(());
            }
            r
        }
        RecordCommand::Stop { id, recording } => {
            let r = api.stop_recording(&id, &recording).await?;
            if !json_out {
                writeln!(out, "{}", line(&r))?;
                return Ok(());
            }
            r
        }
        RecordCommand::Ls { id } => {
            let r = api.recordings(&id).await?;
            if !json_out {
                let all = r["recordings"].as_array().cloned().unwrap_or_default();
                if all.is_empty() {
                    writeln!(out, "no recordings")?;
                }
                for rec in &all {
                    writeln!(out, "{}", line(rec))?;
                }
                return Ok(());
            }
            r
        }
    };
    writeln!(out, "{r}")?;
    Ok(())
}
