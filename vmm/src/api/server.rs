//! The VMM's side of the socket: an event-manager subscriber that never blocks the loop.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, error, info, warn};

use super::{
    ApiError, ApiHandler, Request, Response, MAX_CLIENTS, MAX_FDS_PER_REQUEST, MAX_REQUEST_SIZE,
};
use husk_vmm_api::scm::{self, ConnectError};

/// Serves the control API on a Unix socket for an [`ApiHandler`].
///
/// Add it to the VMM's `event_manager::EventManager` as a subscriber: it registers the
/// listening socket in `init`, then accepts clients and registers them as they come. Everything
/// is non-blocking; a client that stops reading its responses is only read from again once its
/// pending responses are written (so it cannot make the VMM buffer without bound).
pub struct ApiServer<H: ApiHandler> {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<RawFd, Client>,
    /// The listener was taken out of epoll because accept ran out of fds (a level-triggered
    /// listener would otherwise wake the loop forever); it goes back in when a client leaves.
    listener_paused: bool,
    handler: H,
}

impl<H: ApiHandler> ApiServer<H> {
    /// Binds `path` (mode 0600). A stale socket file there (nobody accepting) is replaced; a
    /// live one, or any other kind of file, is an error.
    pub fn bind(path: impl AsRef<Path>, handler: H) -> Result<ApiServer<H>, ApiError> {
        let path = path.as_ref().to_owned();
        clear_stale_socket(&path)?;
        let bind_err = |source| ApiError::Bind {
            path: path.clone(),
            source,
        };
        // Only the VMM's user (root, or the shim's user) may drive the VMM: mode 0600.
        let listener = crate::listener::bind_published(&path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        info!("api: listening on {}", path.display());
        Ok(ApiServer {
            listener,
            path,
            clients: HashMap::new(),
            listener_paused: false,
            handler,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Fds the server holds for requests not yet complete, over all clients.
    #[cfg(test)]
    pub(crate) fn held_fds(&self) -> usize {
        self.clients
            .values()
            .flat_map(|c| &c.fd_batches)
            .map(|b| b.fds.len())
            .sum()
    }

    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Connected clients (for tests and diagnostics).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    fn accept_clients(&mut self, ops: &mut EventOps) {
        loop {
            // SAFETY: null address pointers are allowed (we do not want the peer address); the
            // result is checked and owned right away.
            let raw = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if raw < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    // The client gave up before we accepted: nothing to do.
                    Some(libc::EINTR | libc::ECONNABORTED) => continue,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        error!("api: cannot accept a client ({err}); pausing the API socket until a client leaves");
                        self.pause_listener(ops);
                        return;
                    }
                    _ => {
                        error!("api: accept on {} failed: {err}", self.path.display());
                        return;
                    }
                }
            }
            // SAFETY: `raw` is a freshly accepted fd that nothing else owns.
            let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
            if self.clients.len() >= MAX_CLIENTS {
                warn!("api: refusing a client: {MAX_CLIENTS} are already connected");
                let line = response_line(&Response::error(format!(
                    "the VMM already has {MAX_CLIENTS} API clients connected; close idle connections and retry"
                )));
                // Best effort; the client is dropped (closed) either way.
                let _ = scm::send_with_fds(raw, &line, &[], libc::MSG_DONTWAIT);
                continue;
            }
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                error!("api: cannot watch a new client: {e}");
                continue;
            }
            debug!(fd = raw, "api: client connected");
            self.clients.insert(raw, Client::new(stream));
        }
    }

    fn pause_listener(&mut self, ops: &mut EventOps) {
        if !self.listener_paused {
            match ops.remove(Events::empty(&self.listener)) {
                Ok(()) => self.listener_paused = true,
                Err(e) => error!("api: cannot pause the listener: {e}"),
            }
        }
    }

    fn drop_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(client) = self.clients.remove(&fd) {
            if let Err(e) = ops.remove(Events::empty(&client.stream)) {
                warn!("api: cannot unwatch a client: {e}");
            }
            debug!(fd, "api: client gone");
            // Dropping `client` closes its socket and any fds of a partial request.
        }
        if self.listener_paused {
            match ops.add(Events::new(&self.listener, EventSet::IN)) {
                Ok(()) => self.listener_paused = false,
                Err(e) => error!("api: cannot resume the listener: {e}"),
            }
        }
    }
}

impl<H: ApiHandler> MutEventSubscriber for ApiServer<H> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            error!(
                "api: cannot watch the API socket {}: {e}",
                self.path.display()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_clients(ops);
            return;
        }
        let Some(client) = self.clients.get_mut(&fd) else {
            warn!(fd, "api: event for an unknown client");
            return;
        };
        match client.on_event(events.event_set(), &mut self.handler) {
            Next::Close => self.drop_client(fd, ops),
            Next::Watch(interest) => {
                if interest != client.interest {
                    client.interest = interest;
                    if let Err(e) = ops.modify(Events::new(&client.stream, interest)) {
                        error!("api: cannot change a client's events: {e}");
                        self.drop_client(fd, ops);
                    }
                }
            }
        }
    }
}

/// Removes a stale socket file at `path` so it can be bound again.
fn clear_stale_socket(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Probe {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_owned()));
    }
    // A server that accepts (or whose backlog is merely full) is alive; refused means stale.
    match scm::connect(path, Instant::now() + Duration::from_millis(100)) {
        Ok(_) | Err(ConnectError::TimedOut) => Err(ApiError::SocketInUse(path.to_owned())),
        Err(ConnectError::PathTooLong) => Err(ApiError::PathTooLong(path.to_owned())),
        Err(ConnectError::Os(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("api: replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(ConnectError::Os(source)) => Err(ApiError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

fn response_line(resp: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(resp).unwrap_or_else(|e| {
        // Cannot happen for a Value-based response; still answer something parseable.
        error!("api: cannot encode a response: {e}");
        br#"{"ok":false,"error":"internal error: cannot encode the response"}"#.to_vec()
    });
    line.push(b'\n');
    line
}

/// Reads of up to 16 KiB per client per wake-up.
const READS_PER_EVENT: usize = 8;

enum Next {
    Watch(EventSet),
    Close,
}

/// File descriptors that arrived with the byte at `pos` of the input buffer.
struct FdBatch {
    pos: usize,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// One connection's framing state.
struct Client {
    stream: UnixStream,
    /// Received bytes not yet consumed as lines.
    input: Vec<u8>,
    /// Fds by the input position they arrived at; positions shift as lines are consumed.
    fd_batches: Vec<FdBatch>,
    /// Skipping the rest of an oversized line (already answered) up to its newline.
    discarding: bool,
    /// Responses not yet written.
    output: Vec<u8>,
    /// What epoll watches for: IN normally, OUT while responses are pending.
    interest: EventSet,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        Client {
            stream,
            input: Vec::new(),
            fd_batches: Vec::new(),
            discarding: false,
            output: Vec::new(),
            interest: EventSet::IN,
        }
    }

    fn on_event(&mut self, set: EventSet, handler: &mut impl ApiHandler) -> Next {
        // Pending responses first; until they are out, read nothing more (back-pressure).
        match self.flush() {
            Ok(true) => {}
            Ok(false) => return Next::Watch(EventSet::OUT),
            Err(()) => return Next::Close,
        }
        // Lines received while we were waiting to write.
        if !self.process_lines(handler) {
            return Next::Watch(EventSet::OUT);
        }
        if !set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            return Next::Watch(EventSet::IN);
        }
        let mut chunk = [0u8; 16 * 1024];
        // A client that keeps writing must not starve the rest of the event loop: after this
        // many reads, yield (epoll is level-triggered, so we come back).
        for _ in 0..READS_PER_EVENT {
            let got = match scm::recv_with_fds(self.stream.as_raw_fd(), &mut chunk) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Next::Watch(EventSet::IN)
                }
                Err(e) => {
                    debug!("api: client read failed: {e}");
                    return Next::Close;
                }
            };
            if got.len == 0 {
                // End of file: anything after the last newline is an unfinished request, dropped
                // with its fds when the client is. Complete lines were handled as they came.
                return Next::Close;
            }
            if !got.fds.is_empty() || got.fds_truncated {
                // A client that sends fds in many pieces of one unfinished line must not pile
                // them up in the VMM (fd exhaustion): past one request's worth, they are closed
                // now and the request is refused when its line ends.
                let held: usize = self.fd_batches.iter().map(|b| b.fds.len()).sum();
                let room = MAX_FDS_PER_REQUEST.saturating_sub(held);
                let mut fds = got.fds;
                let over = fds.len() > room;
                fds.truncate(room);
                self.fd_batches.push(FdBatch {
                    pos: self.input.len(),
                    fds,
                    truncated: got.fds_truncated || over,
                });
            }
            self.input.extend_from_slice(&chunk[..got.len]);
            if !self.process_lines(handler) {
                return Next::Watch(EventSet::OUT);
            }
        }
        Next::Watch(EventSet::IN)
    }

    /// Handles every complete line in the input. Returns false when a response could not be
    /// written out entirely (the rest waits for EPOLLOUT).
    fn process_lines(&mut self, handler: &mut impl ApiHandler) -> bool {
        loop {
            let newline = self.input.iter().position(|&b| b == b'\n');
            if self.discarding {
                let end = newline.map_or(self.input.len(), |i| i + 1);
                self.consume(end);
                if newline.is_none() {
                    return true;
                }
                self.discarding = false;
                continue;
            }
            let response = match newline {
                Some(i) => {
                    let (fds, truncated) = self.take_fds(i + 1);
                    let resp = if i > MAX_REQUEST_SIZE {
                        Some(oversized())
                    } else {
                        handle_line(&self.input[..i], fds, truncated, handler)
                    };
                    self.consume(i + 1);
                    resp
                }
                None if self.input.len() > MAX_REQUEST_SIZE => {
                    self.discarding = true;
                    self.consume(self.input.len());
                    Some(oversized())
                }
                None => return true,
            };
            if let Some(resp) = response {
                self.output.extend_from_slice(&response_line(&resp));
                match self.flush() {
                    Ok(true) => {}
                    // On a write error the next read or write notices too and closes.
                    Ok(false) | Err(()) => return false,
                }
            }
        }
    }

    /// Fds that arrived with the first `len` input bytes.
    fn take_fds(&mut self, len: usize) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        let mut truncated = false;
        let keep = self
            .fd_batches
            .iter()
            .position(|b| b.pos >= len)
            .unwrap_or(self.fd_batches.len());
        for batch in self.fd_batches.drain(..keep) {
            fds.extend(batch.fds);
            truncated |= batch.truncated;
        }
        (fds, truncated)
    }

    /// Drops the first `len` input bytes and the fds that came with them.
    fn consume(&mut self, len: usize) {
        drop(self.take_fds(len));
        self.input.drain(..len);
        for batch in &mut self.fd_batches {
            batch.pos -= len;
        }
    }

    /// Writes pending output. Ok(true): all written; Ok(false): the socket is full; Err: the
    /// client is gone.
    fn flush(&mut self) -> Result<bool, ()> {
        while !self.output.is_empty() {
            match scm::send_with_fds(
                self.stream.as_raw_fd(),
                &self.output,
                &[],
                libc::MSG_DONTWAIT,
            ) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    debug!("api: client write failed: {e}");
                    return Err(());
                }
            }
        }
        Ok(true)
    }
}

fn oversized() -> Response {
    warn!("api: request line over {MAX_REQUEST_SIZE} bytes skipped");
    Response::error(format!(
        "request too long: a request line may be at most {} KiB",
        MAX_REQUEST_SIZE / 1024
    ))
}

/// Parses, checks and dispatches one request line; `None` for a blank line.
fn handle_line(
    line: &[u8],
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
    handler: &mut impl ApiHandler,
) -> Option<Response> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.trim_ascii().is_empty() {
        return None;
    }
    if fds_truncated {
        warn!("api: a request carried too many fds");
        return Some(Response::error(format!(
            "too many file descriptors with one request (at most {MAX_FDS_PER_REQUEST}); \
             the extra ones were closed and the request ignored"
        )));
    }
    let req: Request = match serde_json::from_slice(line) {
        Ok(req) => req,
        Err(e) => {
            warn!("api: malformed request: {e}");
            return Some(Response::error(format!("malformed request: {e}")));
        }
    };
    if let Err(msg) = req.validate(fds.len()) {
        warn!("api: {msg}");
        return Some(Response::error(msg));
    }
    let op = req.op();
    debug!(op, fds = fds.len(), "api: request");
    let resp = handler.handle(req, fds);
    match &resp.error {
        Some(e) => info!(op, "api: refused: {e}"),
        None => debug!(op, "api: done"),
    }
    Some(resp)
}
