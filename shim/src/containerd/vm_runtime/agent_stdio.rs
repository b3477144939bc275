//! A process's stdio as tokio streams, pumped to and from the agent's stdio calls by a task
//! each.

use husk_agent_client::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A process's output from the agent as an `AsyncRead`: a task pulls ReadStdout/ReadStderr
/// into one end of a pipe until EOF.
pub(super) fn output_reader(
    agent: Agent,
    id: String,
    exec_id: String,
    stderr: bool,
) -> Box<dyn tokio::io::AsyncRead + Send + Unpin> {
    let (mut w, r) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        loop {
            match agent.read_output(&id, &exec_id, stderr).await {
                Ok((data, eof)) => {
                    if !data.is_empty() && w.write_all(&data).await.is_err() {
                        return;
                    }
                    if eof {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(%id, %exec_id, "read output: {e}");
                    return;
                }
            }
        }
    });
    Box::new(r)
}

/// The process's stdin as an `AsyncWrite`: a task forwards what is written, and closes the
/// process's stdin at EOF.
pub(super) fn stdin_writer(
    agent: Agent,
    id: String,
    exec_id: String,
) -> Box<dyn tokio::io::AsyncWrite + Send + Unpin> {
    let (w, mut r) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Err(e) = agent.write_stdin(&id, &exec_id, &buf[..n]).await {
                        tracing::warn!(%id, %exec_id, "write stdin: {e}");
                        return;
                    }
                }
            }
        }
        let _ = agent.close_stdin(&id, &exec_id).await;
    });
    Box::new(w)
}
