//! The virtio-vsock device: feature and config space, queues, and event-loop wiring.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::host_sock::connect_nonblocking;
use super::muxer::VsockMuxer;
use super::packet::{
    read_tx_packet, write_rx_packet, HDR_SIZE, MAX_PKT_PAYLOAD, OP_RST, TYPE_STREAM,
};
use super::{VsockError, HOST_CID};
use crate::devices::guest_warn::guest_warn;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, GuestMemory, IrqTrigger, VirtioDevice,
    TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// rx, tx, event.
pub const VSOCK_QUEUE_SIZES: [u16; 3] = [256; 3];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

// `Events` data, telling the sources of `process` apart.
const EV_ACTIVATE: u32 = 0;
const EV_RXQ: u32 = 1;
const EV_TXQ: u32 = 2;
const EV_EVQ: u32 = 3;
const EV_BACKEND: u32 = 4;
const QUEUE_EV_DATA: [u32; 3] = [EV_RXQ, EV_TXQ, EV_EVQ];

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: IrqTrigger,
}

/// A hybrid virtio-vsock device: guest streams end on host Unix sockets (see the module
/// docs for the protocol).
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    /// The current activation's queue eventfds are in the event manager.
    queue_evts_registered: bool,
    /// Queue eventfds of a previous activation, to take out of the event manager on the
    /// event-loop thread (reset runs on a vCPU thread, without `EventOps`).
    retired_evts: Vec<EventFd>,
    /// The TX queue was left unread because the guest owes us RX buffers.
    tx_stalled: bool,
    muxer: VsockMuxer,
}

impl Vsock {
    /// Creates the device and starts listening on `uds_path` (host clients wait in the
    /// backlog until the guest driver activates the device).
    ///
    /// A stale socket file at `uds_path` (nobody listening) is replaced; a live one is an
    /// error, and so is any other kind of file.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Vsock, VsockError> {
        let uds_path = uds_path.into();
        // 0-2 are reserved; Linux vsock addresses are 32 bits and u32::MAX means "any".
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let listener = bind_listener(&uds_path)?;
        let muxer =
            VsockMuxer::new(guest_cid, uds_path, listener).map_err(VsockError::EventSetup)?;
        Ok(Vsock {
            guest_cid,
            acked_features: 0,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventSetup)?,
            active: None,
            queue_evts_registered: false,
            retired_evts: Vec::new(),
            tx_stalled: false,
            muxer,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Takes the current activation's queue eventfds into the event manager, after dropping
    /// those of a previous one.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                guest_warn!("vsock: cannot unregister queue event: {e}");
            }
        }
        let Some(active) = &self.active else {
            return;
        };
        if self.queue_evts_registered {
            return;
        }
        for (evt, data) in active.queue_evts.iter().zip(QUEUE_EV_DATA) {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                error!("vsock: cannot register queue event: {e}");
            }
        }
        self.queue_evts_registered = true;
        self.muxer.start();
        // The guest may have queued packets before we were listening.
        self.run_queues();
    }

    /// Drains the TX queue into the muxer; returns whether buffers were used.
    pub(crate) fn process_tx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let Active { mem, queues, .. } = active;
        let txq = &mut queues[TXQ];
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if self.muxer.rx_backlog_full() {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = txq.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            match read_tx_packet(mem, chain) {
                Ok((hdr, data)) => self.muxer.send_pkt(&hdr, &data),
                Err(e) => {
                    guest_warn!("vsock: bad TX packet: {e}");
                    if let VsockError::PayloadTooLarge { hdr, .. }
                    | VsockError::PayloadTruncated { hdr, .. } = &e
                    {
                        // The header was readable: reset whatever stream it names, as if
                        // the guest had sent RST, and tell the guest.
                        let mut rst = **hdr;
                        rst.op = OP_RST;
                        if rst.src_cid == self.guest_cid
                            && rst.dst_cid == HOST_CID
                            && rst.type_ == TYPE_STREAM
                        {
                            self.muxer.send_pkt(&rst, &[]);
                            self.muxer.push_rst_reply(&rst);
                        }
                    }
                }
            }
            if let Err(e) = txq.add_used(&*mem, head, 0) {
                error!("vsock: TX add_used: {e}");
            }
            used = true;
        }
        used
    }

    /// Fills RX buffers with whatever the muxer has for the guest; returns whether buffers
    /// were used.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let Active { mem, queues, .. } = active;
        let rxq = &mut queues[RXQ];
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = rxq.pop_descriptor_chain(&*mem) else {
                // No buffers: we go on when the guest notifies the RX queue.
                break;
            };
            let head = chain.head_index();
            let len = match chain.writer(mem) {
                Err(e) => {
                    guest_warn!("vsock: unusable RX buffer: {e}");
                    0
                }
                Ok(w) if w.available_bytes() < HDR_SIZE => {
                    guest_warn!(
                        len = w.available_bytes(),
                        "vsock: RX buffer smaller than a packet header"
                    );
                    0
                }
                Ok(mut w) => {
                    let room = (w.available_bytes() - HDR_SIZE).min(MAX_PKT_PAYLOAD);
                    let Some(pkt) = self.muxer.recv_pkt(room) else {
                        // Nothing after all: give the buffer back for next time.
                        rxq.go_to_previous_position();
                        break;
                    };
                    match write_rx_packet(&mut w, &pkt) {
                        Ok(n) => n,
                        Err(e) => {
                            guest_warn!("vsock: writing RX packet: {e}");
                            0
                        }
                    }
                }
            };
            if let Err(e) = rxq.add_used(&*mem, head, len) {
                error!("vsock: RX add_used: {e}");
            }
            used = true;
        }
        used
    }

    /// Moves packets both ways until neither queue makes progress, then interrupts the
    /// guest if it has used buffers to look at.
    fn run_queues(&mut self) {
        let mut used = false;
        // Bounded: each round either uses buffers or ends the loop.
        for _ in 0..64 {
            let tx = self.process_tx();
            let rx = self.process_rx();
            used |= tx || rx;
            if !(self.tx_stalled && rx) {
                break;
            }
        }
        // Packets both ways may have started or ended timeouts (requests, shutdowns).
        self.muxer.sweep_deadlines();
        if used {
            if let Some(active) = &self.active {
                if let Err(e) = active.irq.signal_used() {
                    error!("vsock: cannot signal used buffers: {e}");
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// Handles host-side socket activity, then hands the guest what came of it.
    pub(crate) fn process_backend(&mut self) {
        self.muxer.process_events();
        self.run_queues();
    }

    /// What `process` does on a queue notification (also used by tests).
    pub(crate) fn process_queue_event(&mut self, queue: usize) {
        if let Some(active) = &self.active {
            if let Some(evt) = active.queue_evts.get(queue) {
                // Level-triggered: clear it. Nothing to read is fine (tests, spurious wakes).
                let _ = evt.read();
            }
        }
        match queue {
            // RX buffers or TX packets: either may unblock both directions.
            RXQ | TXQ => self.run_queues(),
            // We never post events (no live migration), so there is nothing to do.
            _ => {}
        }
    }
}

/// Binds the listener at `path`, replacing a stale socket file but never a live one.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::NotASocket(path.to_path_buf()));
        }
        // A socket file with nobody behind it is what a crashed VMM leaves. Never a blocking
        // connect: a live listener with a full backlog would hang us; that is in use too.
        match connect_nonblocking(path) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => return Err(VsockError::AddressInUse(path.to_path_buf())),
        }
        std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    // Whoever can connect can talk to any guest port: the VMM's owner only (0600).
    let bound = crate::listener::bind_published(path);
    let listener = bound.map_err(|source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &VSOCK_QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        guest_warn!(
            offset,
            len = data.len(),
            "vsock: guest wrote read-only config space, ignored"
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let n = VSOCK_QUEUE_SIZES.len();
        if activation.queues.len() != n || activation.queue_evts.len() != n {
            return Err(ActivateError::QueueCount {
                expected: n,
                got: activation.queues.len().min(activation.queue_evts.len()),
            });
        }
        // A transport that re-activates without a reset: the old eventfds must still leave
        // the event manager.
        if let Some(old) = self.active.take() {
            if self.queue_evts_registered {
                self.retired_evts.extend(old.queue_evts);
            }
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            queue_evts: activation.queue_evts,
            irq: activation.irq,
        });
        self.queue_evts_registered = false;
        // The event loop registers the queue eventfds and starts the muxer.
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            if self.queue_evts_registered {
                self.retired_evts.extend(active.queue_evts);
            }
        }
        self.queue_evts_registered = false;
        self.acked_features = 0;
        self.tx_stalled = false;
        self.muxer.reset();
        if !self.retired_evts.is_empty() {
            if let Err(e) = self.activate_evt.write(1) {
                // The stale registrations then go at the next activation.
                guest_warn!("vsock: cannot signal reset to the event loop: {e}");
            }
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EV_ACTIVATE,
            EventSet::IN,
        )) {
            error!("vsock: cannot register activate event: {e}");
        }
        if let Err(e) = ops.add(Events::with_data_raw(
            self.muxer.epoll_fd(),
            EV_BACKEND,
            EventSet::IN,
        )) {
            error!("vsock: cannot register backend: {e}");
        }
        // Activated before being added to the event loop.
        if self.active.is_some() {
            self.sync_registrations(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // A queue eventfd of a previous activation that fired before the event loop got to
        // unregister it: unregister it now rather than poll it again.
        if let Some(pos) = self
            .retired_evts
            .iter()
            .position(|e| e.as_raw_fd() == events.fd())
        {
            let evt = self.retired_evts.swap_remove(pos);
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                guest_warn!("vsock: cannot unregister queue event: {e}");
            }
            return;
        }
        match events.data() {
            EV_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_registrations(ops);
            }
            EV_RXQ => self.process_queue_event(RXQ),
            EV_TXQ => self.process_queue_event(TXQ),
            EV_EVQ => self.process_queue_event(EVQ),
            EV_BACKEND => self.process_backend(),
            other => guest_warn!(other, "vsock: event from an unknown source"),
        }
    }
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path())
            .field("activated", &self.active.is_some())
            .finish()
    }
}
