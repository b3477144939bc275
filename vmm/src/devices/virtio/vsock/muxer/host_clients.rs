//! Host-initiated streams before they reach the guest: accepting clients on the Unix
//! listener and reading their `CONNECT <port>` line (Firecracker's protocol).

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tracing::debug;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{ConnKey, HostPending, Owner, VsockMuxer, FIRST_HOST_PORT, MAX_CONNECTIONS};
use crate::devices::guest_warn::guest_warn;
use crate::devices::virtio::vsock::connection::Connection;

/// A host client has this long to send its `CONNECT <port>` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest acceptable `CONNECT <port>` line.
const MAX_HANDSHAKE_LINE: usize = 32;

impl VsockMuxer {
    pub(super) fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Typically EMFILE: stop watching until a stream closes, or the
                    // level-triggered listener would spin the event loop.
                    guest_warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    self.listen(false);
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                guest_warn!("vsock: too many streams, refusing host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                guest_warn!("vsock: host client: {e}");
                continue;
            }
            let token = self.new_token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                guest_warn!("vsock: cannot watch host client: {e}");
                continue;
            }
            self.owners.insert(token, Owner::Pending);
            self.pending.insert(
                token,
                HostPending {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                },
            );
        }
    }

    pub(super) fn close_pending(&mut self, token: u64) {
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.owners.remove(&token);
        self.stream_closed();
    }

    /// Reads a host client's `CONNECT <port>\n`, a byte at a time so that stream data the
    /// client sends right behind it stays in the socket for the guest.
    pub(super) fn handle_handshake(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let done = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if b[0] == b'\n' => break Ok(()),
                Ok(_) if p.line.len() >= MAX_HANDSHAKE_LINE => break Err("line too long"),
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let port = done.and_then(|()| parse_connect(&p.line).ok_or("bad CONNECT line"));
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                debug!("vsock: dropping host client: {why}");
                self.close_pending(token);
                return;
            }
        };
        let p = self.pending.remove(&token).expect("checked above");
        let local_port = self.alloc_host_port();
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        debug!(
            local_port,
            guest_port = port,
            "vsock: host client connecting"
        );
        let mut conn = Connection::new_local(p.stream, self.guest_cid, local_port, port);
        conn.token = token;
        // Still registered under `token` with IN; `refresh` sets the stream's interest.
        conn.polled = Some(EventSet::IN);
        self.owners.insert(token, Owner::Conn(key));
        *self.local_ports.entry(local_port).or_default() += 1;
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = p.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            // At most MAX_CONNECTIONS are taken, so this ends.
            if !self.local_ports.contains_key(&p) {
                return p;
            }
        }
    }
}

/// Parses `CONNECT <port>` (the keyword in any case, surrounding blanks allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let cmd = words.next()?;
    let port = words.next()?;
    if !cmd.eq_ignore_ascii_case("connect") || words.next().is_some() {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"connect 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect(b"OPEN 1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
