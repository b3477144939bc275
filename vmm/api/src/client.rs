//! The blocking client the shim and the tests use.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::scm::{self, ConnectError};
use crate::{ApiError, Request, Response, DEFAULT_TIMEOUT, MAX_FDS_PER_REQUEST, MAX_RESPONSE_SIZE};

/// Sends one request on a fresh connection and waits for its response, all within
/// [`DEFAULT_TIMEOUT`]. `fds` go with the request as `SCM_RIGHTS` (the VMM gets duplicates;
/// the caller's stay open).
///
/// `Ok` means the VMM answered: check `Response::ok` (or use `Response::into_result`).
pub fn request(socket: &Path, req: &Request, fds: &[BorrowedFd]) -> Result<Response, ApiError> {
    request_with_timeout(socket, req, fds, DEFAULT_TIMEOUT)
}

/// [`request`] with another time limit for the whole exchange.
pub fn request_with_timeout(
    socket: &Path,
    req: &Request,
    fds: &[BorrowedFd],
    timeout: Duration,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + timeout;
    ApiClient::connect_until(socket, deadline, timeout)?.send_until(req, fds, deadline)
}

/// A connection for several requests in a row.
pub struct ApiClient {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// Bytes read past the last response's newline (only if the server sent extra lines).
    pending: Vec<u8>,
}

impl ApiClient {
    /// Connects to the VMM's socket; `timeout` bounds the connect and, later, each request.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<ApiClient, ApiError> {
        Self::connect_until(socket, Instant::now() + timeout, timeout)
    }

    fn connect_until(
        socket: &Path,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<ApiClient, ApiError> {
        let stream = scm::connect(socket, deadline).map_err(|e| match e {
            ConnectError::PathTooLong => ApiError::PathTooLong(socket.to_owned()),
            ConnectError::TimedOut => ApiError::Timeout {
                path: socket.to_owned(),
                timeout,
            },
            ConnectError::Os(source) => ApiError::Connect {
                path: socket.to_owned(),
                source,
            },
        })?;
        Ok(ApiClient {
            stream,
            path: socket.to_owned(),
            timeout,
            pending: Vec::new(),
        })
    }

    /// Sends `req` (with `fds`) and waits for its response.
    pub fn send(&mut self, req: &Request, fds: &[BorrowedFd]) -> Result<Response, ApiError> {
        self.send_until(req, fds, Instant::now() + self.timeout)
    }

    fn send_until(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd],
        deadline: Instant,
    ) -> Result<Response, ApiError> {
        if fds.len() > MAX_FDS_PER_REQUEST {
            return Err(ApiError::TooManyFds(fds.len()));
        }
        let mut line = serde_json::to_vec(req).map_err(ApiError::Encode)?;
        line.push(b'\n');
        self.write_line(&line, fds, deadline)?;
        let reply = self.read_line(deadline)?;
        serde_json::from_slice(&reply)
            .map_err(|e| ApiError::BadResponse(format!("{e}: {}", String::from_utf8_lossy(&reply))))
    }

    fn timed_out(&self) -> ApiError {
        ApiError::Timeout {
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }

    /// Time left before `deadline`, as a socket timeout (which must not be zero).
    fn remaining(&self, deadline: Instant) -> Result<Duration, ApiError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timed_out())
        } else {
            Ok(left)
        }
    }

    /// Writes the whole line; the fds ride on the first `sendmsg`, which carries the first byte,
    /// as the protocol requires.
    fn write_line(
        &mut self,
        line: &[u8],
        mut fds: &[BorrowedFd],
        deadline: Instant,
    ) -> Result<(), ApiError> {
        let mut sent = 0;
        while sent < line.len() {
            self.stream
                .set_write_timeout(Some(self.remaining(deadline)?))?;
            match scm::send_with_fds(self.stream.as_raw_fd(), &line[sent..], fds, 0) {
                Ok(n) => {
                    sent += n;
                    fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.timed_out()),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(ApiError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, ApiError> {
        let mut buf = std::mem::take(&mut self.pending);
        let mut scanned = 0;
        loop {
            if let Some(i) = buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                self.pending = buf.split_off(end + 1);
                buf.truncate(end);
                return Ok(buf);
            }
            scanned = buf.len();
            if buf.len() > MAX_RESPONSE_SIZE {
                return Err(ApiError::BadResponse(format!(
                    "response longer than {MAX_RESPONSE_SIZE} bytes"
                )));
            }
            self.stream
                .set_read_timeout(Some(self.remaining(deadline)?))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ApiError::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.timed_out()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ApiError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A socket timeout shows up as `EAGAIN`.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
