//! Template start: `/etc/alcove/template.json` (`start_cmd`, `ready_cmd`, `envs`, `user`,
//! `start_user`, `workdir`, `ready_timeout_secs`; all optional) names a long-running command the template
//! snapshot should contain already running. The agent starts it at boot, polls `ready_cmd` until
//! it exits 0 (bounded), and only then announces readiness, so the host snapshots a ready VM.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use alcove_envd_proto::process::ProcessConfig;

use crate::process::{Item, StartSpec};
use crate::state::AgentState;
use crate::users::UserInfo;

/// Tag of the template's start command in the process table (Connect by this tag to follow it).
pub const START_TAG: &str = "alcove-start-cmd";
const READY_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Default, Deserialize)]
pub struct TemplateConfig {
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub user: Option<String>,
    /// Who runs `start_cmd` and `ready_cmd` when not the template's user (the code interpreter's
    /// kernels run as root, as E2B's do, while commands default to `user`).
    pub start_user: Option<String>,
    pub workdir: Option<String>,
    pub ready_timeout_secs: Option<u64>,
}

/// Starts the template's command and waits until it is ready. Failures are logged (to the
/// console) and never stop the agent: a sandbox whose template misbehaves is still usable.
pub async fn start_and_wait(state: &Arc<AgentState>, path: &Path, default_timeout: Duration) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "read the template config");
            return;
        }
    };
    let cfg: TemplateConfig = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "parse the template config");
            return;
        }
    };
    let user = match state.resolve_user(cfg.user.as_deref()) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "template user");
            return;
        }
    };
    let _ = state.template_user.set(user.clone());
    let start_user = match cfg.start_user.as_deref().filter(|u| !u.is_empty()) {
        None => user.clone(),
        Some(name) => match state.resolve_user(Some(name)) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "template start_user");
                return;
            }
        },
    };
    // As E2B's templates: the template's user, workdir and env are the defaults of every process
    // started later (envd calls that name no user or cwd), before /init adds its own variables.
    {
        let mut d = state.defaults.write().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = cfg.user.as_ref().filter(|u| !u.is_empty()) {
            d.user = Some(u.clone());
        }
        if let Some(w) = cfg.workdir.as_ref().filter(|w| !w.is_empty()) {
            d.workdir = Some(w.into());
        }
        let mut env = cfg.envs.clone();
        env.extend(std::mem::take(&mut d.env_vars));
        d.env_vars = env;
    }
    if let Some(cmd) = &cfg.start_cmd {
        match spawn_shell(state, &cfg, &start_user, cmd, Some(START_TAG.to_owned())) {
            Ok(pid) => tracing::info!(pid, "template start_cmd running"),
            Err(e) => tracing::error!(error = %e, "template start_cmd failed to start"),
        }
    }
    let Some(ready) = &cfg.ready_cmd else { return };
    let timeout = cfg
        .ready_timeout_secs
        .map(Duration::from_secs)
        .unwrap_or(default_timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match run_to_end(state, &cfg, &start_user, ready).await {
            Ok((0, _)) => {
                tracing::info!("template ready_cmd succeeded");
                return;
            }
            Ok((code, out)) => format!("exit code {code}: {}", out.trim()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(timeout_secs = timeout.as_secs(), last = %last, "template ready_cmd did not succeed in time");
            return;
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

fn spec(
    cfg: &TemplateConfig,
    user: &UserInfo,
    cmd: &str,
    tag: Option<String>,
    state: &AgentState,
) -> StartSpec {
    let mut env = state.defaults().env_vars;
    env.extend(cfg.envs.clone());
    StartSpec {
        config: ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), cmd.into()],
            envs: HashMap::new(),
            cwd: cfg.workdir.clone(),
        },
        user: user.clone(),
        default_env: env,
        default_workdir: None,
        tag,
        pty: None,
        stdin: false,
    }
}

fn spawn_shell(
    state: &Arc<AgentState>,
    cfg: &TemplateConfig,
    user: &UserInfo,
    cmd: &str,
    tag: Option<String>,
) -> Result<u32, String> {
    let (h, _sub) = state
        .processes
        .start(spec(cfg, user, cmd, tag, state))
        .map_err(|e| crate::rpc::error_chain(&e))?;
    Ok(h.pid)
}

/// Runs a command to completion: (exit code, last output).
async fn run_to_end(
    state: &Arc<AgentState>,
    cfg: &TemplateConfig,
    user: &UserInfo,
    cmd: &str,
) -> Result<(i32, String), String> {
    let (_h, mut sub) = state
        .processes
        .start(spec(cfg, user, cmd, None, state))
        .map_err(|e| crate::rpc::error_chain(&e))?;
    let mut out = Vec::new();
    while let Some(item) = sub.next().await {
        match item {
            Item::Data(c) => {
                let b = match c {
                    crate::process::Chunk::Stdout(b)
                    | crate::process::Chunk::Stderr(b)
                    | crate::process::Chunk::Pty(b) => b,
                };
                out.extend_from_slice(&b);
                if out.len() > 4096 {
                    out.drain(..out.len() - 4096);
                }
            }
            Item::End(end) => {
                return Ok((end.exit_code, String::from_utf8_lossy(&out).into_owned()));
            }
        }
    }
    Err("ready_cmd output ended without an exit status".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateConfig;

    #[tokio::test]
    async fn the_template_user_workdir_and_env_become_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("template.json");
        let me = UserInfo::current().unwrap();
        std::fs::write(
            &path,
            serde_json::json!({
                "user": me.name,
                "workdir": "/srv/app",
                "envs": {"A": "1", "B": "2"},
            })
            .to_string(),
        )
        .unwrap();
        let state = AgentState::new(StateConfig {
            touch_system: false,
            output_buffer: 1 << 16,
        });
        // A variable the agent had before (from an earlier /init) wins over the template's.
        state
            .defaults
            .write()
            .unwrap()
            .env_vars
            .insert("B".into(), "from-init".into());
        start_and_wait(&state, &path, Duration::from_secs(5)).await;
        let d = state.defaults();
        assert_eq!(d.user.as_deref(), Some(me.name.as_str()));
        assert_eq!(d.workdir.as_deref(), Some(Path::new("/srv/app")));
        assert_eq!(d.env_vars["A"], "1");
        assert_eq!(d.env_vars["B"], "from-init");

        // No user or workdir in the file: the defaults stay unset (the user's home).
        std::fs::write(&path, r#"{"envs": {}}"#).unwrap();
        let state = AgentState::new(StateConfig {
            touch_system: false,
            output_buffer: 1 << 16,
        });
        start_and_wait(&state, &path, Duration::from_secs(5)).await;
        assert_eq!(state.defaults().user, None);
        assert_eq!(state.defaults().workdir, None);
    }
}
