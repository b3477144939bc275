//! Non-blocking async reads and writes on raw pipe and pty fds (tokio's pipe type refuses
//! pty masters, which are character devices).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open until dropped and always returns the same fd, and the
    // AsyncFd owns it for its whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Reads an fd asynchronously.
pub struct AsyncFdReader {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncFdReader {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self { fd: register(fd)? })
    }

    /// Reads some bytes; `Ok(0)` at EOF.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Writes to an fd asynchronously.
pub struct AsyncFdWriter {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncFdWriter {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self { fd: register(fd)? })
    }

    /// Writes all of `data`.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// The fd, e.g. for a pty resize ioctl.
    pub fn fd(&self) -> &OwnedFd {
        self.fd.get_ref()
    }
}
