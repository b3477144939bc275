//! One vsock stream: its state machine and its credit accounting (virtio spec 5.10.6.3).
//!
//! Directions, from the device's point of view:
//! - guest → host ("tx"): bytes arrive in RW packets and go to the host socket. What the host
//!   does not take at once waits in `tx_buf`, which never holds more than the `buf_alloc` we
//!   advertise: the guest cannot send more than that without breaking the protocol, so a slow
//!   host reader stalls only its own guest sender. `fwd_cnt` counts bytes handed to the host.
//! - host → guest ("rx"): nothing is buffered here. When the guest has both credit and an RX
//!   buffer, we read from the host socket straight into the packet; otherwise the bytes wait
//!   in the kernel's socket buffer and we stop polling the socket for input.
//!
//! The connection never touches epoll or the queues itself: the muxer asks it what it wants
//! (`interest`, `has_pending_rx`, `doomed`) after every event.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tracing::debug;
use vmm_sys_util::epoll::EventSet;

use super::host_sock::send_nosignal;
use super::packet::*;
use super::HOST_CID;
use crate::devices::guest_warn::guest_warn;

/// The receive buffer we advertise to the guest for each stream (guest → host bytes).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed space once it is this far behind; with the guest only stalling
/// when its view of our free space hits zero, this always fires before it waits forever.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// How long the guest gets to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest may take to answer our SHUTDOWN with its RST before we reset the stream
/// anyway.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// After the guest closed, how long the host peer may go without taking any of the bytes we
/// still owe it before we give up on it. Measured from the last progress, not from the close:
/// a slow but live reader (a loaded host, a nested lab) must get every byte.
pub const FLUSH_STALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host client asked for this stream; we sent (or will send) REQUEST and wait for the
    /// guest's RESPONSE.
    LocalInit,
    /// Both sides agreed; data flows.
    Established,
    /// We told the guest the host side is gone in both directions and wait for its RST.
    LocalClosing,
    /// The guest shut down both directions; we flush what we owe the host, then RST. The
    /// deadline moves with every byte the host takes.
    PeerClosing,
}

pub struct Connection {
    stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    guest_cid: u64,
    pub state: ConnState,
    /// Set when the stream must go; `Some(true)` means the guest gets an RST.
    pub doomed: Option<bool>,
    /// When the current state must be over (request or shutdown timeouts).
    pub deadline: Option<Instant>,

    // Credit the guest gave us (host → guest direction).
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,

    // Credit we give the guest (guest → host direction).
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// Leading `tx_buf` bytes that are ours (the `OK <port>` line), not guest data, so they do
    /// not count towards `fwd_cnt`.
    tx_buf_ours: usize,

    // Control packets owed to the guest.
    pending_request: bool,
    pending_response: bool,
    pending_credit_update: bool,
    shutdown_sent: u32,

    /// SHUTDOWN flags the guest has sent so far.
    peer_shutdown: u32,
    /// The host socket may have bytes (or EOF) for the guest.
    host_readable: bool,
    /// We read EOF from the host socket.
    host_eof: bool,
    /// The host peer is gone in both directions (EPOLLHUP): the fd leaves epoll for good.
    host_hup: bool,
    host_write_shut: bool,

    // Bookkeeping for the muxer.
    pub token: u64,
    pub polled: Option<EventSet>,
    pub in_rx_queue: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
    ) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            doomed: None,
            deadline: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            tx_buf_ours: 0,
            pending_request: false,
            pending_response: false,
            pending_credit_update: false,
            shutdown_sent: 0,
            peer_shutdown: 0,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            token: 0,
            polled: None,
            in_rx_queue: false,
        }
    }

    /// A stream a host client asked for; the guest gets a REQUEST.
    pub fn new_local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::LocalInit,
        );
        c.pending_request = true;
        c.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
        c
    }

    /// A stream the guest asked for, already connected on the host side; the guest gets a
    /// RESPONSE.
    pub fn new_peer(stream: UnixStream, guest_cid: u64, req: &VsockHeader) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            req.dst_port,
            req.src_port,
            ConnState::Established,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c.pending_response = true;
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn kill(&mut self, rst: bool) {
        if self.doomed.is_none() {
            self.doomed = Some(rst);
        }
    }

    /// Bytes the guest can still take on this stream.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest data waiting for the host socket.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len() - self.tx_buf_ours
    }

    /// Builds the header of a packet about to go to the guest. Every packet carries our
    /// credit, so any packet also serves as a credit update.
    fn header(&mut self, op: u16, flags: u32) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending_credit_update = false;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Whether host bytes may still go to the guest.
    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.peer_shutdown & SHUTDOWN_F_RCV == 0
            && !self.host_eof
            && self.shutdown_sent & SHUTDOWN_F_SEND == 0
    }

    /// The SHUTDOWN flags the guest should have by now: SEND once the host has nothing more
    /// for it, RCV as well once the host peer is gone for good.
    fn shutdown_due(&self) -> u32 {
        if !matches!(self.state, ConnState::Established | ConnState::LocalClosing) {
            return 0;
        }
        let done_sending =
            self.host_eof || (self.host_hup && self.peer_shutdown & SHUTDOWN_F_RCV != 0);
        if !done_sending {
            return 0;
        }
        let flags = if self.host_hup {
            SHUTDOWN_F_BOTH
        } else {
            SHUTDOWN_F_SEND
        };
        if flags & !self.shutdown_sent != 0 {
            flags
        } else {
            0
        }
    }

    /// Whether `recv_pkt` has something to produce.
    pub fn has_pending_rx(&self) -> bool {
        if self.doomed.is_some() {
            return false;
        }
        self.pending_request
            || self.pending_response
            || self.pending_credit_update
            || self.shutdown_due() != 0
            || (self.can_send_data() && self.host_readable && self.peer_free() > 0)
    }

    /// The events wanted on the host socket; `None` takes it out of epoll (after HUP the
    /// kernel would report it on every wait, whatever we ask for).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup || self.doomed.is_some() {
            return None;
        }
        let mut ev = EventSet::empty();
        if self.can_send_data() && !self.host_readable && self.peer_free() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// A packet from the guest for this stream.
    pub fn on_guest_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
        // Every packet carries the guest's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);

        match hdr.op {
            OP_RESPONSE if self.state == ConnState::LocalInit => {
                debug!(
                    port = self.local_port,
                    guest_port = self.peer_port,
                    "vsock: guest accepted host stream"
                );
                self.state = ConnState::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.tx_buf_ours = line.len();
                self.tx_buf.extend(line.as_bytes());
                self.flush_tx();
            }
            OP_RW if self.state == ConnState::Established => self.on_guest_data(data),
            OP_SHUTDOWN => self.on_guest_shutdown(hdr.flags),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.pending_credit_update = true,
            OP_RST => self.kill(false),
            op => {
                // REQUEST on a live stream, RESPONSE or RW out of state, unknown ops.
                guest_warn!(
                    op,
                    state = ?self.state,
                    guest_port = self.peer_port,
                    port = self.local_port,
                    "vsock: unexpected packet from guest, resetting stream"
                );
                self.kill(true);
            }
        }
    }

    fn on_guest_data(&mut self, data: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_F_SEND != 0 {
            guest_warn!(
                port = self.local_port,
                "vsock: guest sent data after shutting down sending"
            );
            self.kill(true);
            return;
        }
        if data.is_empty() {
            return;
        }
        if self.tx_buffered() + data.len() > CONN_BUF_ALLOC as usize {
            guest_warn!(
                port = self.local_port,
                buffered = self.tx_buffered(),
                len = data.len(),
                "vsock: guest exceeded its credit, resetting stream"
            );
            self.kill(true);
            return;
        }
        let mut start = 0;
        if self.tx_buf.is_empty() {
            match send_nosignal(&self.stream, data) {
                Ok(n) => {
                    start = n;
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(port = self.local_port, "vsock: host socket write: {e}");
                    self.kill(true);
                    return;
                }
            }
        }
        self.tx_buf.extend(&data[start..]);
        self.note_forwarded();
    }

    fn on_guest_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & SHUTDOWN_F_BOTH;
        if self.peer_shutdown == SHUTDOWN_F_BOTH {
            // Clean disconnect: the guest expects our RST once we are done with the stream.
            if self.tx_buf.is_empty() {
                self.kill(true);
            } else {
                self.state = ConnState::PeerClosing;
                self.deadline = Some(Instant::now() + FLUSH_STALL_TIMEOUT);
            }
        } else {
            self.maybe_shut_host_write();
        }
    }

    /// Forwards the guest's half-close to the host once every byte it sent is delivered.
    fn maybe_shut_host_write(&mut self) {
        if self.peer_shutdown & SHUTDOWN_F_SEND != 0
            && self.tx_buf.is_empty()
            && !self.host_write_shut
            && !self.host_hup
        {
            self.host_write_shut = true;
            // ENOTCONN if the peer already left: nothing to tell it then.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Writes buffered guest bytes to the host socket, as many as it takes now.
    fn flush_tx(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    let ours = n.min(self.tx_buf_ours);
                    self.tx_buf_ours -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                    self.tx_buf.drain(..n);
                    if self.state == ConnState::PeerClosing {
                        self.deadline = Some(Instant::now() + FLUSH_STALL_TIMEOUT);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(port = self.local_port, "vsock: host socket write: {e}");
                    self.kill(true);
                    return;
                }
            }
        }
        if self.tx_buf.capacity() > 4 * MAX_PKT_PAYLOAD && self.tx_buf.len() < MAX_PKT_PAYLOAD {
            // Do not keep a peak-sized buffer per idle stream.
            self.tx_buf.shrink_to(MAX_PKT_PAYLOAD);
        }
        self.note_forwarded();
        if self.tx_buf.is_empty() {
            if self.state == ConnState::PeerClosing {
                self.kill(true);
            } else {
                self.maybe_shut_host_write();
            }
        }
    }

    /// Schedules a credit update once the guest's view of our free space is stale enough that
    /// it may be holding back.
    fn note_forwarded(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending_credit_update = true;
        }
    }

    /// Readiness on the host socket.
    pub fn on_host_event(&mut self, ev: EventSet) {
        if ev.contains(EventSet::ERROR) {
            let err = self.stream.take_error().ok().flatten();
            debug!(port = self.local_port, ?err, "vsock: host socket error");
            self.kill(true);
            return;
        }
        if ev.contains(EventSet::HANG_UP) {
            // Whatever the host sent before leaving is still readable; EOF follows it.
            self.host_hup = true;
            self.host_readable = true;
        }
        if ev.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if ev.intersects(EventSet::OUT | EventSet::HANG_UP) && !self.tx_buf.is_empty() {
            self.flush_tx();
        }
    }

    /// Produces the next packet for the guest, with at most `max_payload` bytes of data.
    pub fn recv_pkt(&mut self, max_payload: usize) -> Option<RxPacket> {
        if self.doomed.is_some() {
            return None;
        }
        if self.pending_request {
            self.pending_request = false;
            return Some(RxPacket::control(self.header(OP_REQUEST, 0)));
        }
        if self.pending_response {
            self.pending_response = false;
            return Some(RxPacket::control(self.header(OP_RESPONSE, 0)));
        }
        if self.can_send_data() && self.host_readable {
            let room = (self.peer_free() as usize)
                .min(max_payload)
                .min(MAX_PKT_PAYLOAD);
            if room > 0 {
                let mut data = vec![0u8; room];
                match self.stream.read(&mut data) {
                    Ok(0) => {
                        self.host_readable = false;
                        self.host_eof = true;
                    }
                    Ok(n) => {
                        data.truncate(n);
                        self.rx_cnt += Wrapping(n as u32);
                        let hdr = self.header(OP_RW, 0);
                        return Some(RxPacket { hdr, data });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        debug!(port = self.local_port, "vsock: host socket read: {e}");
                        self.kill(true);
                        return None;
                    }
                }
            }
        }
        let flags = self.shutdown_due();
        if flags != 0 {
            self.shutdown_sent |= flags;
            if self.shutdown_sent == SHUTDOWN_F_BOTH {
                self.state = ConnState::LocalClosing;
                self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
            }
            debug!(
                port = self.local_port,
                flags, "vsock: host side done, shutting down stream"
            );
            return Some(RxPacket::control(self.header(OP_SHUTDOWN, flags)));
        }
        if self.pending_credit_update {
            return Some(RxPacket::control(self.header(OP_CREDIT_UPDATE, 0)));
        }
        None
    }

    /// The state's deadline passed: the guest never answered, or a shutdown never finished.
    pub fn on_deadline(&mut self) {
        debug!(
            port = self.local_port,
            state = ?self.state,
            "vsock: stream timed out, resetting"
        );
        self.deadline = None;
        self.kill(true);
    }
}
