//! Errors of the sandbox layer.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use husk_vmm_api::VmmExitStatus;

/// What can go wrong creating, driving or cleaning up a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This host cannot run microVMs; the message is `husk check`'s.
    #[error("this host cannot run husk microVMs: {0}")]
    NoKvm(String),
    #[error("cannot find {what}: {hint}")]
    Missing { what: String, hint: String },
    #[error("cannot start {what} ({path}): {source}")]
    Spawn {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} did not come up within {timeout:?}{detail}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
        detail: String,
    },
    #[error("{what} exited early ({status}){detail}")]
    Exited {
        what: &'static str,
        status: String,
        detail: String,
    },
    #[error("husk-vmm exited ({status}){detail}")]
    VmmExited {
        status: VmmExitStatus,
        detail: String,
    },
    #[error("the VMM refused {op}: {source}")]
    Vmm {
        op: &'static str,
        source: husk_vmm_api::ApiError,
    },
    #[error(transparent)]
    Agent(#[from] husk_agent_client::AgentError),
    #[error("no {what} {id:?} in this sandbox")]
    NotFound { what: &'static str, id: String },
    #[error("sandbox state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// Reading the pod's netns or joining it to the VM (netlink, tc).
    #[error("pod network: {op}: {message}")]
    Network { op: String, message: String },
    #[error("host cgroup: {0}")]
    Cgroup(String),
    #[error("cannot jail the VMM: {0}")]
    Jail(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, SandboxError>;

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }
}
