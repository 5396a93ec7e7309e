//! The guest state machine: what the daemon believes a domain's QEMU is doing.
//!
//! ```text
//!                 Started{paused:false}
//!   ┌──────────┐ ───────────────────────▶ ┌─────────┐  Stopped   ┌────────┐
//!   │ Shutoff  │                          │ Running │ ─────────▶ │ Paused │
//!   └──────────┘ ◀─── Exited{expected} ── └─────────┘ ◀───────── └────────┘
//!        ▲   ▲                               │        Resumed       │
//!        │   └──────── Exited{expected} ─────┼──────────────────────┘
//!        │                                   │ Exited{!expected}
//!        │ Started                           ▼     (also from Paused)
//!        └──────────────────────────────  ┌─────────┐
//!                                         │ Crashed │
//!                                         └─────────┘
//! ```
//! `Started{paused:true}` leads from Shutoff or Crashed to Paused. An exit is expected when the
//! daemon asked for it (destroy, shutdown) or QEMU announced a `SHUTDOWN` first; any other exit
//! is a crash. Events that make no sense in a state (a `STOP` while shut off) leave it as it is.

use vmsnap_dbus::names::state;

/// What the daemon believes the guest is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// No QEMU process.
    Shutoff,
    /// vCPUs run.
    Running,
    /// vCPUs are stopped.
    Paused,
    /// QEMU ended without being asked to.
    Crashed,
}

/// Something that changes the guest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// QEMU is up; `paused` when its vCPUs are stopped.
    Started {
        /// Whether the vCPUs are stopped.
        paused: bool,
    },
    /// QMP `STOP`.
    Stopped,
    /// QMP `RESUME`.
    Resumed,
    /// The QEMU process is gone.
    Exited {
        /// Whether the exit was asked for or announced.
        expected: bool,
    },
}

impl GuestState {
    /// The state after `event`; exhaustive so that a new state or event must be thought through.
    pub fn transition(self, event: GuestEvent) -> GuestState {
        use GuestEvent as E;
        use GuestState as S;
        match (self, event) {
            (S::Shutoff | S::Crashed, E::Started { paused: false }) => S::Running,
            (S::Shutoff | S::Crashed, E::Started { paused: true }) => S::Paused,
            (S::Running | S::Paused, E::Started { paused }) => {
                if paused {
                    S::Paused
                } else {
                    S::Running
                }
            }
            (S::Running | S::Paused, E::Stopped) => S::Paused,
            (S::Running | S::Paused, E::Resumed) => S::Running,
            (S::Shutoff | S::Crashed, E::Stopped | E::Resumed) => self,
            (S::Running | S::Paused, E::Exited { expected: true }) => S::Shutoff,
            (S::Running | S::Paused, E::Exited { expected: false }) => S::Crashed,
            (S::Shutoff | S::Crashed, E::Exited { .. }) => self,
        }
    }

    /// The spelling used on D-Bus and in the client.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::Shutoff => state::SHUTOFF,
            GuestState::Running => state::RUNNING,
            GuestState::Paused => state::PAUSED,
            GuestState::Crashed => state::CRASHED,
        }
    }

    /// Whether a QEMU process is there.
    pub fn is_active(self) -> bool {
        matches!(self, GuestState::Running | GuestState::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::GuestEvent as E;
    use super::GuestState as S;

    #[test]
    fn transition_unexpected_exit_is_crash() {
        assert_eq!(
            S::Running.transition(E::Exited { expected: false }),
            S::Crashed
        );
        assert_eq!(
            S::Paused.transition(E::Exited { expected: false }),
            S::Crashed
        );
        assert_eq!(
            S::Running.transition(E::Exited { expected: true }),
            S::Shutoff
        );
    }

    #[test]
    fn transition_pause_resume_cycle() {
        let s = S::Shutoff.transition(E::Started { paused: false });
        assert_eq!(s, S::Running);
        let s = s.transition(E::Stopped);
        assert_eq!(s, S::Paused);
        assert_eq!(s.transition(E::Resumed), S::Running);
    }

    #[test]
    fn transition_events_while_off_are_ignored() {
        for s in [S::Shutoff, S::Crashed] {
            assert_eq!(s.transition(E::Stopped), s);
            assert_eq!(s.transition(E::Resumed), s);
            assert_eq!(s.transition(E::Exited { expected: false }), s);
        }
        assert_eq!(
            S::Crashed.transition(E::Started { paused: true }),
            S::Paused
        );
    }
}
