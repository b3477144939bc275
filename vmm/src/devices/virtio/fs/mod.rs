//! virtio-fs (device type 26) served by virtiofsd over vhost-user.
//!
//! The VMM does not parse FUSE: virtiofsd maps guest memory (memfd regions sent with
//! SET_MEM_TABLE), reads the guest's kicks straight from the queues' ioeventfds and processes
//! the rings itself. What stays in the VMM is the virtio side that virtiofsd cannot see: config
//! space (tag, number of request queues), feature negotiation with the guest, and interrupts.
//! virtiofsd signals a call eventfd per queue that this device owns; the event loop turns each
//! signal into `IrqTrigger::signal_used`, because the MMIO transport's InterruptStatus must have
//! the VRING bit set or the guest's interrupt handler ignores the interrupt (so virtiofsd cannot
//! be handed the irqfd directly).
//!
//! Why vhost-user rather than an in-process FUSE server (fuse-backend-rs): that crate pins
//! vm-memory =0.17.1 while husk uses 0.18, and a separate daemon also keeps host file system
//! access out of the VMM process and its seccomp filter.
//!
//! Threads: `Fs::new` runs on the VMM's main thread, `activate` and `reset` on a vCPU thread (the
//! transport), `process` on the event loop; the device sits behind a mutex shared by both.
//! Neither talks to virtiofsd after the handshake: the vhost-user worker does ([`backend`]).

mod backend;
mod handshake;
mod memory;
#[cfg(test)]
mod tests;
mod vring_addresses;
pub mod watchdog;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::{Frontend, VhostUserProtocolFeatures};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::guest_warn::guest_warn;

use super::{
    read_config_bytes, ActivateError, Activation, GuestMemory, IrqTrigger, Queue, QueueT,
    VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::helper_thread::HelperThread;
use backend::{ActivateJob, Backend, VringJob};
use handshake::{connect, handshake};
use vring_addresses::{memory_regions, vring_config};
use watchdog::Watchdog;

pub use memory::shared_guest_memory;

/// Longest tag the config space holds (virtio spec 5.11.4); the guest mounts by this name.
pub const TAG_MAX_LEN: usize = 36;
/// Largest split-queue size the virtio spec allows (and virtiofsd accepts).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// A sensible queue size (Cloud Hypervisor's default).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Virtio features of virtiofsd the guest may see. They only concern how the rings are
/// processed, which virtiofsd does, so the VMM passes them through. Everything else it offers
/// is dropped: vhost-user-only bits (PROTOCOL_FEATURES, LOG_ALL) mean nothing to a guest, and
/// bits we do not know we cannot vouch for (e.g. packed rings, which our transport lacks).
const PASSTHROUGH_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// How long `Fs::new` keeps retrying to connect: virtiofsd may have been started just before
/// and not be listening yet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one round of vhost-user messages (handshake, activation, reset).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Event-loop tokens; call fds use their queue index.
const ACTIVATE_TOKEN: u32 = u32::MAX;
const SOCKET_TOKEN: u32 = u32::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("invalid virtio-fs tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: &'static str },
    #[error("virtio-fs needs at least one request queue")]
    NoRequestQueue,
    #[error("invalid virtio-fs queue size {0}: must be a power of two from 1 to {MAX_QUEUE_SIZE}")]
    InvalidQueueSize(u16),
    #[error("cannot connect to virtiofsd at {}: {source} (is virtiofsd running on that socket?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("vhost-user {step} with virtiofsd failed: {source}")]
    Handshake {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("virtiofsd did not answer vhost-user {step} within {limit:?}")]
    Timeout { step: &'static str, limit: Duration },
    #[error("virtiofsd does not offer {0}, which virtio-fs over vhost-user needs")]
    MissingBackendFeature(&'static str),
    #[error(
        "virtiofsd serves at most {max} queues; {wanted} requested (1 hiprio + request queues)"
    )]
    TooManyQueues { wanted: usize, max: u64 },
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot create memfd for guest memory: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot build shared guest memory: {0}")]
    GuestMemory(String),
}

/// Checks a tag and lays out config space: tag (NUL-padded), then num_request_queues (le32).
fn build_config(tag: &str, num_request_queues: u32) -> Result<[u8; CONFIG_LEN], FsError> {
    let invalid = |reason| FsError::InvalidTag {
        tag: tag.to_owned(),
        reason,
    };
    if tag.is_empty() {
        return Err(invalid("empty"));
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(invalid("longer than 36 bytes"));
    }
    // The guest reads the tag up to the first NUL, so a NUL inside would silently shorten it.
    if tag.bytes().any(|b| b == 0) {
        return Err(invalid("contains a NUL byte"));
    }
    let mut config = [0u8; CONFIG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_MAX_LEN..].copy_from_slice(&num_request_queues.to_le_bytes());
    Ok(config)
}

/// Features offered to the guest given what virtiofsd offers.
fn guest_features(backend_features: u64) -> u64 {
    VIRTIO_F_VERSION_1 | (backend_features & PASSTHROUGH_FEATURES)
}

/// Connection limits; tests shorten them.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    connect: Duration,
    exchange: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: CONNECT_TIMEOUT,
            exchange: EXCHANGE_TIMEOUT,
        }
    }
}

/// What an activation handed over; dropped on reset.
struct Active {
    irq: IrqTrigger,
    /// Queues given to virtiofsd (the ready ones), to stop them on reset.
    started: Vec<usize>,
    /// Kept open for the device's life: KVM writes them and virtiofsd holds copies.
    _queue_evts: Vec<EventFd>,
    /// Keeps the mappings virtiofsd was told about alive as long as it may use them.
    _mem: GuestMemory,
}

pub struct Fs {
    tag: String,
    config: [u8; CONFIG_LEN],
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    /// The thread that owns the vhost-user connection from the handshake on.
    backend: Backend,
    /// Handles on the worker and its watchdog, for the controller to jail and filter them.
    helpers: Vec<HelperThread>,
    /// A second handle on the vhost-user socket, watched by the event loop for hang-up.
    sock: UnixStream,
    activate_evt: EventFd,
    /// One per queue: virtiofsd writes them when it has used buffers.
    call_evts: Vec<EventFd>,
    calls_registered: bool,
    active: Option<Active>,
    /// A vhost-user exchange failed part-way, so requests and replies may be out of step
    /// (set by the worker, or by the event loop when virtiofsd hangs up).
    broken: Arc<AtomicBool>,
    backend_gone: Arc<AtomicBool>,
}

impl Fs {
    /// Connects to virtiofsd's vhost-user socket and negotiates features. `num_request_queues`
    /// request queues plus one high-priority queue, each at most `queue_size` entries.
    pub fn new(
        socket_path: impl AsRef<Path>,
        tag: &str,
        num_request_queues: usize,
        queue_size: u16,
    ) -> Result<Fs, FsError> {
        Self::with_timeouts(
            socket_path.as_ref(),
            tag,
            num_request_queues,
            queue_size,
            Timeouts::default(),
        )
    }

    fn with_timeouts(
        socket_path: &Path,
        tag: &str,
        num_request_queues: usize,
        queue_size: u16,
        timeouts: Timeouts,
    ) -> Result<Fs, FsError> {
        if num_request_queues == 0 {
            return Err(FsError::NoRequestQueue);
        }
        let nrq = u32::try_from(num_request_queues)
            .ok()
            .filter(|&n| n < u32::from(MAX_QUEUE_SIZE))
            .ok_or(FsError::TooManyQueues {
                wanted: num_request_queues.saturating_add(1),
                max: u64::from(MAX_QUEUE_SIZE),
            })?;
        let config = build_config(tag, nrq)?;
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(FsError::InvalidQueueSize(queue_size));
        }
        let num_queues = num_request_queues + 1;

        let stream = connect(socket_path, timeouts.connect)?;
        let sock = stream.try_clone().map_err(FsError::Socket)?;
        let watchdog = Watchdog::start(stream.try_clone().map_err(FsError::Socket)?)
            .map_err(FsError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, num_queues as u64);

        let (backend_features, protocol_features) = {
            let _armed = watchdog.arm(timeouts.exchange, "handshake");
            let fail = |step, source| {
                if watchdog.fired() {
                    FsError::Timeout {
                        step,
                        limit: timeouts.exchange,
                    }
                } else {
                    FsError::Handshake { step, source }
                }
            };
            handshake(&mut frontend, num_queues, fail)?
        };

        let avail_features = guest_features(backend_features);
        tracing::info!(
            tag,
            socket = %socket_path.display(),
            backend_features = format_args!("{backend_features:#x}"),
            protocol_features = format_args!("{:#x}", protocol_features.bits()),
            guest_features = format_args!("{avail_features:#x}"),
            "virtio-fs: connected to virtiofsd"
        );

        let call_evts = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        let broken = Arc::new(AtomicBool::new(false));
        let mut helpers: Vec<HelperThread> = watchdog.helper().into_iter().collect();
        let backend = Backend::start(
            tag.to_owned(),
            frontend,
            watchdog,
            timeouts.exchange,
            Arc::clone(&broken),
        )
        .map_err(FsError::Socket)?;
        helpers.extend(backend.helper());
        Ok(Fs {
            tag: tag.to_owned(),
            config,
            queue_sizes: vec![queue_size; num_queues],
            avail_features,
            acked_features: 0,
            protocol_features,
            backend,
            helpers,
            sock,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?,
            call_evts,
            calls_registered: false,
            active: None,
            broken,
            backend_gone: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Set by the event loop when virtiofsd closes the connection (it exited or was killed).
    /// The guest's file system requests then hang; the VMM may read this to report it.
    pub fn backend_gone_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.backend_gone)
    }

    pub fn is_backend_gone(&self) -> bool {
        self.backend_gone.load(Ordering::SeqCst)
    }

    /// Hands guest memory and the queues to virtiofsd. Everything is checked before the first
    /// message so that a bad activation leaves virtiofsd untouched.
    fn start_backend(
        &mut self,
        mem: &GuestMemory,
        queues: &[Queue],
        queue_evts: &[EventFd],
    ) -> Result<Vec<usize>, ActivateError> {
        let regions = memory_regions(mem)?;
        let mut vrings = Vec::new();
        for (index, queue) in queues.iter().enumerate() {
            if !queue.ready() {
                // The driver did not set this queue up; virtiofsd must not touch it.
                tracing::debug!("virtio-fs: queue {index} not ready, not started");
                continue;
            }
            vrings.push((
                index,
                vring_config(mem, index, queue, self.queue_sizes[index])?,
            ));
        }
        if vrings.is_empty() {
            return Err(ActivateError::Backend(
                "virtio-fs: the driver made no queue ready".into(),
            ));
        }

        let dup = |evt: &EventFd| evt.try_clone().map_err(ActivateError::Signal);
        let mut job = ActivateJob {
            acked_features: self.acked_features,
            regions,
            vrings: Vec::with_capacity(vrings.len()),
        };
        for (index, config) in vrings {
            let queue = &queues[index];
            job.vrings.push(VringJob {
                index,
                size: queue.size(),
                config,
                // 0 on a fresh queue; the transport's value stays right if it ever is not.
                base: queue.next_avail(),
                call: dup(&self.call_evts[index])?,
                kick: dup(&queue_evts[index])?,
            });
        }
        let started = job.vrings.iter().map(|v| v.index).collect();
        // virtiofsd runs these rings once the worker is done, so a reset must stop them.
        self.backend.activate(job);
        Ok(started)
    }

    /// Registers the call fds once the device is active (the event loop's side of activate).
    fn sync_registration(&mut self, ops: &mut EventOps) {
        if self.active.is_none() || self.calls_registered {
            return;
        }
        for (index, evt) in self.call_evts.iter().enumerate() {
            // Registered once and kept across resets: the fds are ours and stay quiet while
            // virtiofsd has no copy of them.
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!("virtio-fs: cannot watch call fd of queue {index}: {e}");
            }
        }
        self.calls_registered = true;
    }

    fn on_call(&mut self, index: usize) {
        match self.call_evts[index].read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::error!("virtio-fs: reading call fd of queue {index}: {e}");
                return;
            }
        }
        match &self.active {
            Some(active) => {
                if let Err(e) = active.irq.signal_used() {
                    tracing::error!("virtio-fs: cannot raise the interrupt: {e}");
                }
            }
            None => tracing::debug!("virtio-fs: call on queue {index} while inactive, dropped"),
        }
    }

    fn on_socket_event(&mut self, set: EventSet, ops: &mut EventOps) {
        if !set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
            return;
        }
        self.backend_gone.store(true, Ordering::SeqCst);
        self.broken.store(true, Ordering::SeqCst);
        tracing::error!(
            tag = %self.tag,
            "virtio-fs: virtiofsd closed the vhost-user connection; \
             file system requests from the guest will hang"
        );
        // Level-triggered: a hung-up socket stays readable-for-hang-up forever.
        if let Err(e) = ops.remove(Events::new(&self.sock, set)) {
            guest_warn!("virtio-fs: cannot stop watching the vhost-user socket: {e}");
        }
    }
}

impl Fs {
    /// The device's own threads (vhost-user worker, watchdog), for the controller to jail
    /// and filter when the VM starts.
    pub fn helper_threads(&mut self) -> Vec<HelperThread> {
        std::mem::take(&mut self.helpers)
    }

    /// Waits until the worker has done every exchange queued so far.
    #[cfg(test)]
    fn wait_backend(&self) {
        self.backend.wait_idle();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
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
        // virtio-fs config space is read-only for the driver.
        tracing::debug!(
            "virtio-fs: ignoring config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Backend(
                "virtio-fs: already activated".into(),
            ));
        }
        if self.broken.load(Ordering::SeqCst) || self.is_backend_gone() {
            return Err(ActivateError::Backend(
                "virtio-fs: the vhost-user connection to virtiofsd is lost".into(),
            ));
        }
        let Activation {
            mem,
            queues,
            queue_evts,
            irq,
        } = activation;
        let expected = self.queue_sizes.len();
        if queues.len() != expected || queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: if queues.len() != expected {
                    queues.len()
                } else {
                    queue_evts.len()
                },
            });
        }
        let started = self.start_backend(&mem, &queues, &queue_evts)?;
        self.active = Some(Active {
            irq,
            started,
            _queue_evts: queue_evts,
            _mem: mem,
        });
        // The event loop registers the call fds; until then virtiofsd's signals wait in them.
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) -> bool {
        let Some(active) = self.active.take() else {
            return true;
        };
        // Without RESET_DEVICE virtiofsd would keep its FUSE session, and the driver's next
        // FUSE_INIT would meet a file system already initialised.
        if self.broken.load(Ordering::SeqCst)
            || !self
                .protocol_features
                .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.active = Some(active);
            return false;
        }
        // After any activation still in progress; waited for (see `backend`).
        if !self.backend.reset(active.started.clone()) {
            self.active = Some(active);
            return false;
        }
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => {
                let _ = self.activate_evt.read();
                self.sync_registration(ops);
            }
            SOCKET_TOKEN => self.on_socket_event(events.event_set(), ops),
            index if (index as usize) < self.call_evts.len() => self.on_call(index as usize),
            other => guest_warn!("virtio-fs: event for unknown token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_TOKEN,
            EventSet::IN,
        )) {
            tracing::error!("virtio-fs: cannot watch the activate eventfd: {e}");
        }
        // Only hang-up: replies on the socket belong to the thread that sent the request.
        if let Err(e) = ops.add(Events::with_data(
            &self.sock,
            SOCKET_TOKEN,
            EventSet::READ_HANG_UP | EventSet::HANG_UP,
        )) {
            tracing::error!("virtio-fs: cannot watch the vhost-user socket: {e}");
        }
        self.sync_registration(ops);
    }
}
