//! Errors of the agent client.

use std::time::Duration;

/// What can go wrong reaching the agent or in one of its calls.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent {call} failed: {message}")]
    Call { call: &'static str, message: String },
    #[error("the guest agent did not come up within {timeout:?} (last attempt: {last_attempt})")]
    Timeout {
        timeout: Duration,
        last_attempt: String,
    },
    /// The caller's `vm_gone` said the VM is gone while we waited for its agent.
    #[error(transparent)]
    VmGone(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot encode the OCI spec: {0}")]
    Spec(serde_json::Error),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    /// An agent call's error, with the ttrpc status shown as a user reads it.
    pub fn call(call: &'static str, e: ttrpc::Error) -> Self {
        let message = match e {
            ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
            other => other.to_string(),
        };
        AgentError::Call { call, message }
    }
}
