//! Errors of the host side of a sandbox.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong launching a microVM or talking to its agent.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
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
    #[error("the VMM refused {op}: {source}")]
    Vmm {
        op: &'static str,
        source: vmm::api::ApiError,
    },
    #[error("agent {call} failed: {message}")]
    Agent { call: &'static str, message: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ShimError>;

impl ShimError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ShimError::Io {
            context: context.into(),
            source,
        }
    }

    /// An agent call's error, with the ttrpc status shown as a user reads it.
    pub fn agent(call: &'static str, e: ttrpc::Error) -> Self {
        let message = match e {
            ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
            other => other.to_string(),
        };
        ShimError::Agent { call, message }
    }
}
