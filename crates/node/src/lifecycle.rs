//! The sandbox state machine, in one place.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SandboxState {
    /// The VM is being restored and the agent initialised.
    Creating,
    Running,
    /// The VM was snapshotted to disk (memory, devices; the disk overlay stays) and stopped: it
    /// uses no CPU and no RAM, and survives restarts of the host process.
    Paused {
        state_sha256: String,
        paused_at_unix_ms: u64,
    },
    /// The VM ended without being asked to (crash, OOM of QEMU, killed from outside, guest
    /// power-off); `reason` says how, for the user and for the LLM reading it.
    Dead {
        reason: String,
    },
    /// Killed on request; the record is about to be removed.
    Killed,
}

impl SandboxState {
    pub fn name(&self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused { .. } => "paused",
            SandboxState::Dead { .. } => "dead",
            SandboxState::Killed => "killed",
        }
    }

    /// Whether `self → next` is allowed.
    pub fn can_become(&self, next: &SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, next),
            (Creating, Running)
                | (Creating, Dead { .. })
                | (Creating, Killed)
                | (Running, Paused { .. })
                | (Running, Dead { .. })
                | (Running, Killed)
                | (Paused { .. }, Running)
                | (Paused { .. }, Killed)
                | (Dead { .. }, Killed)
        )
    }

    pub fn is_live(&self) -> bool {
        matches!(self, SandboxState::Creating | SandboxState::Running)
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SandboxState::Dead { reason } => write!(f, "dead: {reason}"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SandboxState::*;
    use super::*;

    fn all() -> Vec<SandboxState> {
        vec![
            Creating,
            Running,
            Paused {
                state_sha256: "x".into(),
                paused_at_unix_ms: 1,
            },
            Dead { reason: "x".into() },
            Killed,
        ]
    }

    #[test]
    fn killed_is_terminal_and_nothing_returns_to_creating() {
        for s in all() {
            assert!(!Killed.can_become(&s), "killed -> {s}");
            assert!(!s.can_become(&Creating), "{s} -> creating");
        }
    }

    #[test]
    fn every_state_can_be_killed_except_killed() {
        for s in all() {
            assert_eq!(s.can_become(&Killed), s != Killed, "{s}");
        }
    }

    #[test]
    fn only_running_pauses_and_paused_only_resumes_or_dies_by_kill() {
        let paused = Paused {
            state_sha256: "x".into(),
            paused_at_unix_ms: 1,
        };
        for s in all() {
            assert_eq!(s.can_become(&paused), s == Running, "{s} -> paused");
        }
        for s in all() {
            assert_eq!(
                paused.can_become(&s),
                matches!(s, Running | Killed),
                "paused -> {s}"
            );
        }
    }

    #[test]
    fn dead_never_comes_back() {
        let dead = Dead { reason: "x".into() };
        assert!(!dead.can_become(&Running));
    }
}
