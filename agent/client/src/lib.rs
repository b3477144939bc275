//! husk-agent-client: the agent's ttrpc API, reached through the VMM's hybrid vsock: connect
//! to the vsock Unix socket, send `CONNECT <port>\n`, read `OK <port>\n`, and the stream is
//! the guest's port. The shim, `husk run`, the agent's own tests and the KVM tests all drive
//! the agent through [`Agent`].

mod error;
pub mod port_forward;

use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use husk_proto::agent_ttrpc as svc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::context;

pub use error::{AgentError, Result};

/// Longest handshake answer we accept ("OK 4294967295\n" is 14 bytes).
const MAX_HANDSHAKE: usize = 64;
/// Deadline of each agent call that does not wait on a process.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one handshake may take once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients for every agent service, sharing one connection.
#[derive(Clone)]
pub struct Agent {
    pub health: svc::HealthClient,
    pub sandbox: svc::SandboxClient,
    pub containers: svc::ContainersClient,
    pub io: svc::IoClient,
    pub events: svc::EventsClient,
    pub network: svc::NetworkClient,
}

impl Agent {
    /// Clients over an established ttrpc connection.
    pub fn from_client(client: ttrpc::r#async::Client) -> Agent {
        Agent {
            health: svc::HealthClient::new(client.clone()),
            sandbox: svc::SandboxClient::new(client.clone()),
            containers: svc::ContainersClient::new(client.clone()),
            io: svc::IoClient::new(client.clone()),
            events: svc::EventsClient::new(client.clone()),
            network: svc::NetworkClient::new(client),
        }
    }

    /// Connects to the agent on guest `port` through the hybrid vsock at `uds`, retrying
    /// until it answers `Health.Check` or `deadline` passes. `vm_gone` is asked between
    /// attempts: once it returns an error (the VMM exited) there is no point waiting.
    pub async fn connect<E>(
        uds: &Path,
        port: u32,
        deadline: Instant,
        mut vm_gone: impl FnMut() -> Option<E>,
    ) -> Result<Agent>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        loop {
            if let Some(e) = vm_gone() {
                return Err(AgentError::VmGone(Box::new(e)));
            }
            let last_err = match connect_port(uds, port).await {
                Ok(stream) => {
                    let client =
                        ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
                    let agent = Agent::from_client(client);
                    match agent
                        .health
                        .check(
                            ctx(Duration::from_secs(5)),
                            &husk_proto::agent::CheckRequest::new(),
                        )
                        .await
                    {
                        Ok(_) => return Ok(agent),
                        Err(e) => format!("Health.Check: {e}"),
                    }
                }
                // Until the agent listens, the guest resets our stream: the VMM hangs up.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    format!("nothing listens on guest port {port} yet")
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(AgentError::Timeout {
                    timeout: deadline.saturating_duration_since(started),
                    last_attempt: last_err,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A stream to guest `port` through the hybrid vsock socket `uds`.
pub async fn connect_port(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Byte by byte: whatever follows the newline is the guest's, and must stay in the socket.
    let mut line = Vec::with_capacity(16);
    let read = async {
        loop {
            let b = s.read_u8().await?;
            if b == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            line.push(b);
            if line.len() > MAX_HANDSHAKE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "hybrid vsock handshake answer too long",
                ));
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNECT answer"))??;
    let answer = String::from_utf8_lossy(&line);
    if answer.starts_with("OK ") {
        Ok(s)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock refused CONNECT {port}: {answer:?}"),
        ))
    }
}

/// A ttrpc context with a deadline.
pub fn ctx(timeout: Duration) -> context::Context {
    context::with_timeout(timeout.as_nanos() as i64)
}

/// Where a container's root filesystem comes from: a share tag and a path inside it.
#[derive(Clone, Debug)]
pub struct Rootfs {
    pub share_tag: String,
    pub path: String,
}

impl Rootfs {
    /// An image embedded in the guest's initramfs.
    pub fn embedded(image: &str) -> Rootfs {
        Rootfs {
            share_tag: husk_proto::EMBEDDED_SHARE_TAG.into(),
            path: image.into(),
        }
    }
}

/// The calls every client makes, with errors a user can read. Deadlines: `CALL_TIMEOUT` for
/// calls that do not wait on a process; none for those that do.
impl Agent {
    pub async fn create_sandbox(&self, req: &pb::CreateSandboxRequest) -> Result<()> {
        self.sandbox
            .create_sandbox(ctx(CALL_TIMEOUT), req)
            .await
            .map_err(|e| AgentError::call("CreateSandbox", e))?;
        Ok(())
    }

    pub async fn destroy_sandbox(&self, timeout_ms: u32) -> Result<()> {
        let mut req = pb::DestroySandboxRequest::new();
        req.timeout_ms = timeout_ms;
        self.sandbox
            .destroy_sandbox(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| AgentError::call("DestroySandbox", e))?;
        Ok(())
    }

    /// CreateContainer with the spec as JSON.
    pub async fn create_container(
        &self,
        id: &str,
        spec: &serde_json::Value,
        rootfs: &Rootfs,
        stdin: bool,
    ) -> Result<()> {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(spec).map_err(AgentError::Spec)?;
        let mut root = pb::RootfsSource::new();
        root.share_tag = rootfs.share_tag.clone();
        root.path = rootfs.path.clone();
        req.rootfs = Some(root).into();
        req.stdin = stdin;
        self.containers
            .create_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| AgentError::call("CreateContainer", e))?;
        Ok(())
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        self.containers
            .start_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| AgentError::call("StartContainer", e))?;
        Ok(())
    }

    /// Waits for a process (`exec_id` "" is the container's init) to exit, however long.
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<pb::WaitProcessResponse> {
        let mut req = pb::ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.containers
            .wait_process(context::Context::default(), &req)
            .await
            .map_err(|e| AgentError::call("WaitProcess", e))
    }

    pub async fn remove_container(&self, id: &str, timeout_ms: u32) -> Result<()> {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout_ms = timeout_ms;
        self.containers
            .remove_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| AgentError::call("RemoveContainer", e))?;
        Ok(())
    }

    /// One read of a process's stdout (or stderr): the data, and whether it ended. Waits
    /// for output however long.
    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<(Vec<u8>, bool)> {
        let mut req = pb::ReadStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        let c = context::Context::default();
        let r = if stderr {
            self.io.read_stderr(c, &req).await
        } else {
            self.io.read_stdout(c, &req).await
        }
        .map_err(|e| AgentError::call(if stderr { "ReadStderr" } else { "ReadStdout" }, e))?;
        Ok((r.data, r.eof))
    }

    /// Writes all of `data` to a process's stdin.
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        let mut req = pb::WriteStdinRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.data = data.to_vec();
        self.io
            .write_stdin(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| AgentError::call("WriteStdin", e))?;
        Ok(())
    }

    /// Closes a process's stdin, so it reads EOF.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let mut req = pb::ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.io
            .close_stdin(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| AgentError::call("CloseStdin", e))?;
        Ok(())
    }

    /// A process's whole stdout (or stderr), to EOF.
    pub async fn read_to_end(&self, id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (data, eof) = self.read_output(id, exec_id, stderr).await?;
            out.extend_from_slice(&data);
            if eof {
                return Ok(out);
            }
        }
    }
}
