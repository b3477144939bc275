//! What the streaming server needs from the container side. huskd's real backend goes
//! through the shim to the guest; tests plug in local processes.

use std::pin::Pin;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Terminal size, as the resize stream carries it (`{"Width":..,"Height":..}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// An exec request, as CRI's ExecRequest carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// An attach request, as CRI's AttachRequest carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The process's standard streams, as channels. `stdin` ends (`None` from `recv`) at the
/// client's EOF; dropping `stdout`/`stderr` ends them for the client. Each is present only
/// if the request asked for it (no stderr with a tty).
pub struct ExecIo {
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub stdout: Option<mpsc::Sender<Bytes>>,
    pub stderr: Option<mpsc::Sender<Bytes>>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
    /// Becomes true when the client's connection is gone (not merely its stdin closed):
    /// the backend then hangs up the process as a terminal would. A sender dropped without
    /// setting it means the session ended normally.
    pub gone: tokio::sync::watch::Receiver<bool>,
}

/// Resolves once `gone` says the client is gone; never, if the session ends otherwise.
pub async fn client_gone(gone: &mut tokio::sync::watch::Receiver<bool>) {
    if gone.wait_for(|g| *g).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub trait PortStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> PortStream for T {}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub trait StreamBackend: Send + Sync + 'static {
    /// Runs `req.cmd` in the container and returns its exit code.
    fn exec(&self, req: ExecRequest, io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>>;

    /// Attaches to the container's main process until it exits (its exit code) or the
    /// client goes away.
    fn attach(&self, req: AttachRequest, io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>>;

    /// Connects to `port` inside the pod's network namespace.
    fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn PortStream>, BackendError>>;
}
