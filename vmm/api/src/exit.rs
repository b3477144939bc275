//! The VMM process's exit status, typed: what `husk-vmm` exits with, and what its parent
//! reads back.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// How a `husk-vmm` process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExitStatus {
    /// 0: the guest rebooted or shut down, or the API stopped the VM.
    GuestEnded,
    /// 1: the VM could not be set up (the log says why).
    SetupFailed,
    /// 2: bad command line.
    Usage,
    /// 3: the guest kernel panicked.
    GuestPanic,
    /// 4: a vCPU failed (KVM internal error, failed entry, unhandled exit).
    VcpuError,
    /// Any other exit code: not one husk-vmm gives.
    Other(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl VmmExitStatus {
    /// The process exit code the VMM uses for this status; `None` for a signal.
    pub fn code(self) -> Option<i32> {
        Some(match self {
            VmmExitStatus::GuestEnded => 0,
            VmmExitStatus::SetupFailed => 1,
            VmmExitStatus::Usage => 2,
            VmmExitStatus::GuestPanic => 3,
            VmmExitStatus::VcpuError => 4,
            VmmExitStatus::Other(c) => c,
            VmmExitStatus::Signaled(_) => return None,
        })
    }

    pub fn from_code(code: i32) -> VmmExitStatus {
        match code {
            0 => VmmExitStatus::GuestEnded,
            1 => VmmExitStatus::SetupFailed,
            2 => VmmExitStatus::Usage,
            3 => VmmExitStatus::GuestPanic,
            4 => VmmExitStatus::VcpuError,
            c => VmmExitStatus::Other(c),
        }
    }

    pub fn from_exit_status(status: ExitStatus) -> VmmExitStatus {
        match (status.code(), status.signal()) {
            (Some(code), _) => VmmExitStatus::from_code(code),
            (None, Some(sig)) => VmmExitStatus::Signaled(sig),
            // Stopped or continued: not an exit, but say what we saw.
            (None, None) => VmmExitStatus::Other(status.into_raw()),
        }
    }

    /// Whether the VM ended the orderly way.
    pub fn success(self) -> bool {
        self == VmmExitStatus::GuestEnded
    }
}

impl fmt::Display for VmmExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmExitStatus::GuestEnded => f.write_str("the guest shut down"),
            VmmExitStatus::SetupFailed => f.write_str("exit status 1: VM set-up failed"),
            VmmExitStatus::Usage => f.write_str("exit status 2: usage error"),
            VmmExitStatus::GuestPanic => f.write_str("exit status 3: the guest kernel panicked"),
            VmmExitStatus::VcpuError => f.write_str("exit status 4: a vCPU failed"),
            VmmExitStatus::Other(c) => write!(f, "exit status {c}"),
            VmmExitStatus::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_processes_decode() {
        let run = |script: &str| {
            std::process::Command::new("sh")
                .args(["-c", script])
                .status()
                .unwrap()
        };
        assert_eq!(
            VmmExitStatus::from_exit_status(run("exit 0")),
            VmmExitStatus::GuestEnded
        );
        assert_eq!(
            VmmExitStatus::from_exit_status(run("exit 3")),
            VmmExitStatus::GuestPanic
        );
        assert_eq!(
            VmmExitStatus::from_exit_status(run("exit 4")),
            VmmExitStatus::VcpuError
        );
        assert_eq!(
            VmmExitStatus::from_exit_status(run("exit 9")),
            VmmExitStatus::Other(9)
        );
        let killed = VmmExitStatus::from_exit_status(run("kill -9 $$"));
        assert_eq!(killed, VmmExitStatus::Signaled(libc::SIGKILL));
        assert_eq!(killed.to_string(), "killed by signal 9");
        assert_eq!(killed.code(), None);
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..6 {
            assert_eq!(VmmExitStatus::from_code(code).code(), Some(code));
        }
        assert!(VmmExitStatus::from_code(0).success());
        assert!(!VmmExitStatus::from_code(3).success());
    }
}
