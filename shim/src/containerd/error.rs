//! Errors of the containerd-facing half of the shim, and how they become the ttrpc statuses
//! containerd acts on (NOT_FOUND means "no such task" to it, so it is only used for that).

use std::path::PathBuf;

use containerd_shim::protos::ttrpc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("runtime options: {0}")]
    Options(String),
    #[error("{0}: no such task or process")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} is not implemented by the husk shim")]
    Unimplemented(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The sandbox layer (VM, agent) failed.
    #[error(transparent)]
    Sandbox(#[from] crate::SandboxError),
    /// An agent call failed.
    #[error(transparent)]
    Agent(#[from] husk_agent_client::AgentError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The ttrpc status code containerd sees.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) | Error::Options(_) | Error::Config { .. } => {
                ttrpc::Code::INVALID_ARGUMENT
            }
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            _ => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
