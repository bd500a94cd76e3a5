//! Agent-wide state: defaults set by /init (env vars, user, workdir), the access token, the
//! process table and filesystem watchers. Shared by every handler behind an `Arc`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::process::ProcessManager;
use crate::users::{UserError, UserInfo};

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Apply /init's clock, hostname and entropy to the system (guest only; never on a host).
    pub touch_system: bool,
    /// Per-process output retention, in bytes.
    pub output_buffer: usize,
}

/// What /init sets and later calls default to.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub env_vars: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<PathBuf>,
    pub sandbox_id: Option<String>,
}

/// Request and failure counters, exposed in Prometheus text by `/metrics?format=prometheus`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub rpc_errors: AtomicU64,
    pub processes_started: AtomicU64,
    pub spawn_failures: AtomicU64,
    pub tunnels_opened: AtomicU64,
    pub tunnels_refused: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct AgentState {
    pub config: StateConfig,
    pub defaults: RwLock<Defaults>,
    token: RwLock<Option<String>>,
    /// Nanoseconds since the epoch of the newest /init timestamp applied; older ones are ignored.
    pub last_init_timestamp: RwLock<Option<i128>>,
    pub processes: Arc<ProcessManager>,
    pub watchers: crate::fs::watch::Watchers,
    pub counters: Counters,
    /// The user the template's start command runs as (the owner of the env file it reads).
    pub template_user: std::sync::OnceLock<UserInfo>,
    /// Mounted volumes and the host's session serving them.
    pub volumes: crate::volumes::Volumes,
}

impl AgentState {
    pub fn new(config: StateConfig) -> Arc<AgentState> {
        let processes = ProcessManager::new(config.output_buffer);
        Arc::new(AgentState {
            config,
            defaults: RwLock::new(Defaults::default()),
            token: RwLock::new(None),
            last_init_timestamp: RwLock::new(None),
            processes,
            watchers: crate::fs::watch::Watchers::default(),
            counters: Counters::default(),
            template_user: std::sync::OnceLock::new(),
            volumes: crate::volumes::Volumes::default(),
        })
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn token_is_set(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Constant-time comparison against the current token; true when no token is set.
    pub fn token_matches(&self, presented: Option<&str>) -> bool {
        let guard = self.token.read().unwrap_or_else(|e| e.into_inner());
        match (guard.as_deref(), presented) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(t), Some(p)) => constant_time_eq(t.as_bytes(), p.as_bytes()),
        }
    }

    pub fn token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// The user a call runs as: the one it names, else /init's default, else `user` when the
    /// sandbox has one, else the agent's own user.
    pub fn resolve_user(&self, requested: Option<&str>) -> Result<UserInfo, UserError> {
        if let Some(name) = requested {
            return UserInfo::lookup(name);
        }
        if let Some(name) = self.defaults().user {
            return UserInfo::lookup(&name);
        }
        match UserInfo::lookup("user") {
            Ok(u) => Ok(u),
            Err(UserError::Unknown(_)) => UserInfo::current(),
            Err(e) => Err(e),
        }
    }
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
