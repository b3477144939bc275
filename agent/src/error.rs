//! The agent's error type: every failure an RPC can report, each mapped to a ttrpc code.

use ttrpc::Code;

/// An error of an agent operation. The variant picks the ttrpc status code the client sees;
/// the message says what was wrong and what to change.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Unknown container, process or interface.
    #[error("{0}")]
    NotFound(String),
    /// A malformed id, path, spec or field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The id is already used.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for this call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A wait ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Anything else: a failed syscall, a broken helper, a libcontainer failure.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// The ttrpc status code for this error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }

    /// Shorthand for an internal error with context.
    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        AgentError::Internal(format!("{context}: {err}"))
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Result of an agent operation.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
