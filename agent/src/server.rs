//! The ttrpc server: on a Unix socket (host mode) or AF_VSOCK (guest mode).

use std::sync::Arc;

use crate::agent::Agent;
use crate::service::Services;

/// Server failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bad listen address {0:?}: use unix:///path or vsock://-1:<port>")]
    BadAddress(String),
    #[error("listen on {addr}: {source}")]
    Bind { addr: String, source: ttrpc::Error },
    #[error("serve: {0}")]
    Serve(ttrpc::Error),
}

/// A running server.
pub struct Server {
    inner: ttrpc::r#async::Server,
}

impl Server {
    /// Binds `addr` and starts serving the agent's API on it.
    pub async fn start(agent: Arc<Agent>, addr: &str) -> Result<Self, ServerError> {
        if let Some(path) = addr.strip_prefix("unix://") {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
        } else if !addr.starts_with("vsock://") {
            return Err(ServerError::BadAddress(addr.to_string()));
        }
        let mut inner = ttrpc::r#async::Server::new()
            .bind(addr)
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?
            .register_service(Services::new(agent).registry());
        inner.start().await.map_err(ServerError::Serve)?;
        tracing::info!(%addr, "agent API served");
        Ok(Self { inner })
    }

    /// Stops accepting and closes connections.
    pub async fn shutdown(mut self) {
        let _ = self.inner.shutdown().await;
    }
}
