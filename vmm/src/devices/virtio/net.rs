//! virtio-net (virtio spec 5.1) on a host tap device.
//!
//! The tap is opened with `IFF_VNET_HDR` and a 12-byte vnet header, which is exactly the
//! VERSION_1 `virtio_net_hdr` (with `num_buffers`). So a frame crosses unchanged in both
//! directions. No checksum or segmentation offload is offered to the guest nor enabled on
//! the tap (TUNSETOFFLOAD 0), so every header is all zeros and every frame is complete: the
//! tap's header goes to the guest with only `num_buffers` set to 1, and the guest's header is
//! zeroed before it reaches the tap. A hostile guest would otherwise hand the host kernel GSO
//! and checksum requests (`NEEDS_CSUM`, `gso_type`) for offloads nobody negotiated.
//!
//! RX only reads a frame from the tap once it holds a guest buffer to put it in, so frames
//! wait in the tap's own queue while the guest has posted none. The tap is registered
//! edge-triggered; when RX stops for lack of buffers, the guest's next RX queue kick (which
//! it sends after posting buffers) resumes reading.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use husk_vmm_api::tap::{self, IfReq, TapError, TAP_FLAGS};
use tracing::{debug, error};
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::activation::DeviceActivation;
use super::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::devices::guest_warn::guest_warn;
use crate::devices::rate_limiter::RateLimiter;

pub const RX_INDEX: usize = 0;
pub const TX_INDEX: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr` with `num_buffers`, as VERSION_1 always lays it out.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame moved, header included: a 64 KiB IP packet plus Ethernet and VLAN
/// headers and the vnet header (Firecracker's bound).
pub const MAX_FRAME_LEN: usize = 65562;
const NUM_BUFFERS_OFFSET: usize = 10;

const EV_ACTIVATE: u32 = 0;
const EV_RX_QUEUE: u32 = 1;
const EV_TX_QUEUE: u32 = 2;
const EV_TAP: u32 = 3;
const EV_RX_LIMITER: u32 = 4;
const EV_TX_LIMITER: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("{0} on the tap failed: {1}")]
    Ioctl(&'static str, io::Error),
    #[error("fd is not a tap with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (flags {0:#x})")]
    TapFlags(i32),
    #[error("cannot create eventfd: {0}")]
    EventFd(io::Error),
}

/// A tap interface with a 12-byte vnet header, non-blocking.
struct Tap {
    file: File,
    name: String,
}

impl Tap {
    fn open(name: &str) -> Result<Tap, NetError> {
        let (file, name) = tap::open(name)?;
        let tap = Tap { file, name };
        tap.configure()?;
        Ok(tap)
    }

    fn from_fd(fd: OwnedFd) -> Result<Tap, NetError> {
        let file = File::from(fd);
        let raw = file.as_raw_fd();
        let mut req = IfReq::empty();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which has its size and
        // layout and outlives the call; on a non-tun fd it fails without writing.
        let ret = unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(NetError::Ioctl("TUNGETIFF", io::Error::last_os_error()));
        }
        let flags = libc::c_int::from(req.flags);
        let kind = flags & (libc::IFF_TUN | libc::IFF_TAP);
        if kind != libc::IFF_TAP || flags & TAP_FLAGS != TAP_FLAGS {
            return Err(NetError::TapFlags(flags));
        }
        // SAFETY: F_GETFL only reads the status flags of an fd we own.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: F_SETFL only changes the status flags of an fd we own.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(NetError::Ioctl(
                "fcntl(O_NONBLOCK)",
                io::Error::last_os_error(),
            ));
        }
        let tap = Tap {
            file,
            name: req.name(),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Fixes the header size and turns offloads off, also on an fd set up by someone else:
    /// the guest is offered no offloads, so the tap must not hand it partial checksums or
    /// GSO frames.
    fn configure(&self) -> Result<(), NetError> {
        let raw = self.file.as_raw_fd();
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        if unsafe { libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(NetError::Ioctl(
                "TUNSETVNETHDRSZ",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        if unsafe { libc::ioctl(raw, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(NetError::Ioctl("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Queue indices (virtio spec 5.1.2).
const RXQ: usize = 0;
const TXQ: usize = 1;

/// A virtio-net device. The VM builder creates it with [`Net::new_with_tap_name`] or
/// [`Net::new_with_tap_fd`], attaches it to an MMIO transport and adds it to the event
/// manager as a subscriber. Bringing the tap up and wiring it to anything is the host's job.
pub struct Net {
    tap: Tap,
    mac: Option<[u8; 6]>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; 8],
    activation: DeviceActivation,
    /// The tap is in the event loop (from the first activation on; a reset keeps it there).
    tap_registered: bool,
    /// Scratch space for one TX frame.
    frame: Vec<u8>,
    /// The frame last read from the tap, and its length while it waits for a buffer the
    /// rate limiter lets it into (0: none waiting).
    rx_frame: Vec<u8>,
    rx_pending: usize,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
}

impl Net {
    /// Creates (or attaches to an existing) tap `name`. With `mac`, the guest is told to use
    /// it; without, the guest driver picks a random one.
    pub fn new_with_tap_name(name: &str, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        Self::with_tap(Tap::open(name)?, mac)
    }

    /// Takes over a tap fd opened by someone else (e.g. handed in by the parent). It must
    /// have been created with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; it is made non-blocking
    /// and its header size and offloads are set as [`Net::new_with_tap_name`] does.
    pub fn new_with_tap_fd(fd: OwnedFd, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        Self::with_tap(Tap::from_fd(fd)?, mac)
    }

    /// A device whose "tap" is any non-blocking datagram fd, e.g. one end of a Unix
    /// `socketpair(SOCK_DGRAM)`: a datagram is one frame with its vnet header, as on a tap.
    /// Only for the fuzz target (vmm/fuzz), which cannot create taps; nothing is checked or
    /// configured on the fd.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn new_with_datagram_fd_for_fuzzing(fd: OwnedFd) -> Result<Net, NetError> {
        let tap = Tap {
            file: File::from(fd),
            name: "fuzz".into(),
        };
        Self::with_tap(tap, None)
    }

    fn with_tap(tap: Tap, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        let mut avail_features = VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_STATUS;
        let mut config = [0u8; 8];
        if let Some(mac) = mac {
            avail_features |= 1 << VIRTIO_NET_F_MAC;
            config[..6].copy_from_slice(&mac);
        }
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Net {
            tap,
            mac,
            avail_features,
            acked_features: 0,
            config,
            activation: DeviceActivation::new(
                "virtio-net",
                EV_ACTIVATE,
                &[EV_RX_QUEUE, EV_TX_QUEUE],
            )
            .map_err(NetError::EventFd)?,
            tap_registered: false,
            frame: vec![0; MAX_FRAME_LEN],
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_pending: 0,
            rx_limiter: None,
            tx_limiter: None,
        })
    }

    /// Limits frames each way: each costs an operation and its bytes.
    pub fn with_rate_limiters(mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// The tap's interface name, as the kernel reports it.
    pub fn tap_name(&self) -> &str {
        &self.tap.name
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    /// Moves frames from the tap into RX buffers until one of the two runs out.
    fn process_rx(&mut self) {
        let Some(a) = self.activation.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = a.queues[RXQ].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut writer = match chain.writer(&a.mem) {
                Ok(w) if w.available_bytes() >= VNET_HDR_LEN => w,
                // No frame will ever fit: give the buffer back rather than hold up RX.
                Ok(_) | Err(_) => {
                    guest_warn!("virtio-net: unusable RX buffer {head} returned empty");
                    if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, 0) {
                        guest_warn!("virtio-net: cannot return RX descriptor {head}: {e}");
                    }
                    used_any = true;
                    continue;
                }
            };
            if self.rx_pending == 0 {
                match (&self.tap.file).read(&mut self.rx_frame) {
                    Ok(len) => self.rx_pending = len,
                    Err(e) => {
                        // The buffer stays available for the next frame.
                        a.queues[RXQ].go_to_previous_position();
                        if e.kind() != io::ErrorKind::WouldBlock {
                            guest_warn!("virtio-net: tap read failed: {e}");
                        }
                        break;
                    }
                }
            }
            let len = self.rx_pending;
            if len < VNET_HDR_LEN || len > writer.available_bytes() {
                guest_warn!(
                    "virtio-net: dropped a {len}-byte RX frame: buffer {head} holds {}",
                    writer.available_bytes()
                );
                self.rx_pending = 0;
                a.queues[RXQ].go_to_previous_position();
                continue;
            }
            if let Some(limiter) = &mut self.rx_limiter {
                if !limiter.consume(len as u64) {
                    // The frame waits in `rx_frame` for the limiter's timer.
                    a.queues[RXQ].go_to_previous_position();
                    break;
                }
            }
            self.rx_pending = 0;
            // Without MRG_RXBUF a frame always takes one buffer; older kernels leave these
            // two header bytes as they found them.
            self.rx_frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let used_len = match writer.write_all(&self.rx_frame[..len]) {
                Ok(()) => len as u32,
                Err(e) => {
                    guest_warn!("virtio-net: cannot write RX frame to guest memory: {e}");
                    0
                }
            };
            if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, used_len) {
                guest_warn!("virtio-net: cannot return RX descriptor {head}: {e}");
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = a.irq.signal_used() {
                error!("virtio-net: cannot raise interrupt: {e}");
            }
        }
    }

    /// Sends every frame the guest has queued for transmission to the tap.
    fn process_tx(&mut self) {
        let Some(a) = self.activation.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = a.queues[TXQ].pop_descriptor_chain(&a.mem) {
            if let Some(limiter) = &mut self.tx_limiter {
                let bytes = chain.clone().map(|d| u64::from(d.len())).sum();
                if !limiter.consume(bytes) {
                    // Sent when the limiter's timer fires.
                    a.queues[TXQ].go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            match chain.reader(&a.mem) {
                Err(e) => guest_warn!("virtio-net: bad TX chain {head}: {e}"),
                Ok(mut reader) => {
                    let len = reader.available_bytes();
                    if len > MAX_FRAME_LEN {
                        guest_warn!(
                            "virtio-net: dropped a {len}-byte TX frame (max {MAX_FRAME_LEN})"
                        );
                    } else if len <= VNET_HDR_LEN {
                        guest_warn!(
                            "virtio-net: dropped a {len}-byte TX chain: no frame after the header"
                        );
                    } else if let Err(e) = reader.read_exact(&mut self.frame[..len]) {
                        guest_warn!("virtio-net: cannot read TX frame from guest memory: {e}");
                    } else {
                        sanitize_tx_header(&mut self.frame[..VNET_HDR_LEN]);
                        if let Err(e) = (&self.tap.file).write(&self.frame[..len]) {
                            // The tap has no room or the interface is down; like a NIC, drop.
                            debug!("virtio-net: tap write failed, frame dropped: {e}");
                        }
                    }
                }
            }
            if let Err(e) = a.queues[TXQ].add_used(&a.mem, head, 0) {
                guest_warn!("virtio-net: cannot return TX descriptor {head}: {e}");
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = a.irq.signal_used() {
                error!("virtio-net: cannot raise interrupt: {e}");
            }
        }
    }

    /// The device went live: the tap joins the loop (once), and whatever the guest queued
    /// and the tap holds moves now (the tap is edge-triggered: frames that came while the
    /// device was down raise no new edge).
    fn on_live(&mut self, ops: &mut EventOps) {
        if !self.tap_registered {
            let ev = Events::with_data(
                &self.tap.file,
                EV_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            );
            match ops.add(ev) {
                Ok(()) => self.tap_registered = true,
                Err(e) => error!("virtio-net: cannot register the tap: {e}"),
            }
        }
        self.process_tx();
        self.process_rx();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only through the legacy interface, which we do not offer.
        debug!(
            "virtio-net: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.activation.activate(activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.activation.is_active()
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        for (limiter, data) in [
            (&self.rx_limiter, EV_RX_LIMITER),
            (&self.tx_limiter, EV_TX_LIMITER),
        ] {
            if let Some(l) = limiter {
                if let Err(e) = ops.add(Events::with_data(l, data, EventSet::IN)) {
                    error!("virtio-net: cannot register a rate limiter: {e}");
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_ACTIVATE => {
                if self.activation.on_event(ops) {
                    self.on_live(ops);
                }
            }
            EV_RX_QUEUE => {
                self.activation.clear_queue_event(EV_RX_QUEUE);
                self.process_rx();
            }
            EV_TX_QUEUE => {
                self.activation.clear_queue_event(EV_TX_QUEUE);
                self.process_tx();
            }
            EV_RX_LIMITER => {
                if let Some(l) = &mut self.rx_limiter {
                    l.on_timer();
                }
                self.process_rx();
            }
            EV_TX_LIMITER => {
                if let Some(l) = &mut self.tx_limiter {
                    l.on_timer();
                }
                self.process_tx();
            }
            EV_TAP => {
                let set = events.event_set();
                if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    guest_warn!("virtio-net: tap {} reports {set:?}", self.tap.name);
                }
                self.process_rx();
            }
            other => guest_warn!("virtio-net: unexpected event {other}"),
        }
    }
}

/// Clears what the guest asked of the host in its TX header. Nothing was negotiated, so
/// every request (checksum, segmentation, header length hints) is one the tap must not act on.
fn sanitize_tx_header(hdr: &mut [u8]) {
    if hdr.iter().any(|&b| b != 0) {
        debug!("virtio-net: guest TX header {hdr:02x?} cleared: no offload was negotiated");
    }
    hdr.fill(0);
}

#[cfg(test)]
mod tests;
