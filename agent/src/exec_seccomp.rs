//! The container's seccomp filter for an exec'd process. libcontainer 0.7's tenant builder
//! (its exec) rebuilds the spec's `linux` from the namespaces, cgroup path, personality and
//! time offsets alone, so an exec'd process would run without the filter its container runs
//! under; runc applies it. Here the executor that runs the exec'd process loads the filter,
//! right before execve.
//!
//! That point comes after libcontainer has dropped the process's capabilities, and the
//! kernel lets a process load a filter only with CAP_SYS_ADMIN or under no_new_privs. So an
//! exec'd process without CAP_SYS_ADMIN gets no_new_privs first, even where its container's
//! spec leaves it unset: a set-uid or file-capability binary it runs gains no privileges.
//! That is stricter than runc, never looser; the other way out, an exec without the
//! container's filter, is not one for a runtime of hostile workloads.

use std::os::fd::{FromRawFd, OwnedFd};

use caps::{CapSet, Capability};
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{LinuxSeccomp, Spec};

/// Runs an exec'd process as libcontainer's default executor does, under `filter`.
#[derive(Clone)]
pub struct SeccompExecutor {
    filter: LinuxSeccomp,
}

impl SeccompExecutor {
    /// The executor for a process exec'd into the container whose spec (as libcontainer
    /// created it) this is; `None` when the container has no filter.
    pub fn for_container(spec: &Spec) -> Option<Self> {
        let filter = spec.linux().as_ref()?.seccomp().clone()?;
        Some(Self { filter })
    }
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        load(&self.filter)?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

fn load(filter: &LinuxSeccomp) -> Result<(), ExecutorError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| ExecutorError::Other(format!("{what}: {e}"));
    let admin = caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN)
        .map_err(|e| fail("read the exec'd process's capabilities", &e))?;
    if !admin {
        nix::sys::prctl::set_no_new_privs().map_err(|e| fail("set no_new_privs", &e))?;
    }
    match libcontainer::seccomp::initialize_seccomp(filter) {
        Ok(None) => Ok(()),
        Ok(Some(fd)) => {
            // SAFETY: libseccomp just created this notify fd for us; nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Err(ExecutorError::Other(
                "the container's seccomp filter notifies a listener (SCMP_ACT_NOTIFY), \
                 which an exec'd process cannot reach"
                    .into(),
            ))
        }
        Err(e) => Err(fail("load the container's seccomp filter", &e)),
    }
}
