//! Terminal processes: receive the pty master libcontainer creates in the container (it sends
//! it over a "console socket", as runc does) and resize it.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::error::{AgentError, Result};

/// A listening console socket waiting for one pty master.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens on `path` (removed again on drop).
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| AgentError::internal(format!("console socket {}", path.display()), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// The socket's path, for the helper.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (blocking, up to `timeout` for each step) for the container to connect and
    /// send the pty master. A container that dies before connecting must not leave this
    /// thread blocked in accept forever.
    pub fn receive_master(&self, timeout: Duration) -> Result<OwnedFd> {
        let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => {
                return Err(AgentError::Internal(format!(
                    "the container did not connect to its console socket within {timeout:?}"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(AgentError::internal("poll on console socket", e)),
        }
        self.listener
            .set_nonblocking(false)
            .map_err(|e| AgentError::internal("console socket", e))?;
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|e| AgentError::internal("accept on console socket", e))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| AgentError::internal("console socket", e))?;
        let mut name = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| AgentError::internal("receive pty master", e))?;
        for c in msg
            .cmsgs()
            .map_err(|e| AgentError::internal("receive pty master", e))?
        {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this fd in our table for us; nothing
                    // else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(AgentError::Internal(
            "the container sent no pty master over the console socket".into(),
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets a pty's window size.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(AgentError::internal(
            "TIOCSWINSZ",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_that_never_connects_is_an_error_not_a_hang() {
        let d = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&d.path().join("c.sock")).unwrap();
        let started = std::time::Instant::now();
        let err = sock
            .receive_master(Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not connect"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
