//! A process the agent started (a container's init or an exec): its stdio and its exit.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use crate::error::{AgentError, Result};
use crate::fdio::AsyncFdWriter;
use crate::reaper::{ExitInfo, Reaper};
use crate::runtime::ChildStdio;
use crate::stdio::OutputBuffer;

/// The agent's ends of a process's stdio, before the process exists.
pub struct PendingIo {
    /// None when the process reads /dev/null.
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
}

/// Makes pipes for a non-terminal process: the child's ends for the helper and ours.
/// Without `stdin` the child reads /dev/null.
pub fn pipes(stdin: bool) -> Result<(ChildStdio, PendingIo)> {
    let p = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| AgentError::internal("pipe2", e))
    };
    let (child_in, our_in) = if stdin {
        let (r, w) = p()?;
        (r, Some(w))
    } else {
        let null = std::fs::File::open("/dev/null")
            .map_err(|e| AgentError::internal("open /dev/null", e))?;
        (OwnedFd::from(null), None)
    };
    let (out_r, out_w) = p()?;
    let (err_r, err_w) = p()?;
    Ok((
        ChildStdio {
            stdin: child_in,
            stdout: out_w,
            stderr: err_w,
        },
        PendingIo {
            stdin: our_in,
            stdout: out_r,
            stderr: Some(err_r),
        },
    ))
}

/// Our side of a terminal process: the pty master is both its input and its output.
pub fn pty_io(master: OwnedFd) -> Result<PendingIo> {
    let out = master
        .try_clone()
        .map_err(|e| AgentError::internal("dup pty master", e))?;
    Ok(PendingIo {
        stdin: Some(master),
        stdout: out,
        stderr: None,
    })
}

/// A running (or exited) process.
pub struct Process {
    /// The process's id within its container ("" for a container's init).
    pub exec_id: String,
    /// Its pid in the agent's PID namespace.
    pub pid: i32,
    stdin: Mutex<Option<AsyncFdWriter>>,
    pub stdout: Arc<OutputBuffer>,
    pub stderr: Arc<OutputBuffer>,
    /// A terminal process's pty master (for resizing).
    pty: Option<OwnedFd>,
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl Process {
    /// Wraps a started process: pumps its output and watches for its exit.
    pub fn new(exec_id: String, pid: i32, io: PendingIo, reaper: &Reaper) -> Result<Arc<Self>> {
        let terminal = io.stderr.is_none();
        let pty = match (&io.stdin, terminal) {
            (Some(master), true) => Some(
                master
                    .try_clone()
                    .map_err(|e| AgentError::internal("dup pty master", e))?,
            ),
            _ => None,
        };
        let stdout =
            OutputBuffer::pump(io.stdout).map_err(|e| AgentError::internal("stdout pump", e))?;
        let stderr = match io.stderr {
            Some(fd) => {
                OutputBuffer::pump(fd).map_err(|e| AgentError::internal("stderr pump", e))?
            }
            None => OutputBuffer::closed(),
        };
        let stdin = match io.stdin {
            Some(fd) => Some(AsyncFdWriter::new(fd).map_err(|e| AgentError::internal("stdin", e))?),
            None => None,
        };

        let (tx, rx) = watch::channel(None);
        let exited = reaper.watch(pid);
        tokio::spawn(async move {
            if let Ok(info) = exited.await {
                let _ = tx.send(Some(info));
            }
        });
        Ok(Arc::new(Self {
            exec_id,
            pid,
            stdin: Mutex::new(stdin),
            stdout,
            stderr,
            pty,
            exit: rx,
        }))
    }

    /// The exit, if it happened.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits for the exit. Any number of callers may wait.
    pub async fn wait(&self) -> Result<ExitInfo> {
        let mut rx = self.exit.clone();
        let r = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| AgentError::Internal(format!("lost track of pid {}", self.pid)))?;
        Ok(r.expect("wait_for checked is_some"))
    }

    /// Writes to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        let mut guard = self.stdin.lock().await;
        let w = guard.as_mut().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "process {} has no stdin: it was started without stdin = true, or CloseStdin was called",
                self.pid
            ))
        })?;
        w.write_all(data).await.map_err(|e| {
            AgentError::FailedPrecondition(format!("write to stdin of pid {}: {e}", self.pid))
        })
    }

    /// Closes stdin (for a terminal process, sends EOF (^D) instead: the pty stays).
    pub async fn close_stdin(&self) -> Result<()> {
        let mut guard = self.stdin.lock().await;
        if self.pty.is_some() {
            if let Some(w) = guard.as_mut() {
                let _ = w.write_all(&[4]).await;
            }
            return Ok(());
        }
        guard.take();
        Ok(())
    }

    /// Resizes the pty; FailedPrecondition if the process has none.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let pty = self.pty.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "process {} has no terminal: set process.terminal in its spec",
                self.pid
            ))
        })?;
        crate::tty::resize(pty, rows, cols)
    }

    /// Sends a signal unless the process already exited (its pid may be reused by then).
    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.exited().is_some() {
            return Err(AgentError::NotFound(format!(
                "process {} already exited",
                self.pid
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(sig)
            .map_err(|_| AgentError::InvalidArgument(format!("unknown signal {sig}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig)
            .map_err(|e| AgentError::internal(format!("kill({}, {sig})", self.pid), e))
    }
}
