//! Exec, Attach and PortForward: the CRI calls hand out URLs of huskd's streaming server
//! (`crate::streaming`), whose backend here is the shim.
//!
//! Wired so far: exec with stdout and/or stderr (no stdin, no tty), through the shim's
//! Exec task API with output FIFOs, as ExecSync does. Not yet: exec with stdin or a tty
//! (the shim's Exec needs a stdin FIFO and terminal plumbing to the guest, and ResizePty),
//! attach (the container's stdio FIFOs are owned by the log writer). Those answer
//! UNIMPLEMENTED at the CRI call, so no URL leads to a dead end. Port-forward connects
//! through the guest agent ([`crate::port_forward`]).

use std::sync::Arc;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::containers::container_status_code;
use crate::containers::{ContainerError, ContainerState, Containers};
use crate::pods::Pods;
use crate::port_forward::PortForwardError;
use crate::streaming::backend::{
    AttachRequest, BackendError, ExecIo, ExecRequest, PortStream, StreamBackend,
};
use crate::streaming::server::{StreamingError, StreamingServer};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub struct ShimBackend {
    pub containers: Arc<Containers>,
    pub pods: Arc<Pods>,
}

impl StreamBackend for ShimBackend {
    fn exec(&self, req: ExecRequest, io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        Box::pin(async move {
            if io.stdin.is_some() || req.tty {
                // Refused at the CRI call already; a request that got here anyway fails.
                return Err(BackendError::Failed(
                    "exec with stdin or a tty is not supported yet".into(),
                ));
            }
            self.containers
                .exec_streaming(&req.container_id, req.cmd, io.stdout, io.stderr)
                .await
                .map_err(|e| match e {
                    ContainerError::NotFound(id) => BackendError::NotFound(id),
                    e => BackendError::Failed(e.to_string()),
                })
        })
    }

    fn attach(&self, _req: AttachRequest, _io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        Box::pin(async { Err(BackendError::Failed("attach is not supported yet".into())) })
    }

    fn port_forward(
        &self,
        pod: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn PortStream>, BackendError>> {
        let pod = pod.to_string();
        Box::pin(async move {
            match crate::port_forward::connect(&self.pods, &pod, port).await {
                Ok(s) => Ok(Box::new(s) as Box<dyn PortStream>),
                Err(PortForwardError::NotFound(id)) => Err(BackendError::NotFound(id)),
                Err(e) => Err(BackendError::Failed(e.to_string())),
            }
        })
    }
}

fn streaming_status(e: StreamingError) -> Status {
    match e {
        StreamingError::Invalid(m) => Status::invalid_argument(m),
        StreamingError::Token(t) => Status::resource_exhausted(t.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// The CRI Exec call: a URL for a running container's non-interactive exec.
pub(crate) fn exec(
    server: &StreamingServer,
    containers: &Containers,
    req: cri::ExecRequest,
) -> Result<cri::ExecResponse, Status> {
    let c = containers
        .get(&req.container_id)
        .ok_or_else(|| container_status_code(ContainerError::NotFound(req.container_id.clone())))?;
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            req.container_id
        )));
    }
    if req.stdin || req.tty {
        return Err(Status::unimplemented(
            "huskd: exec with stdin or a tty is not supported yet",
        ));
    }
    let url = server
        .exec_url(ExecRequest {
            container_id: req.container_id,
            cmd: req.cmd,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        })
        .map_err(streaming_status)?;
    Ok(cri::ExecResponse { url })
}

/// The CRI PortForward call: a URL for a Ready pod's port-forward (the ports are named per
/// connection by the client, on the streams).
pub(crate) async fn port_forward(
    server: &StreamingServer,
    pods: &Pods,
    req: cri::PortForwardRequest,
) -> Result<cri::PortForwardResponse, Status> {
    crate::port_forward::check_pod(pods, &req.pod_sandbox_id)
        .await
        .map_err(|e| match e {
            PortForwardError::NotFound(_) => Status::not_found(e.to_string()),
            e => Status::failed_precondition(e.to_string()),
        })?;
    if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
        return Err(Status::invalid_argument(format!(
            "port {p} is not in 1..=65535"
        )));
    }
    let url = server
        .port_forward_url(&req.pod_sandbox_id)
        .map_err(streaming_status)?;
    Ok(cri::PortForwardResponse { url })
}
