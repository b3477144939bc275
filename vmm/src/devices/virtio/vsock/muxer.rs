//! The muxer: every stream, the host listener, and the epoll set that watches their sockets.
//!
//! The muxer keeps its own epoll fd, nested in the VMM's event loop as a single source (as
//! Firecracker does). Streams come and go all the time; with their own epoll set, opening
//! and closing them needs no access to the event manager, and device reset or drop can close
//! every fd without leaving stale registrations behind.
//!
//! Epoll entries carry a token rather than the fd, so an event that was already fetched for a
//! stream we then closed can never be delivered to a new stream that reused the fd number.

mod host_clients;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, CONN_BUF_ALLOC};
use super::host_sock::connect_nonblocking;
use super::packet::*;
use super::HOST_CID;
use crate::devices::guest_warn::guest_warn;

/// Streams plus half-open host clients, so a flood of either cannot exhaust our fds.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets (RSTs) queued for the guest before we stop reading its TX queue: a guest
/// that sends without supplying RX buffers must not make us queue without bound.
pub const MAX_CTRL_BACKLOG: usize = 1024;
/// First local port handed to host-initiated streams (Firecracker's choice).
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Events handled per pass; the nested epoll is level-triggered, the rest waits a turn.
const EVENTS_PER_PASS: usize = 64;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;

/// A stream's identity: (host port, guest port). The CIDs are fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

enum Owner {
    Pending,
    Conn(ConnKey),
}

/// A host client that connected but has not finished its `CONNECT <port>` line.
struct HostPending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Where guest connections to host port P go: `<connect_base>_P`. `uds_path` unless the
    /// VMM is jailed, where it is that path as seen from inside the jail, or `None` when the
    /// socket is outside the jail and guest connections are refused.
    connect_base: Option<PathBuf>,
    listener: UnixListener,
    /// The listener is in the epoll set (after activation, unless paused on fd exhaustion).
    listening: bool,
    active: bool,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    /// The timer expired and has not been re-set since.
    timer_fired: bool,
    next_token: u64,
    owners: HashMap<u64, Owner>,
    conns: HashMap<ConnKey, Connection>,
    pending: HashMap<u64, HostPending>,
    /// Streams per host-side port, whichever side opened them: a port the guest connected
    /// to is never handed to a host client, so two streams never share a key (a new one
    /// would silently replace the old in `conns`, leaking its fd and epoll entry).
    local_ports: HashMap<u32, usize>,
    next_host_port: u32,
    /// Streams with something for the guest, served round robin.
    rx_ready: VecDeque<ConnKey>,
    /// Packets not tied to a live stream (RSTs).
    ctrl: VecDeque<VsockHeader>,
}

impl VsockMuxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        Ok(VsockMuxer {
            guest_cid,
            connect_base: Some(uds_path.clone()),
            uds_path,
            listener,
            listening: false,
            active: false,
            epoll,
            timer,
            timer_deadline: None,
            timer_fired: false,
            next_token: FIRST_TOKEN,
            owners: HashMap::new(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            local_ports: HashMap::new(),
            next_host_port: FIRST_HOST_PORT,
            rx_ready: VecDeque::new(),
            ctrl: VecDeque::new(),
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Sends guest connections to `<base>_P` instead of `<uds_path>_P`; `None` refuses them.
    pub fn set_connect_base(&mut self, base: Option<PathBuf>) {
        self.connect_base = base;
    }

    /// The fd the VMM's event loop watches for all host-side activity.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    #[cfg(test)]
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// The guest driver is up: start taking host clients. Until then they wait in the
    /// listen backlog.
    pub fn start(&mut self) {
        self.active = true;
        self.listen(true);
    }

    /// Device reset: drop every stream and half-open client (the guest forgot them all) and
    /// stop accepting until the next activation.
    pub fn reset(&mut self) {
        self.active = false;
        self.listen(false);
        for (_, conn) in self.conns.drain() {
            if conn.polled.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        for (_, p) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.owners.clear();
        self.local_ports.clear();
        self.rx_ready.clear();
        self.ctrl.clear();
        self.timer_deadline = None;
        self.timer_fired = false;
        let _ = self.timer.clear();
    }

    fn listen(&mut self, on: bool) {
        if on == self.listening {
            return;
        }
        let (op, ev) = if on {
            (ControlOperation::Add, EventSet::IN)
        } else {
            (ControlOperation::Delete, EventSet::empty())
        };
        match self.epoll.ctl(
            op,
            self.listener.as_raw_fd(),
            EpollEvent::new(ev, TOKEN_LISTENER),
        ) {
            Ok(()) => self.listening = on,
            Err(e) => guest_warn!("vsock: cannot (un)watch the listener: {e}"),
        }
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Whether there is (probably) something for the guest's RX queue.
    pub fn has_pending_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether the guest must supply RX buffers before we read more of its TX queue.
    pub fn rx_backlog_full(&self) -> bool {
        self.ctrl.len() >= MAX_CTRL_BACKLOG
    }

    /// Handles what the host-side epoll set reports, then the timeouts.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_PASS];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                guest_warn!("vsock: epoll wait: {e}");
                0
            }
        };
        let mut timer_fired = false;
        for ev in &events[..n] {
            let set = ev.event_set();
            match ev.data() {
                TOKEN_LISTENER => self.accept_clients(),
                TOKEN_TIMER => timer_fired = true,
                token => match self.owners.get(&token) {
                    Some(Owner::Pending) => self.handle_handshake(token),
                    Some(Owner::Conn(key)) => {
                        let key = *key;
                        if let Some(conn) = self.conns.get_mut(&key) {
                            conn.on_host_event(set);
                        }
                        self.refresh(key);
                    }
                    // Closed earlier in this pass.
                    None => {}
                },
            }
        }
        self.timer_fired |= timer_fired;
        self.sweep_deadlines();
    }

    /// A packet from the guest's TX queue.
    pub fn send_pkt(&mut self, hdr: &VsockHeader, data: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            debug!(
                src_cid = hdr.src_cid,
                dst_cid = hdr.dst_cid,
                "vsock: dropping misaddressed packet"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            // Spec 5.10.6.6: unknown socket types are answered with RST.
            if hdr.op != OP_RST {
                self.push_rst_reply(hdr);
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_pkt(hdr, data);
            self.refresh(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(key, hdr),
            // Nothing to reset.
            OP_RST => {}
            _ => self.push_rst_reply(hdr),
        }
    }

    /// Answers a guest packet with RST, addressed back to its sender.
    pub fn push_rst_reply(&mut self, hdr: &VsockHeader) {
        self.ctrl.push_back(VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: 0,
        });
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &VsockHeader) {
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            guest_warn!("vsock: too many streams, refusing guest connect");
            self.push_rst_reply(hdr);
            return;
        }
        let Some(base) = &self.connect_base else {
            debug!(
                "vsock: guest connect to port {}: the socket is outside the jail",
                key.local_port
            );
            self.push_rst_reply(hdr);
            return;
        };
        let mut path = OsString::from(base.as_os_str());
        path.push(format!("_{}", key.local_port));
        let path = PathBuf::from(path);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!(
                    "vsock: guest connect to port {}: {}: {e}",
                    key.local_port,
                    path.display()
                );
                self.push_rst_reply(hdr);
                return;
            }
        };
        debug!(
            port = key.local_port,
            guest_port = key.peer_port,
            "vsock: guest stream connected"
        );
        let token = self.new_token();
        let mut conn = Connection::new_peer(stream, self.guest_cid, hdr);
        conn.token = token;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            conn.stream().as_raw_fd(),
            EpollEvent::new(EventSet::empty(), token),
        ) {
            guest_warn!("vsock: cannot watch host stream: {e}");
            self.push_rst_reply(hdr);
            return;
        }
        conn.polled = Some(EventSet::empty());
        self.owners.insert(token, Owner::Conn(key));
        *self.local_ports.entry(key.local_port).or_default() += 1;
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    /// Brings a stream's epoll interest and RX scheduling in line with its state, or closes
    /// it. Called after anything happened to the stream.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(rst) = conn.doomed {
            self.kill(key, rst);
            return;
        }
        let fd = conn.stream().as_raw_fd();
        match (conn.interest(), conn.polled) {
            (None, Some(_)) => {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                conn.polled = None;
                self.owners.remove(&conn.token);
            }
            (Some(want), Some(have)) if want != have => {
                match self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(want, conn.token),
                ) {
                    Ok(()) => conn.polled = Some(want),
                    Err(e) => {
                        guest_warn!("vsock: cannot update host stream interest: {e}");
                        self.kill(key, true);
                        return;
                    }
                }
            }
            // Once out of epoll (HUP), a stream stays out.
            _ => {}
        }
        if !conn.in_rx_queue && conn.has_pending_rx() {
            conn.in_rx_queue = true;
            self.rx_ready.push_back(key);
        }
    }

    /// Closes a stream (its fd goes with it), telling the guest with an RST if asked.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        debug!(
            port = key.local_port,
            guest_port = key.peer_port,
            rst,
            "vsock: stream closed"
        );
        if conn.polled.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.owners.remove(&conn.token);
        if let Some(n) = self.local_ports.get_mut(&key.local_port) {
            *n -= 1;
            if *n == 0 {
                self.local_ports.remove(&key.local_port);
            }
        }
        if rst {
            self.ctrl.push_back(VsockHeader {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                len: 0,
                type_: TYPE_STREAM,
                op: OP_RST,
                flags: 0,
                buf_alloc: CONN_BUF_ALLOC,
                fwd_cnt: 0,
            });
        }
        self.stream_closed();
    }

    /// An fd was freed: resume accepting if fd exhaustion paused it.
    fn stream_closed(&mut self) {
        if self.active && !self.listening {
            self.listen(true);
        }
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data.
    pub fn recv_pkt(&mut self, max_payload: usize) -> Option<RxPacket> {
        if let Some(hdr) = self.ctrl.pop_front() {
            return Some(RxPacket::control(hdr));
        }
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            let pkt = conn.recv_pkt(max_payload);
            // Re-queues the stream at the back if it has more: round robin between streams.
            self.refresh(key);
            if pkt.is_some() {
                return pkt;
            }
            // The stream may just have been reset.
            if let Some(hdr) = self.ctrl.pop_front() {
                return Some(RxPacket::control(hdr));
            }
        }
        None
    }

    /// Times out what has to, then arms the timer for the next deadline.
    pub fn sweep_deadlines(&mut self) {
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_deadline();
            }
            self.refresh(key);
        }
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in stale {
            debug!("vsock: host client never sent CONNECT, dropping it");
            self.close_pending(token);
        }

        let next = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.pending.values().map(|p| p.deadline))
            .min();
        // Re-arming or disarming also clears a fired timer's readiness, so a fired timer is
        // always re-set, or the level-triggered epoll would keep reporting it.
        if next == self.timer_deadline && !self.timer_fired {
            return;
        }
        let res = match next {
            // A zero duration would disarm the timer; a millisecond is soon enough.
            Some(d) => self.timer.reset(
                d.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        match res {
            Ok(()) => {
                self.timer_deadline = next;
                self.timer_fired = false;
            }
            Err(e) => guest_warn!("vsock: cannot arm the timeout timer: {e}"),
        }
    }
}
