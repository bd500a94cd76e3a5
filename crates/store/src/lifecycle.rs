//! The sandbox lifecycle: its states and the one table of allowed transitions.
//!
//! Every state change the store records goes through [`SandboxState::can_transition_to`], so a
//! sandbox can never come back from `killed` or `lost`, and a `creating` sandbox cannot be paused.
//! `paused` exists now so the persistence layer can use it without a migration.

use std::fmt;
use std::str::FromStr;

/// Where a sandbox is in its life. Stored as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SandboxState {
    /// The API accepted the request; the backend is restoring the VM.
    Creating,
    /// The VM runs and its agent answers.
    Running,
    /// The VM is stopped with its memory and disk kept (pause/resume).
    Paused,
    /// Killed on request, on timeout, or because creation failed. Terminal.
    Killed,
    /// The server no longer knows the VM: it vanished while the server was down or crashed
    /// underneath us. Terminal; the record keeps the reason.
    Lost,
}

impl SandboxState {
    pub const ALL: [SandboxState; 5] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Killed,
        SandboxState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Killed => "killed",
            SandboxState::Lost => "lost",
        }
    }

    /// Terminal states keep the record for history but no VM exists behind them.
    pub fn is_terminal(self) -> bool {
        matches!(self, SandboxState::Killed | SandboxState::Lost)
    }

    /// The single source of truth for which state changes are allowed.
    pub fn can_transition_to(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Creating, Running | Killed | Lost)
                | (Running, Paused | Killed | Lost)
                | (Paused, Running | Killed | Lost)
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("unknown sandbox state")]
pub struct UnknownState;

impl FromStr for SandboxState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(UnknownState)
    }
}

#[cfg(test)]
mod tests {
    use super::SandboxState::{self, *};

    /// Every pair of states, checked against the table written out by hand: the property is the
    /// whole relation, not a sample of it.
    #[test]
    fn transitions_are_exactly_the_documented_ones() {
        let allowed = [
            (Creating, Running),
            (Creating, Killed),
            (Creating, Lost),
            (Running, Paused),
            (Running, Killed),
            (Running, Lost),
            (Paused, Running),
            (Paused, Killed),
            (Paused, Lost),
        ];
        for from in SandboxState::ALL {
            for to in SandboxState::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn terminal_states_have_no_way_out_and_every_live_state_can_end() {
        for from in SandboxState::ALL {
            let outgoing = SandboxState::ALL
                .iter()
                .filter(|to| from.can_transition_to(**to))
                .count();
            if from.is_terminal() {
                assert_eq!(outgoing, 0, "{from} must be terminal");
            } else {
                assert!(from.can_transition_to(Killed), "{from} must be killable");
                assert!(from.can_transition_to(Lost), "{from} can be lost");
                assert!(
                    !from.can_transition_to(from),
                    "{from} -> itself is not a change"
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for st in SandboxState::ALL {
            assert_eq!(st.as_str().parse::<SandboxState>().unwrap(), st);
        }
        assert!("RUNNING".parse::<SandboxState>().is_err());
    }
}
