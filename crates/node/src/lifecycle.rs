//! The sandbox state machine, in one place: the states a sandbox can be in, the events that move
//! it, and [`transition`], the pure function that says where an event takes a state or that it
//! cannot happen there.
//!
//! Invariant: every change of a sandbox's state goes through [`transition`], called by
//! [`crate::record::Record::apply`], the only writer of a sandbox's record. Nothing returns to
//! `creating`, and nothing leaves `killed`.
//!
//! ```text
//!    VmStarted ┌────┐
//!              ▼    │       Ready                 Paused
//!    (new) ─► creating ─────────────► running ─────────► paused
//!               │                    │  ▲  ▲  │ Resumed    │
//!               │ Crashed | Vanished │  │  │  └────────────┘
//!               ▼                    │  └──┘ Snapshotted, Restarted
//!              dead ◄────────────────┘ Crashed | Vanished
//!
//!    Killed:     creating | running | paused | dead ─► killed (terminal; the record goes)
//!    NetworkSet: every state but killed, to itself
//! ```

use alcove_net::NetworkConfig;
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
        /// The checksum of what a resume starts from: the memory image, or with `disk_only`
        /// the disk overlay.
        state_sha256: String,
        paused_at_unix_ms: u64,
        /// A filesystem-only pause: no memory image, the resume cold-boots from the disk.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        disk_only: bool,
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

    /// Whether some event takes `self` to `next` (a state of another kind: changes within a
    /// state, such as a restart of a running sandbox, do not count).
    pub fn can_become(&self, next: &SandboxState) -> bool {
        Event::examples()
            .into_iter()
            .filter_map(|e| transition(self, &e).ok())
            .any(|s| s.name() == next.name() && s.name() != self.name())
    }

    /// Whether a VM process exists (or is being started) for the sandbox.
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

/// Something that happened to a sandbox. Events carry the record fields they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The VM process of a sandbox being created runs (recorded before anything else can fail,
    /// so a crash of this process cannot leak the VM).
    VmStarted { pid: u32 },
    /// The agent answered `/init`: the sandbox is usable.
    Ready,
    /// The VM's memory and devices were written to the paused image and the VM ended; or, with
    /// `disk_only`, its disk was flushed and the VM ended (`state_sha256` is then the disk's).
    Paused {
        state_sha256: String,
        at_unix_ms: u64,
        disk_only: bool,
    },
    /// A paused sandbox's VM runs again from its image.
    Resumed { pid: u32 },
    /// The sandbox's disk was frozen as snapshot `snapshot_id`'s layer; its overlay sits on it.
    Snapshotted { snapshot_id: String },
    /// A running sandbox's VM was restarted from its own memory image (after a snapshot).
    Restarted { pid: u32 },
    /// The VM ended on its own, or could not be brought back, while this process watched.
    Crashed { reason: String },
    /// The VM was found gone when a process picked the sandbox up again.
    Vanished { reason: String },
    /// Killed on request.
    Killed,
    /// The egress rules were replaced.
    NetworkSet { network: NetworkConfig },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::VmStarted { .. } => "vm_started",
            Event::Ready => "ready",
            Event::Paused { .. } => "paused",
            Event::Resumed { .. } => "resumed",
            Event::Snapshotted { .. } => "snapshotted",
            Event::Restarted { .. } => "restarted",
            Event::Crashed { .. } => "crashed",
            Event::Vanished { .. } => "vanished",
            Event::Killed => "killed",
            Event::NetworkSet { .. } => "network_set",
        }
    }

    /// Why the state changed, for the log line every change writes.
    pub fn reason(&self) -> String {
        match self {
            Event::VmStarted { pid } => format!("VM process {pid} started"),
            Event::Ready => "the agent accepted /init".into(),
            Event::Paused {
                disk_only: false, ..
            } => "paused on request: memory image written, VM ended".into(),
            Event::Paused {
                disk_only: true, ..
            } => "paused on request (filesystem only): disk flushed, VM ended".into(),
            Event::Resumed { pid } => format!("resumed on request as VM process {pid}"),
            Event::Snapshotted { snapshot_id } => {
                format!("disk frozen as snapshot {snapshot_id}")
            }
            Event::Restarted { pid } => format!("VM restarted from its image as process {pid}"),
            Event::Crashed { reason } | Event::Vanished { reason } => reason.clone(),
            Event::Killed => "killed on request".into(),
            Event::NetworkSet { .. } => "egress rules replaced".into(),
        }
    }

    /// One event of every kind, for tables and tests.
    pub fn examples() -> Vec<Event> {
        vec![
            Event::VmStarted { pid: 1 },
            Event::Ready,
            Event::Paused {
                state_sha256: "x".into(),
                at_unix_ms: 1,
                disk_only: false,
            },
            Event::Resumed { pid: 1 },
            Event::Snapshotted {
                snapshot_id: "s".into(),
            },
            Event::Restarted { pid: 1 },
            Event::Crashed { reason: "x".into() },
            Event::Vanished { reason: "x".into() },
            Event::Killed,
            Event::NetworkSet {
                network: NetworkConfig::default(),
            },
        ]
    }
}

/// An event that cannot happen in the state the sandbox is in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a sandbox that is {from} cannot be {event}; read its state again (GET the sandbox) and act on that"
)]
pub struct TransitionError {
    pub from: &'static str,
    pub event: &'static str,
}

/// Where `event` takes a sandbox in state `from`. Pure: the caller writes the result.
pub fn transition(from: &SandboxState, event: &Event) -> Result<SandboxState, TransitionError> {
    use SandboxState as S;
    let next = match (from, event) {
        (S::Creating, Event::VmStarted { .. }) => Some(S::Creating),
        (S::Creating, Event::Ready) => Some(S::Running),
        (
            S::Running,
            Event::Paused {
                state_sha256,
                at_unix_ms,
                disk_only,
            },
        ) => Some(S::Paused {
            state_sha256: state_sha256.clone(),
            paused_at_unix_ms: *at_unix_ms,
            disk_only: *disk_only,
        }),
        (S::Paused { .. }, Event::Resumed { .. }) => Some(S::Running),
        (S::Running, Event::Snapshotted { .. } | Event::Restarted { .. }) => Some(S::Running),
        (S::Creating | S::Running, Event::Crashed { reason } | Event::Vanished { reason }) => {
            Some(S::Dead {
                reason: reason.clone(),
            })
        }
        (S::Creating | S::Running | S::Paused { .. } | S::Dead { .. }, Event::Killed) => {
            Some(S::Killed)
        }
        (S::Killed, Event::NetworkSet { .. }) => None,
        (s, Event::NetworkSet { .. }) => Some(s.clone()),
        _ => None,
    };
    next.ok_or(TransitionError {
        from: from.name(),
        event: event.name(),
    })
}

#[cfg(test)]
mod tests {
    use super::SandboxState::*;
    use super::*;

    fn states() -> Vec<SandboxState> {
        vec![
            Creating,
            Running,
            Paused {
                state_sha256: "x".into(),
                paused_at_unix_ms: 1,
                disk_only: false,
            },
            Dead { reason: "x".into() },
            Killed,
        ]
    }

    /// The whole table, written out: `(state, event) -> next state's name`, `None` = illegal.
    fn expected(state: &str, event: &str) -> Option<&'static str> {
        let row: &[(&str, &'static str)] = match state {
            "creating" => &[
                ("vm_started", "creating"),
                ("ready", "running"),
                ("crashed", "dead"),
                ("vanished", "dead"),
                ("killed", "killed"),
                ("network_set", "creating"),
            ],
            "running" => &[
                ("paused", "paused"),
                ("snapshotted", "running"),
                ("restarted", "running"),
                ("crashed", "dead"),
                ("vanished", "dead"),
                ("killed", "killed"),
                ("network_set", "running"),
            ],
            "paused" => &[
                ("resumed", "running"),
                ("killed", "killed"),
                ("network_set", "paused"),
            ],
            "dead" => &[("killed", "killed"), ("network_set", "dead")],
            "killed" => &[],
            other => panic!("state {other} missing from the table"),
        };
        row.iter().find(|(e, _)| *e == event).map(|(_, next)| *next)
    }

    #[test]
    fn every_state_and_event_against_the_table() {
        let mut checked = 0;
        for s in states() {
            for e in Event::examples() {
                let got = transition(&s, &e);
                match expected(s.name(), e.name()) {
                    Some(next) => {
                        let got = got.unwrap_or_else(|err| panic!("{s} + {}: {err}", e.name()));
                        assert_eq!(got.name(), next, "{s} + {}", e.name());
                    }
                    None => assert_eq!(
                        got,
                        Err(TransitionError {
                            from: s.name(),
                            event: e.name()
                        }),
                        "{s} + {} should be illegal",
                        e.name()
                    ),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 5 * 10);
    }

    #[test]
    fn events_carry_their_data_into_the_state() {
        let paused = transition(
            &Running,
            &Event::Paused {
                state_sha256: "abc".into(),
                at_unix_ms: 7,
                disk_only: true,
            },
        )
        .unwrap();
        assert_eq!(
            paused,
            Paused {
                state_sha256: "abc".into(),
                paused_at_unix_ms: 7,
                disk_only: true,
            }
        );
        let dead = transition(&Running, &Event::Crashed { reason: "r".into() }).unwrap();
        assert_eq!(dead, Dead { reason: "r".into() });
    }

    #[test]
    fn killed_is_terminal_and_nothing_returns_to_creating() {
        for s in states() {
            assert!(!Killed.can_become(&s), "killed -> {s}");
            assert!(!s.can_become(&Creating), "{s} -> creating");
        }
    }

    #[test]
    fn every_state_can_be_killed_except_killed() {
        for s in states() {
            assert_eq!(s.can_become(&Killed), s != Killed, "{s}");
        }
    }

    #[test]
    fn only_running_pauses_and_paused_only_resumes_or_dies_by_kill() {
        let paused = Paused {
            state_sha256: "x".into(),
            paused_at_unix_ms: 1,
            disk_only: false,
        };
        for s in states() {
            assert_eq!(s.can_become(&paused), s == Running, "{s} -> paused");
        }
        for s in states() {
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
