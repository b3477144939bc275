//! The agent's ttrpc API, reached through the VMM's hybrid vsock: connect to the vsock Unix
//! socket, send `CONNECT <port>\n`, read `OK <port>\n`, and the stream is the guest's port.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::agent_ttrpc as svc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::context;

use crate::{Result, ShimError};

/// Longest handshake answer we accept ("OK 4294967295\n" is 14 bytes).
const MAX_HANDSHAKE: usize = 64;
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
    pub async fn connect(
        uds: &Path,
        port: u32,
        deadline: Instant,
        mut vm_gone: impl FnMut() -> Option<ShimError>,
    ) -> Result<Agent> {
        let started = Instant::now();
        loop {
            if let Some(e) = vm_gone() {
                return Err(e);
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
                return Err(ShimError::Timeout {
                    what: "the guest agent",
                    timeout: deadline.saturating_duration_since(started),
                    detail: format!(" (last attempt: {last_err})"),
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
