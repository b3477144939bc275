//! The host end of the agent's port-forward service (see `husk_agent::port_forward` for the
//! protocol): a stream to guest vsock port [`husk_proto::AGENT_PORT_FORWARD_VSOCK_PORT`],
//! `PORT <n>\n`, one answer line, then the bytes of the TCP connection in the pod.
//!
//! The guest is not trusted: its answer is read byte by byte up to [`MAX_REPLY`] bytes
//! within [`REPLY_TIMEOUT`], and its error text is shown as data (made printable, never
//! interpreted).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest answer line we accept from the guest.
pub const MAX_REPLY: usize = 512;
/// How long the agent gets to answer: its connect in the pod may take up to 10 s.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    /// The VM's hybrid vsock did not take us to the agent's port-forward service.
    #[error("reach the agent's port-forward service: {0}")]
    Vsock(std::io::Error),
    /// The agent answered with an error: its reason (nothing listens, a bad port, ...).
    #[error("{0}")]
    Refused(String),
    #[error("the agent's port-forward answer: {0}")]
    Protocol(String),
    #[error("the agent did not answer the port-forward request within {0:?}")]
    Timeout(Duration),
}

/// Opens a forwarded connection to `localhost:port` in the pod whose VM's hybrid vsock
/// socket is `uds`. The stream returned carries the connection's bytes.
pub async fn connect(uds: &Path, port: u16) -> Result<UnixStream, PortForwardError> {
    let mut s = crate::connect_port(uds, husk_proto::AGENT_PORT_FORWARD_VSOCK_PORT)
        .await
        .map_err(PortForwardError::Vsock)?;
    request(&mut s, port).await?;
    Ok(s)
}

/// Sends the request for `port` on a stream to the service and reads its answer.
pub async fn request<S>(s: &mut S, port: u16) -> Result<(), PortForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| PortForwardError::Protocol(e.to_string());
    s.write_all(format!("PORT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    // Byte by byte: what follows the newline is the pod's and must stay in the stream.
    let mut line = Vec::with_capacity(64);
    let read = async {
        loop {
            let b = match s.read_u8().await {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(PortForwardError::Protocol(
                        "the agent closed the stream without an answer".into(),
                    ))
                }
                Err(e) => return Err(io(e)),
            };
            if b == b'\n' {
                return Ok(());
            }
            line.push(b);
            if line.len() > MAX_REPLY {
                return Err(PortForwardError::Protocol(format!(
                    "answer longer than {MAX_REPLY} bytes"
                )));
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, read)
        .await
        .map_err(|_| PortForwardError::Timeout(REPLY_TIMEOUT))??;
    parse_reply(&line)
}

/// `OK`, or `ERR <why>` (the reason shown printable, as the guest's data).
pub fn parse_reply(line: &[u8]) -> Result<(), PortForwardError> {
    if line == b"OK" {
        return Ok(());
    }
    let printable = |b: &[u8]| -> String {
        String::from_utf8_lossy(b)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    match line.strip_prefix(b"ERR ") {
        Some(why) => Err(PortForwardError::Refused(printable(why))),
        None => Err(PortForwardError::Protocol(format!(
            "unexpected answer {:?}",
            printable(line)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed() {
        assert!(parse_reply(b"OK").is_ok());
        match parse_reply(b"ERR connect: Connection refused\x1b[2J") {
            Err(PortForwardError::Refused(m)) => {
                assert_eq!(m, "connect: Connection refused [2J")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reply(b"OK then"),
            Err(PortForwardError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn a_long_or_missing_answer_is_an_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let guest = tokio::spawn(async move {
            let mut req = [0u8; 8];
            b.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"PORT 80\n");
            b.write_all(&[b'x'; MAX_REPLY + 10]).await.unwrap();
            b
        });
        assert!(matches!(
            request(&mut a, 80).await,
            Err(PortForwardError::Protocol(_))
        ));
        drop(guest.await.unwrap());

        let (mut a, b) = tokio::io::duplex(4096);
        drop(b);
        assert!(request(&mut a, 80).await.is_err());
    }
}
