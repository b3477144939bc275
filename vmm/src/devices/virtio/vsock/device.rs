//! The virtio-vsock device: feature and config space, queues, and event-loop wiring.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::error;
use virtio_queue::{QueueOwnedT, QueueT};

use super::host_sock::connect_nonblocking;
use super::muxer::VsockMuxer;
use super::packet::{
    read_tx_packet, write_rx_packet, HDR_SIZE, MAX_PKT_PAYLOAD, OP_RST, TYPE_STREAM,
};
use super::{VsockError, HOST_CID};
use crate::devices::guest_warn::guest_warn;
use crate::devices::virtio::activation::{Active, DeviceActivation};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
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

/// A hybrid virtio-vsock device: guest streams end on host Unix sockets (see the module
/// docs for the protocol).
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    activation: DeviceActivation,
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
            activation: DeviceActivation::new("vsock", EV_ACTIVATE, &QUEUE_EV_DATA)
                .map_err(VsockError::EventSetup)?,
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

    /// For a VMM that will be jailed in `jail_dir`: guest connections then go to the socket's
    /// path inside the jail, and are refused if the socket is not in the jail at all.
    pub fn jailed_in(mut self, jail_dir: &Path) -> Vsock {
        // Bound just now, so it exists and resolves.
        let inside = self.muxer.uds_path().canonicalize().ok().and_then(|p| {
            p.strip_prefix(jail_dir)
                .ok()
                .map(|rel| Path::new("/").join(rel))
        });
        if inside.is_none() {
            tracing::warn!(
                "vsock: {} is outside the jail {}: guest connections to the host will be refused",
                self.muxer.uds_path().display(),
                jail_dir.display()
            );
        }
        self.muxer.set_connect_base(inside);
        self
    }

    /// Drains the TX queue into the muxer; returns whether buffers were used.
    pub(crate) fn process_tx(&mut self) -> bool {
        let Some(active) = &mut self.activation.active else {
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
        let Some(active) = &mut self.activation.active else {
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
            if let Some(active) = &self.activation.active {
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
        if let Some(&data) = QUEUE_EV_DATA.get(queue) {
            self.activation.clear_queue_event(data);
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
        // The event loop registers the queue eventfds and starts the muxer.
        self.activation.activate(activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        self.acked_features = 0;
        self.tx_stalled = false;
        self.muxer.reset();
        true
    }

    fn is_activated(&self) -> bool {
        self.activation.is_active()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Err(e) = ops.add(Events::with_data_raw(
            self.muxer.epoll_fd(),
            EV_BACKEND,
            EventSet::IN,
        )) {
            error!("vsock: cannot register backend: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.activation.drop_if_retired(&events, ops) {
            return;
        }
        match events.data() {
            EV_ACTIVATE => {
                if self.activation.on_event(ops) {
                    self.muxer.start();
                    // The guest may have queued packets before we were listening.
                    self.run_queues();
                }
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
            .field("activated", &self.activation.is_active())
            .finish()
    }
}
