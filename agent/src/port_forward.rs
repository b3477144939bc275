//! Port-forward: TCP connections to `localhost:<port>` in the pod's network namespace, one
//! per stream on a listener of their own (vsock port
//! [`husk_proto::AGENT_PORT_FORWARD_VSOCK_PORT`] in the guest).
//!
//! Why a stream port of its own rather than an RPC of the ttrpc API: a forwarded
//! connection is a byte stream with half-close and back-pressure, for as long as the client
//! keeps it. Carrying it in ttrpc calls would cost a request per chunk and give neither
//! half-close nor flow control; a vsock stream per connection has both from the transport
//! (the VMM's hybrid vsock propagates SHUTDOWN both ways), and the host end is a plain
//! socket that huskd splices into its SPDY stream.
//!
//! The protocol, per stream: the host sends one line `PORT <n>\n` (at most
//! [`MAX_HEADER`] bytes, within [`HEADER_TIMEOUT`]); we check `n` is 1..=65535, connect to
//! `127.0.0.1:n` (then `[::1]:n`, as a dial of `localhost` would) within
//! [`CONNECT_TIMEOUT`], and answer one line: `OK\n`, or `ERR <why>\n` and close. After
//! `OK` the stream carries the connection's bytes both ways; each side's EOF becomes a
//! half-close of the other, and the stream ends when both directions have.
//!
//! Where the pod's network namespace is: in the guest it is the agent's own (every
//! container of the pod joins it: the guest's NIC carries the pod's CNI address, see
//! [`crate::spec`]); in host mode (tests) it is the sandbox's namespace file, which a
//! dedicated thread enters to make the socket.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::agent::Agent;

/// Longest request line we read (`PORT 65535\n` is 11 bytes).
pub const MAX_HEADER: usize = 32;
/// How long the host gets to send its request line.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connect in the pod may take (a firewall that drops SYNs would otherwise
/// hold the stream for the kernel's minutes of retries).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwarded connections at once; more wait for a slot. The VMM allows 1024 vsock
/// connections in all, the agent's API included.
const MAX_CONNECTIONS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("bad listen address {0:?}: use unix:///path or vsock://-1:<port>")]
    BadAddress(String),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no request within {0:?}")]
    RequestTimeout(Duration),
    #[error("connect to localhost:{port} in the pod: {source}")]
    Connect { port: u16, source: std::io::Error },
    #[error("connect to localhost:{port} in the pod: timed out after {timeout:?}")]
    ConnectTimeout { port: u16, timeout: Duration },
    #[error("the pod's network namespace: {0}")]
    Netns(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where port-forward streams arrive.
pub enum Listener {
    Vsock(tokio_vsock::VsockListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Binds `unix:///path` or `vsock://-1:<port>` (any CID: the guest's own).
    pub fn bind(addr: &str) -> Result<Listener, PortForwardError> {
        let bind_err = |source| PortForwardError::Bind {
            addr: addr.to_string(),
            source,
        };
        if let Some(path) = addr.strip_prefix("unix://") {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            return tokio::net::UnixListener::bind(path)
                .map(Listener::Unix)
                .map_err(bind_err);
        }
        let port = addr
            .strip_prefix("vsock://-1:")
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| PortForwardError::BadAddress(addr.to_string()))?;
        let a = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
        tokio_vsock::VsockListener::bind(a)
            .map(Listener::Vsock)
            .map_err(bind_err)
    }
}

trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// Accepts port-forward streams until the task is dropped; each is served on a task of its
/// own.
pub async fn serve(listener: Listener, agent: Arc<Agent>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn: Box<dyn Conn> = match &listener {
            Listener::Vsock(l) => match l.accept().await {
                Ok((s, _)) => Box::new(s),
                Err(e) => {
                    tracing::warn!("port-forward accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Listener::Unix(l) => match l.accept().await {
                Ok((s, _)) => Box::new(s),
                Err(e) => {
                    tracing::warn!("port-forward accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &agent).await {
                tracing::debug!("port-forward: {e}");
            }
            drop(slot);
        });
    }
}

async fn handle(mut conn: Box<dyn Conn>, agent: &Agent) -> Result<(), PortForwardError> {
    let port = match read_request(&mut conn).await {
        Ok(p) => p,
        Err(e) => {
            reply(&mut conn, Err(&e)).await;
            return Err(e);
        }
    };
    let target = match agent.pod_netns().await {
        Ok(netns) => connect(port, netns).await,
        Err(e) => Err(PortForwardError::Netns(e.to_string())),
    };
    let mut tcp = match target {
        Ok(t) => t,
        Err(e) => {
            reply(&mut conn, Err(&e)).await;
            return Err(e);
        }
    };
    reply(&mut conn, Ok(())).await;
    tracing::debug!(port, "port-forward connected");
    // Each direction's EOF shuts down the other side's write half (half-close), and the
    // copy ends once both directions have.
    tokio::io::copy_bidirectional(&mut conn, &mut tcp).await?;
    Ok(())
}

/// Reads `PORT <n>\n` byte by byte: whatever follows the newline is the connection's.
async fn read_request(conn: &mut Box<dyn Conn>) -> Result<u16, PortForwardError> {
    let mut line = Vec::with_capacity(MAX_HEADER);
    let read = async {
        loop {
            let b = conn.read_u8().await?;
            if b == b'\n' {
                return Ok::<_, PortForwardError>(());
            }
            line.push(b);
            if line.len() > MAX_HEADER {
                return Err(PortForwardError::BadRequest(format!(
                    "request line longer than {MAX_HEADER} bytes"
                )));
            }
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read)
        .await
        .map_err(|_| PortForwardError::RequestTimeout(HEADER_TIMEOUT))??;
    parse_request(&line)
}

/// `PORT <n>` with `n` in 1..=65535.
pub fn parse_request(line: &[u8]) -> Result<u16, PortForwardError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| PortForwardError::BadRequest("request is not UTF-8".into()))?;
    let n = text
        .strip_prefix("PORT ")
        .ok_or_else(|| PortForwardError::BadRequest(format!("expected PORT <n>, got {text:?}")))?;
    match n.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PortForwardError::BadRequest(format!(
            "port {n:?} is not in 1..=65535"
        ))),
    }
}

/// Writes the answer line; the error text is made one line.
async fn reply(conn: &mut Box<dyn Conn>, r: Result<(), &PortForwardError>) {
    let line = match r {
        Ok(()) => "OK\n".to_string(),
        Err(e) => format!("ERR {}\n", e.to_string().replace(['\n', '\r'], " ")),
    };
    let _ = conn.write_all(line.as_bytes()).await;
    if r.is_err() {
        let _ = conn.shutdown().await;
    }
}

/// Connects to `localhost:port`: IPv4 first, IPv6 if that is refused (a server listening
/// on `::1` only); the first error is the one reported.
async fn connect(port: u16, netns: Option<PathBuf>) -> Result<TcpStream, PortForwardError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let first = match connect_one(v4, netns.as_deref()).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let refused = matches!(
        &first,
        PortForwardError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused
    );
    if refused {
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        if let Ok(s) = connect_one(v6, netns.as_deref()).await {
            return Ok(s);
        }
    }
    Err(first)
}

async fn connect_one(
    addr: SocketAddr,
    netns: Option<&Path>,
) -> Result<TcpStream, PortForwardError> {
    let port = addr.port();
    let Some(ns) = netns else {
        return match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(r) => r.map_err(|source| PortForwardError::Connect { port, source }),
            Err(_) => Err(PortForwardError::ConnectTimeout {
                port,
                timeout: CONNECT_TIMEOUT,
            }),
        };
    };
    // A socket belongs to the namespace it was made in; setns changes the calling thread
    // for good, so the socket is made on a thread of its own that ends right after.
    let ns = ns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pf-netns".into())
        .spawn(move || {
            let r = (|| {
                let f = std::fs::File::open(&ns)
                    .map_err(|e| PortForwardError::Netns(format!("{}: {e}", ns.display())))?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| PortForwardError::Netns(format!("setns {}: {e}", ns.display())))?;
                std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| {
                    if source.kind() == std::io::ErrorKind::TimedOut {
                        PortForwardError::ConnectTimeout {
                            port,
                            timeout: CONNECT_TIMEOUT,
                        }
                    } else {
                        PortForwardError::Connect { port, source }
                    }
                })
            })();
            let _ = tx.send(r);
        })?;
    let s = rx
        .await
        .map_err(|_| PortForwardError::Netns("the netns thread died".into()))??;
    s.set_nonblocking(true)?;
    Ok(TcpStream::from_std(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        assert_eq!(parse_request(b"PORT 80").unwrap(), 80);
        assert_eq!(parse_request(b"PORT 65535").unwrap(), 65535);
        for bad in [
            &b"PORT 0"[..],
            b"PORT 65536",
            b"PORT -1",
            b"PORT 80 ",
            b"PORT",
            b"port 80",
            b"\xff",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }
}
