//! Port-forward into a pod: a TCP connection to `localhost:<port>` in the pod's network
//! namespace, which for a VM pod is in the guest. kubelet's streaming library (and
//! containerd 1.6 and CRI-O 1.32 after it) dial 127.0.0.1 in the host-side netns, which
//! for a VM reaches nothing of the pod; here the connection is made by the guest agent.
//!
//! How huskd reaches the agent: the shim publishes the path of the VM's hybrid vsock socket
//! in the sandbox bundle (`husk_proto::VSOCK_ADDRESS_FILE`), and huskd connects to it
//! directly: `CONNECT 1025` (the agent's port-forward service,
//! `husk_proto::AGENT_PORT_FORWARD_VSOCK_PORT`), then `PORT <n>` and the agent's answer
//! (`husk_agent_client::port_forward`). The alternative, the shim proxying each stream,
//! would add a process hop to every forwarded byte and a stream channel the shim v2 API
//! does not have (its ttrpc calls are request/response), for no gain in isolation: huskd
//! and the shim run with the same privileges, and the guest, the untrusted side, is
//! bounded here as there (answer length and time, see the agent client). The file also
//! survives a huskd restart with the bundle, as the pod records do.
//!
//! Every step is bounded in time: a pod whose VM hangs gives an error, never a stuck
//! stream.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use husk_agent_client::port_forward as agent_pf;
use tokio::net::UnixStream;

use crate::pods::{PodState, Pods};

/// Longest vsock address file we read (a socket path is at most 108 bytes).
const MAX_ADDRESS_FILE: u64 = 4096;
/// The whole of one connect: the vsock handshake (5 s), the agent's connect in the pod
/// (10 s) and its answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("pod sandbox {0} not found")]
    NotFound(String),
    #[error("pod sandbox {0} is not ready")]
    NotReady(String),
    #[error("the pod's VM has no published vsock address ({path}): {source}")]
    NoAddress {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] agent_pf::PortForwardError),
    #[error("no connection to the pod within {0:?}")]
    Timeout(Duration),
}

/// Where the pod's VM's hybrid vsock socket is, as the shim published it.
fn vsock_address(bundle: &std::path::Path) -> Result<PathBuf, PortForwardError> {
    use std::os::unix::ffi::OsStrExt;
    let path = bundle.join(husk_proto::VSOCK_ADDRESS_FILE);
    let err = |source| PortForwardError::NoAddress {
        path: path.clone(),
        source,
    };
    let mut buf = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_ADDRESS_FILE).read_to_end(&mut buf))
        .map_err(err)?;
    if buf.is_empty() || buf.len() as u64 >= MAX_ADDRESS_FILE {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "empty or oversized",
        )));
    }
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&buf)))
}

/// Checks the pod can be forwarded to (the CRI PortForward call, before it hands out a URL).
pub async fn check_pod(pods: &Pods, pod_id: &str) -> Result<(), PortForwardError> {
    let pod = pods
        .get(pod_id)
        .await
        .ok_or_else(|| PortForwardError::NotFound(pod_id.to_string()))?;
    if pod.state != PodState::Ready {
        return Err(PortForwardError::NotReady(pod_id.to_string()));
    }
    Ok(())
}

/// Opens a connection to `localhost:port` in the pod's guest.
pub async fn connect(pods: &Pods, pod_id: &str, port: u16) -> Result<UnixStream, PortForwardError> {
    check_pod(pods, pod_id).await?;
    let pod = pods
        .get(pod_id)
        .await
        .ok_or_else(|| PortForwardError::NotFound(pod_id.to_string()))?;
    let uds = vsock_address(pod.bundle())?;
    let s = tokio::time::timeout(CONNECT_TIMEOUT, agent_pf::connect(&uds, port))
        .await
        .map_err(|_| PortForwardError::Timeout(CONNECT_TIMEOUT))??;
    tracing::debug!(pod = %pod_id, port, "port-forward connection open");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_file_is_read_bounded() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            vsock_address(d.path()),
            Err(PortForwardError::NoAddress { .. })
        ));
        let f = d.path().join(husk_proto::VSOCK_ADDRESS_FILE);
        std::fs::write(&f, "/run/husk/sandbox/x/jail/vsock.sock").unwrap();
        assert_eq!(
            vsock_address(d.path()).unwrap(),
            PathBuf::from("/run/husk/sandbox/x/jail/vsock.sock")
        );
        std::fs::write(&f, vec![b'a'; 5000]).unwrap();
        assert!(vsock_address(d.path()).is_err());
        std::fs::write(&f, "").unwrap();
        assert!(vsock_address(d.path()).is_err());
    }
}
