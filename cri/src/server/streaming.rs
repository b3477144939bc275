//! Exec, Attach and PortForward: the CRI calls hand out URLs of huskd's streaming server
//! (`crate::streaming`), whose backend here is the shim.
//!
//! Exec (any of stdin/stdout/stderr, with or without a tty) runs through the shim's Exec
//! task API with FIFOs (`containers/exec_stream.rs`); attach streams the container's own
//! stdio (`containers/attach.rs`); port-forward connects inside the guest, through the
//! agent ([`crate::port_forward`]).

use std::sync::Arc;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::containers::container_status_code;
use crate::containers::{ContainerError, ContainerState, Containers, ProcessStreams};
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
            self.containers
                .exec_stream(&req.container_id, req.cmd, req.tty, streams(io))
                .await
                .map_err(backend_err)
        })
    }

    fn attach(&self, req: AttachRequest, io: ExecIo) -> BoxFuture<'_, Result<i32, BackendError>> {
        Box::pin(async move {
            self.containers
                .attach(&req.container_id, streams(io))
                .await
                .map_err(backend_err)
        })
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

fn backend_err(e: ContainerError) -> BackendError {
    match e {
        ContainerError::NotFound(id) => BackendError::NotFound(id),
        e => BackendError::Failed(e.to_string()),
    }
}

/// The streaming layer's channels in the container layer's terms.
fn streams(io: ExecIo) -> ProcessStreams {
    let resize = io.resize.map(|mut rx| {
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                if tx.send((s.width, s.height)).await.is_err() {
                    return;
                }
            }
        });
        out
    });
    ProcessStreams {
        stdin: io.stdin,
        stdout: io.stdout,
        stderr: io.stderr,
        resize,
        gone: io.gone,
    }
}

fn streaming_status(e: StreamingError) -> Status {
    match e {
        StreamingError::Invalid(m) => Status::invalid_argument(m),
        StreamingError::Token(t) => Status::resource_exhausted(t.to_string()),
        e => Status::internal(e.to_string()),
    }
}

/// Container `id`, which must be running: NotFound or FailedPrecondition otherwise.
fn running(containers: &Containers, id: &str) -> Result<crate::containers::Container, Status> {
    let c = containers
        .get(id)
        .ok_or_else(|| container_status_code(ContainerError::NotFound(id.into())))?;
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {id} is not running"
        )));
    }
    Ok(c)
}

/// The CRI Exec call: a URL for an exec in a running container.
pub(crate) fn exec(
    server: &StreamingServer,
    containers: &Containers,
    req: cri::ExecRequest,
) -> Result<cri::ExecResponse, Status> {
    running(containers, &req.container_id)?;
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

/// The CRI Attach call: a URL to attach to a running container's stdio. Asking for stdin
/// of a container created without it, or whose stdin is closed, is refused here.
pub(crate) fn attach(
    server: &StreamingServer,
    containers: &Containers,
    req: cri::AttachRequest,
) -> Result<cri::AttachResponse, Status> {
    let c = running(containers, &req.container_id)?;
    if req.stdin {
        if !c.config.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} was not created with stdin",
                req.container_id
            )));
        }
        if let Some(why) = containers.stdin_closed(&req.container_id) {
            return Err(container_status_code(ContainerError::StdinClosed {
                id: req.container_id,
                why,
            }));
        }
    }
    let url = server
        .attach_url(AttachRequest {
            container_id: req.container_id,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        })
        .map_err(streaming_status)?;
    Ok(cri::AttachResponse { url })
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
