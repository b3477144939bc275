//! Resource limits of a jailed VMM (Firecracker's jailer sets the same two): what a guest that
//! took over the VMM could still consume through it.

use std::io;

use super::JailError;

/// Default open-file limit: the VMM's own fds (KVM, eventfds, devices) are a few dozen, and the
/// vsock device caps its streams well below this (`MAX_CONNECTIONS`).
pub const DEFAULT_NOFILE: u64 = 2048;
/// Default file-size floor: the capped console log and the VMM's own log stay far below it.
/// Writable disks raise it to their size (a write past the limit fails, even inside an
/// existing file).
pub const DEFAULT_FSIZE_FLOOR: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_NOFILE`: most fds the VMM may hold.
    pub nofile: u64,
    /// `RLIMIT_FSIZE`: largest file offset the VMM may write at, in bytes.
    pub fsize: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            nofile: DEFAULT_NOFILE,
            fsize: DEFAULT_FSIZE_FLOOR,
        }
    }
}

impl ResourceLimits {
    /// Sets both limits (soft and hard, so they cannot be raised again), and ignores SIGXFSZ:
    /// a write past `fsize` then fails with `EFBIG` instead of killing the VMM. Lowering a hard
    /// limit needs no privilege, so this works without `CAP_SYS_RESOURCE`; raising one above
    /// the current hard limit is refused, and reported.
    pub fn apply(&self) -> Result<(), JailError> {
        set(libc::RLIMIT_NOFILE, self.nofile, "setrlimit(RLIMIT_NOFILE)")?;
        set(libc::RLIMIT_FSIZE, self.fsize, "setrlimit(RLIMIT_FSIZE)")?;
        // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ; no handler code runs.
        if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(JailError::Syscall {
                step: "ignoring SIGXFSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

fn set(
    resource: libc::__rlimit_resource_t,
    value: u64,
    step: &'static str,
) -> Result<(), JailError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(JailError::Syscall {
            step,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The current (soft, hard) limits of `resource`.
#[cfg(test)]
pub fn get(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
    (limit.rlim_cur, limit.rlim_max)
}
