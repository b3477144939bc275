//! The virtio-mmio transport, version 2 ("modern"), virtio spec 1.2 §4.2.2.
//!
//! Each virtio device sits behind one [`MmioTransport`], which owns a 4 KiB window of guest
//! physical address space: registers below 0x100, the device's config space above. The vCPU
//! thread calls [`MmioTransport::read`] and [`MmioTransport::write`] on every MMIO exit in
//! that window; the transport runs the driver's side of device initialisation (status
//! handshake, feature negotiation, queue setup) and hands the device its queues once the
//! driver sets DRIVER_OK.
//!
//! Two registers never come here in the normal case: the VM builder registers each of
//! [`MmioTransport::queue_evts`] as a KVM ioeventfd on QueueNotify, and the
//! [`IrqTrigger`]'s eventfd as a KVM irqfd, so queue kicks and interrupts bypass the vCPU
//! thread entirely.
//!
//! The guest is untrusted: every register value is checked before use, nothing here panics
//! on guest input, and warnings a guest can provoke are rate-limited.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, error, info};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::guest_warn::guest_warn;

use super::{
    ActivateError, Activation, GuestMemory, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// "virt" in little-endian ASCII.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout; version 1 is the legacy one.
pub const MMIO_VERSION: u32 = 2;
/// Any value is allowed; Linux only matches on it when a driver asks for a vendor.
pub const VENDOR_ID: u32 = 0;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: the builder registers the queue ioeventfds at `base + NOTIFY_OFFSET`
/// with the queue index as datamatch.
pub const NOTIFY_OFFSET: u64 = 0x050;
/// Start of the device-specific config space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets (spec 4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}
use status::*;

/// Status during feature negotiation and during queue setup.
const ACK_DRIVER: u32 = ACKNOWLEDGE | DRIVER;
const ACK_DRIVER_FEATURES: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK;

/// Why a DRIVER_OK write did not start the device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device reports invalid maximum size {max} for queue {index}")]
    InvalidMaxSize { index: usize, max: u16 },
    #[error("queue {index} is not ready")]
    QueueNotReady { index: usize },
    #[error("queue {index}: size {size} is not a power of two in 1..={max}")]
    QueueSize { index: usize, size: u32, max: u16 },
    #[error("queue {index}: {err}")]
    QueueAddress {
        index: usize,
        err: virtio_queue::Error,
    },
    #[error("queue {index} does not fit in guest memory")]
    QueueMemory { index: usize },
    #[error("device mutex is poisoned")]
    Poisoned,
    #[error("device is already active")]
    AlreadyActive,
    #[error("cannot clone a queue eventfd: {0}")]
    EventFd(io::Error),
    #[error("device refused activation: {0}")]
    Activate(ActivateError),
}

/// One queue's registers exactly as the driver wrote them.
///
/// They are only turned into a [`Queue`] at DRIVER_OK: virtio-queue's setters quietly keep
/// the old value when given a bad one (misaligned address, odd size), so the device would
/// run on a ring the driver never laid out. Validating the raw values at activation lets the
/// transport refuse instead.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        // The spec leaves QueueNum's reset value open; the maximum matches virtio-queue.
        QueueRegs {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds the device's view of the queue, checking everything the driver chose.
    fn to_queue(
        self,
        index: usize,
        event_idx: bool,
        mem: &GuestMemory,
    ) -> Result<Queue, MmioError> {
        if !self.ready {
            return Err(MmioError::QueueNotReady { index });
        }
        let mut queue = Queue::new(self.max_size).map_err(|_| MmioError::InvalidMaxSize {
            index,
            max: self.max_size,
        })?;
        let size_err = || MmioError::QueueSize {
            index,
            size: self.size,
            max: self.max_size,
        };
        // try_set_size checks power of two and the maximum.
        let size = u16::try_from(self.size).map_err(|_| size_err())?;
        queue.try_set_size(size).map_err(|_| size_err())?;
        let address_err = |err| MmioError::QueueAddress { index, err };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(address_err)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(address_err)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(address_err)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(MmioError::QueueMemory { index });
        }
        Ok(queue)
    }
}

fn set_low(addr: &mut u64, value: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(value);
}

fn set_high(addr: &mut u64, value: u32) {
    *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
}

/// The 32 feature bits of `page` (0: bits 0-31, 1: bits 32-63); later pages are empty
/// because no device here has features past bit 63.
fn feature_page(features: u64, page: u32) -> u32 {
    match page {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// The virtio-mmio register interface of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    /// Cached because it never changes and reading it must not wait for the device lock.
    device_type: u32,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// Bits 0-63 the driver accepted so far; pushed to the device at FEATURES_OK.
    acked_features: u64,
    /// The driver accepted a bit past 63, which no device offers.
    acked_unknown_page: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    queue_evts: Vec<EventFd>,
    irq: IrqTrigger,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`, creating one notification eventfd per queue and the interrupt.
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> io::Result<Self> {
        let (device_type, max_sizes) = {
            let dev = device
                .lock()
                .map_err(|_| io::Error::other(MmioError::Poisoned))?;
            (dev.device_type(), dev.queue_max_sizes().to_vec())
        };
        // Catch a device bug at build time rather than when the guest activates it.
        for (index, &max) in max_sizes.iter().enumerate() {
            Queue::new(max).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    MmioError::InvalidMaxSize { index, max },
                )
            })?;
        }
        let queue_evts = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            device_type,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_page: false,
            queue_sel: 0,
            queues: max_sizes.into_iter().map(QueueRegs::new).collect(),
            queue_evts,
            irq: IrqTrigger::new()?,
            config_generation: 0,
        })
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's interrupt; the builder registers `irq().evt` as a KVM irqfd.
    pub fn irq(&self) -> &IrqTrigger {
        &self.irq
    }

    /// One eventfd per queue, in queue order; the builder registers each as a KVM ioeventfd
    /// at `base + NOTIFY_OFFSET`, 4 bytes, datamatch = queue index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Handles a guest read at `offset` within the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.read_config(offset, data);
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) else {
            data.fill(0);
            guest_warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio: ignored register read that is not 32 bits wide"
            );
            return;
        };
        let value = match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.lock_device().map_or(0, |dev| {
                feature_page(dev.avail_features(), self.device_features_sel)
            }),
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.irq.status.load(Ordering::SeqCst),
            reg::STATUS => self.device_status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!(
                    offset = format_args!("{offset:#x}"),
                    "virtio-mmio: read of an unknown or write-only register"
                );
                0
            }
        };
        *out = value.to_le_bytes();
    }

    /// Handles a guest write at `offset` within the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.write_config(offset, data);
            return;
        }
        let Ok(&bytes) = <&[u8; 4]>::try_from(data) else {
            guest_warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio: ignored register write that is not 32 bits wide"
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.write_queue(offset, |q| q.size = value),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => {
                self.irq.status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => self.write_queue(offset, |q| set_low(&mut q.desc, value)),
            reg::QUEUE_DESC_HIGH => self.write_queue(offset, |q| set_high(&mut q.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.write_queue(offset, |q| set_low(&mut q.driver, value)),
            reg::QUEUE_DRIVER_HIGH => self.write_queue(offset, |q| set_high(&mut q.driver, value)),
            reg::QUEUE_DEVICE_LOW => self.write_queue(offset, |q| set_low(&mut q.device, value)),
            reg::QUEUE_DEVICE_HIGH => self.write_queue(offset, |q| set_high(&mut q.device, value)),
            _ => {
                guest_warn!(
                    offset = format_args!("{offset:#x}"),
                    "virtio-mmio: write to an unknown or read-only register"
                );
            }
        }
    }

    fn lock_device(&self) -> Option<MutexGuard<'_, dyn VirtioDevice + 'static>> {
        match self.device.lock() {
            Ok(dev) => Some(dev),
            Err(_) => {
                // A panic on another thread while it held the device; the device state is
                // unknown, so every operation on it fails from now on.
                error!("virtio-mmio: device mutex is poisoned");
                None
            }
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// The config-space offset for an access at `offset` of `len` bytes, if it lies inside
    /// the window.
    fn config_offset(offset: u64, len: usize) -> Option<u64> {
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        if end > MMIO_WINDOW_SIZE {
            return None;
        }
        offset.checked_sub(CONFIG_OFFSET)
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(config_offset) = Self::config_offset(offset, data.len()) else {
            guest_warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio: config read outside the window"
            );
            return;
        };
        if let Some(dev) = self.lock_device() {
            dev.read_config(config_offset, data);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Some(config_offset) = Self::config_offset(offset, data.len()) else {
            guest_warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio: config write outside the window"
            );
            return;
        };
        // Only a driver that has claimed the device and not given up on it may change it.
        if self.device_status & (DRIVER | FAILED) != DRIVER {
            guest_warn!(
                status = format_args!("{:#x}", self.device_status),
                "virtio-mmio: config write before DRIVER or after FAILED ignored"
            );
            return;
        }
        let Some(mut dev) = self.lock_device() else {
            return;
        };
        dev.write_config(config_offset, data);
        drop(dev);
        // Tells a driver re-reading a multi-word field that the config may have changed.
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are accepted between DRIVER and FEATURES_OK (spec 3.1.1 steps 4-5).
        if self.device_status != ACK_DRIVER {
            guest_warn!(
                status = format_args!("{:#x}", self.device_status),
                "virtio-mmio: DriverFeatures write outside feature negotiation ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.acked_features, value),
            1 => set_high(&mut self.acked_features, value),
            page => {
                // Remembered so FEATURES_OK fails: the driver acked something never offered.
                if value != 0 {
                    debug!("virtio-mmio: driver acked features {value:#x} in page {page}");
                    self.acked_unknown_page = true;
                }
            }
        }
    }

    /// Applies `update` to the selected queue if the driver may change it now: during queue
    /// setup (FEATURES_OK set, DRIVER_OK not yet) and while the queue is not ready.
    fn write_queue(&mut self, offset: u64, update: impl FnOnce(&mut QueueRegs)) {
        let setup = self.device_status == ACK_DRIVER_FEATURES;
        let sel = self.queue_sel;
        let queue = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i));
        match queue {
            Some(q) if setup && !q.ready => update(q),
            _ => {
                guest_warn!(
                    offset = format_args!("{offset:#x}"),
                    queue = sel,
                    status = format_args!("{:#x}", self.device_status),
                    "virtio-mmio: queue register write ignored (no such queue, queue ready \
                         or not in queue setup)"
                );
            }
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        // Unlike the other queue registers this one may be cleared again during setup.
        let setup = self.device_status == ACK_DRIVER_FEATURES;
        let sel = self.queue_sel;
        let queue = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i));
        match queue {
            Some(q) if setup => q.ready = value == 1,
            _ => {
                guest_warn!(
                    queue = sel,
                    status = format_args!("{:#x}", self.device_status),
                    "virtio-mmio: QueueReady write ignored"
                );
            }
        }
    }

    /// A QueueNotify write that KVM did not catch with the ioeventfd (e.g. before it was
    /// registered): forward it the same way.
    fn notify(&mut self, value: u32) {
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => {
                guest_warn!(
                    queue = value,
                    "virtio-mmio: notify for a queue that does not exist"
                );
            }
        }
    }

    /// The Status register: the spec's initialisation sequence (3.1.1), one bit per write,
    /// each write carrying all the bits set before it.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            // The driver gave up on the device; it stays unusable until a reset.
            info!(
                status = format_args!("{value:#x}"),
                "virtio-mmio: driver marked the device FAILED"
            );
            self.device_status |= FAILED;
            return;
        }
        let current = self.device_status;
        if value == current {
            return;
        }
        if value & current != current {
            // Only a reset may clear bits.
            guest_warn!(
                current = format_args!("{current:#x}"),
                written = format_args!("{value:#x}"),
                "virtio-mmio: status write clearing bits ignored"
            );
            return;
        }
        let added = value & !current;
        match (current, added) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, DRIVER) => self.device_status = value,
            (ACK_DRIVER, FEATURES_OK) => self.features_ok(),
            (ACK_DRIVER_FEATURES, DRIVER_OK) => self.driver_ok(),
            _ => {
                guest_warn!(
                    current = format_args!("{current:#x}"),
                    written = format_args!("{value:#x}"),
                    "virtio-mmio: invalid status transition ignored"
                );
            }
        }
    }

    /// The driver is done choosing features. Accept them only if they are a subset of the
    /// offer and include VERSION_1 (a legacy driver on a modern transport); otherwise leave
    /// FEATURES_OK clear so the driver sees the refusal when it reads Status back.
    fn features_ok(&mut self) {
        let acked = self.acked_features;
        let refusal = match self.lock_device() {
            None => Some("device unavailable"),
            Some(_) if self.acked_unknown_page => Some("acked a feature past bit 63"),
            Some(_) if acked & VIRTIO_F_VERSION_1 == 0 => Some("VERSION_1 not acked"),
            Some(dev) if acked & !dev.avail_features() != 0 => Some("acked unoffered features"),
            Some(mut dev) => {
                dev.set_acked_features(acked);
                None
            }
        };
        match refusal {
            None => self.device_status |= FEATURES_OK,
            Some(reason) => {
                guest_warn!(
                    acked = format_args!("{acked:#x}"),
                    "virtio-mmio: FEATURES_OK refused: {reason}"
                );
            }
        }
    }

    fn driver_ok(&mut self) {
        match self.activate() {
            Ok(()) => {
                self.device_status |= DRIVER_OK;
                debug!(
                    device_type = self.device_type,
                    queues = self.queues.len(),
                    "virtio-mmio: device activated"
                );
            }
            Err(e) => {
                error!(
                    device_type = self.device_type,
                    "virtio-mmio: cannot activate device: {e}"
                );
                self.device_status |= DRIVER_OK;
                self.needs_reset();
            }
        }
    }

    /// Hands the device its queues. Every queue must be set up: the devices here use all
    /// of theirs, and starting one without a queue it expects would only fail later.
    fn activate(&mut self) -> Result<(), MmioError> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| regs.to_queue(index, event_idx, &self.mem))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::EventFd)?;
        let mut dev = self.lock_device().ok_or(MmioError::Poisoned)?;
        if dev.is_activated() {
            return Err(MmioError::AlreadyActive);
        }
        dev.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            irq: self.irq.clone(),
        })
        .map_err(MmioError::Activate)
    }

    /// Marks the device broken. Spec 2.1.2: once DRIVER_OK is set, the driver learns about
    /// it through a config change interrupt.
    fn needs_reset(&mut self) {
        self.device_status |= DEVICE_NEEDS_RESET;
        if self.device_status & DRIVER_OK != 0 {
            if let Err(e) = self.irq.signal_config() {
                error!("virtio-mmio: cannot raise config interrupt: {e}");
            }
        }
    }

    /// A 0 written to Status. Linux does this before every probe, so a device that never
    /// ran just gets fresh transport state; a running one must stop first.
    fn reset(&mut self) {
        let stopped = match self.lock_device() {
            None => false,
            Some(mut dev) => !dev.is_activated() || dev.reset(),
        };
        if !stopped {
            // The device still owns the old queues; keep DRIVER_OK so nothing can be set
            // up or activated over them. Another reset attempt retries.
            guest_warn!(
                device_type = self.device_type,
                "virtio-mmio: device cannot be reset"
            );
            self.needs_reset();
            return;
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_page = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        // Kicks from before the reset must not reach the next activation's queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.irq.status.store(0, Ordering::SeqCst);
        self.config_generation = 0;
    }
}

/// The kernel command-line parameter announcing a virtio-mmio device
/// (`virtio_mmio.device=<size>@<baseaddr>:<irq>`, Documentation/admin-guide/kernel-parameters).
pub fn cmdline_entry(size: u64, base: u64, irq: u32) -> String {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    // The kernel parses the size with memparse, which takes K/M/G suffixes.
    let size = match size {
        0 => "0".to_string(),
        s if s % G == 0 => format!("{}G", s / G),
        s if s % M == 0 => format!("{}M", s / M),
        s if s % K == 0 => format!("{}K", s / K),
        s => s.to_string(),
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::guest_memory;
    use crate::devices::virtio::{INT_CONFIG, INT_VRING, TYPE_BLOCK};
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use proptest::prelude::*;

    const MEM_SIZE: usize = 0x10_0000;
    const F_LOW: u64 = 1 << 3;
    const F_HIGH: u64 = 1 << 35;

    /// What the dummy device saw of one activation.
    struct Activated {
        /// (size, desc, avail, used, event_idx) per queue.
        queues: Vec<(u16, u64, u64, u64, bool)>,
        queue_evts: Vec<EventFd>,
    }

    struct Dummy {
        max_sizes: Vec<u16>,
        avail: u64,
        acked: u64,
        config: [u8; 8],
        config_writes: Vec<(u64, Vec<u8>)>,
        activations: Vec<Activated>,
        resets: usize,
        can_reset: bool,
        fail_activate: bool,
        active: bool,
    }

    impl Dummy {
        fn new(max_sizes: &[u16]) -> Self {
            Dummy {
                max_sizes: max_sizes.to_vec(),
                avail: VIRTIO_F_VERSION_1 | F_LOW | F_HIGH | VIRTIO_RING_F_EVENT_IDX,
                acked: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                config_writes: Vec::new(),
                activations: Vec::new(),
                resets: 0,
                can_reset: true,
                fail_activate: false,
                active: false,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            self.avail
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::devices::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config_writes.push((offset, data.to_vec()));
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Backend("dummy refuses".into()));
            }
            self.activations.push(Activated {
                queues: activation
                    .queues
                    .iter()
                    .map(|q| {
                        (
                            q.size(),
                            q.desc_table(),
                            q.avail_ring(),
                            q.used_ring(),
                            q.event_idx_enabled(),
                        )
                    })
                    .collect(),
                queue_evts: activation.queue_evts,
            });
            self.active = true;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            if self.can_reset {
                self.active = false;
            }
            self.can_reset
        }
        fn is_activated(&self) -> bool {
            self.active
        }
    }

    impl MutEventSubscriber for Dummy {
        fn init(&mut self, _ops: &mut EventOps) {}
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    }

    fn transport(dev: Dummy) -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(guest_memory(MEM_SIZE), dev.clone()).unwrap();
        (t, dev)
    }

    fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0xffu8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn features(t: &mut MmioTransport) -> u64 {
        w32(t, reg::DEVICE_FEATURES_SEL, 0);
        let low = r32(t, reg::DEVICE_FEATURES);
        w32(t, reg::DEVICE_FEATURES_SEL, 1);
        let high = r32(t, reg::DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// ACKNOWLEDGE, DRIVER, ack `acked`, try FEATURES_OK; returns Status read back.
    fn negotiate(t: &mut MmioTransport, acked: u64) -> u32 {
        w32(t, reg::STATUS, ACKNOWLEDGE);
        w32(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w32(t, reg::DRIVER_FEATURES_SEL, 0);
        w32(t, reg::DRIVER_FEATURES, acked as u32);
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, (acked >> 32) as u32);
        w32(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        r32(t, reg::STATUS)
    }

    fn queue_base(index: u32) -> u64 {
        0x1_0000 * (u64::from(index) + 1)
    }

    /// Lays queue `index` out at a distinct place in guest memory and marks it ready.
    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32) {
        let base = queue_base(index);
        w32(t, reg::QUEUE_SEL, index);
        assert_eq!(r32(t, reg::QUEUE_READY), 0);
        w32(t, reg::QUEUE_NUM, size);
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, base),
            (reg::QUEUE_DRIVER_LOW, base + 0x1000),
            (reg::QUEUE_DEVICE_LOW, base + 0x2000),
        ] {
            w32(t, low, addr as u32);
            w32(t, low + 4, (addr >> 32) as u32);
        }
        w32(t, reg::QUEUE_READY, 1);
        assert_eq!(r32(t, reg::QUEUE_READY), 1);
    }

    const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

    /// Negotiation, both queues set up, DRIVER_OK.
    fn activate_dummy(t: &mut MmioTransport) {
        assert_eq!(
            negotiate(t, VIRTIO_F_VERSION_1),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        setup_queue(t, 0, 16);
        setup_queue(t, 1, 4);
        w32(t, reg::STATUS, ALL_OK);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _dev) = transport(Dummy::new(&[16]));
        assert_eq!(r32(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), TYPE_BLOCK);
        assert_eq!(r32(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 0);
        assert_eq!(t.queue_evts().len(), 1);
        assert_eq!(t.device().lock().unwrap().device_type(), TYPE_BLOCK);
    }

    #[test]
    fn rejects_devices_with_bad_queue_sizes() {
        for bad in [0u16, 3, 65535] {
            let dev = Arc::new(Mutex::new(Dummy::new(&[16, bad])));
            let err = MmioTransport::new(guest_memory(MEM_SIZE), dev)
                .err()
                .unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn feature_negotiation_uses_both_halves() {
        let (mut t, dev) = transport(Dummy::new(&[16]));
        assert_eq!(
            features(&mut t),
            VIRTIO_F_VERSION_1 | F_LOW | F_HIGH | VIRTIO_RING_F_EVENT_IDX
        );
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0);

        let acked = VIRTIO_F_VERSION_1 | F_LOW | F_HIGH;
        assert_eq!(negotiate(&mut t, acked), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(dev.lock().unwrap().acked, acked);
        // Features are fixed once FEATURES_OK is set.
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features, acked);
    }

    #[test]
    fn features_ok_refused_for_bad_feature_sets() {
        for acked in [
            F_LOW | F_HIGH,               // no VERSION_1
            VIRTIO_F_VERSION_1 | 1 << 4,  // not offered, low half
            VIRTIO_F_VERSION_1 | 1 << 63, // not offered, high half
        ] {
            let (mut t, dev) = transport(Dummy::new(&[16]));
            assert_eq!(negotiate(&mut t, acked), ACKNOWLEDGE | DRIVER, "{acked:#x}");
            assert_eq!(dev.lock().unwrap().acked, 0);
            // Without FEATURES_OK the queues cannot be set up, nor the device started.
            w32(&mut t, reg::QUEUE_NUM, 8);
            assert_eq!(t.queues[0].size, 16);
            w32(
                &mut t,
                reg::STATUS,
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            );
            assert_eq!(r32(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
            assert!(dev.lock().unwrap().activations.is_empty());
        }

        // A bit in a feature page past 63.
        let (mut t, _dev) = transport(Dummy::new(&[16]));
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 2);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r32(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
    }

    #[test]
    fn status_only_moves_forward_one_step_at_a_time() {
        let (mut t, _dev) = transport(Dummy::new(&[16]));
        // Skipping a step.
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        w32(&mut t, reg::STATUS, DRIVER);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        // Going backwards, rewriting, and unknown bits.
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | 0x20);
        w32(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET,
        );
        assert_eq!(r32(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // FAILED is recorded and blocks everything until a reset.
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        assert_eq!(r32(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER | FAILED);
        w32(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK,
        );
        assert_eq!(r32(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER | FAILED);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn activation_hands_over_queues_and_eventfds() {
        let (mut t, dev) = transport(Dummy::new(&[16, 8]));
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        w32(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 16);
        w32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 8);
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 4);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);

        let d = dev.lock().unwrap();
        assert_eq!(d.activations.len(), 1);
        let a = &d.activations[0];
        assert_eq!(
            a.queues,
            vec![
                (16, 0x1_0000, 0x1_1000, 0x1_2000, true),
                (4, 0x2_0000, 0x2_1000, 0x2_2000, true),
            ]
        );
        assert_eq!(a.queue_evts.len(), 2);
        // The device's eventfds are the ones KVM will signal...
        t.queue_evts()[1].write(1).unwrap();
        assert_eq!(a.queue_evts[1].read().unwrap(), 1);
        assert!(a.queue_evts[0].read().is_err());
        // ...and a notify that reaches the transport lands in the same place.
        drop(d);
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        w32(&mut t, reg::QUEUE_NOTIFY, 7);
        w32(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
        let d = dev.lock().unwrap();
        assert_eq!(d.activations[0].queue_evts[0].read().unwrap(), 1);
        assert!(d.activations[0].queue_evts[1].read().is_err());
    }

    #[test]
    fn activates_the_rng_device() {
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut t = MmioTransport::new(guest_memory(MEM_SIZE), rng.clone()).unwrap();
        assert_eq!(
            r32(&mut t, reg::DEVICE_ID),
            crate::devices::virtio::TYPE_RNG
        );
        assert_eq!(features(&mut t), VIRTIO_F_VERSION_1);
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        setup_queue(&mut t, 0, 256);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
        assert!(rng.lock().unwrap().is_activated());
        // A reset stops it, and the driver can bring it up again.
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert!(!rng.lock().unwrap().is_activated());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
        assert!(rng.lock().unwrap().is_activated());
    }

    /// Sets up the queues of a fresh two-queue transport, lets `spoil` break them, then
    /// sets DRIVER_OK: the device must not start and must ask for a reset.
    fn refused(spoil: impl FnOnce(&mut MmioTransport)) {
        let (mut t, dev) = transport(Dummy::new(&[16, 8]));
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 8);
        spoil(&mut t);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK | DEVICE_NEEDS_RESET);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(t.irq().evt.read().unwrap(), 1);
        // Nothing more happens until the driver resets the device, which then works again.
        w32(
            &mut t,
            reg::STATUS,
            ALL_OK | DEVICE_NEEDS_RESET | ACKNOWLEDGE,
        );
        assert!(dev.lock().unwrap().activations.is_empty());
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 0, "never activated");
        activate_dummy(&mut t);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
        assert_eq!(dev.lock().unwrap().activations.len(), 1);
    }

    /// Rewrites a register of queue 1 during setup (un-readying it first).
    fn rewrite(t: &mut MmioTransport, offset: u64, value: u32) {
        w32(t, reg::QUEUE_SEL, 1);
        w32(t, reg::QUEUE_READY, 0);
        w32(t, offset, value);
        w32(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn invalid_queues_are_not_activated() {
        // Rings outside guest memory, partly or entirely.
        refused(|t| rewrite(t, reg::QUEUE_DESC_HIGH, 1));
        refused(|t| rewrite(t, reg::QUEUE_DRIVER_LOW, MEM_SIZE as u32));
        refused(|t| rewrite(t, reg::QUEUE_DEVICE_LOW, MEM_SIZE as u32 - 8));
        refused(|t| rewrite(t, reg::QUEUE_DESC_HIGH, u32::MAX));
        // Misaligned rings.
        refused(|t| rewrite(t, reg::QUEUE_DESC_LOW, 0x2_0008));
        refused(|t| rewrite(t, reg::QUEUE_DRIVER_LOW, 0x2_1001));
        refused(|t| rewrite(t, reg::QUEUE_DEVICE_LOW, 0x2_2002));
        // Sizes that are zero, too big or not a power of two.
        for size in [0, 6, 16, 0x1_0000, 0x1_0008, u32::MAX] {
            refused(|t| rewrite(t, reg::QUEUE_NUM, size));
        }
        // A queue the driver left unready.
        refused(|t| {
            w32(t, reg::QUEUE_SEL, 0);
            w32(t, reg::QUEUE_READY, 0);
        });
    }

    #[test]
    fn failed_activation_needs_reset() {
        let mut d = Dummy::new(&[16, 8]);
        d.fail_activate = true;
        let (mut t, dev) = transport(d);
        activate_dummy(&mut t);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK | DEVICE_NEEDS_RESET);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        dev.lock().unwrap().fail_activate = false;
        w32(&mut t, reg::STATUS, 0);
        activate_dummy(&mut t);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
    }

    #[test]
    fn queue_registers_are_guarded() {
        let (mut t, _dev) = transport(Dummy::new(&[16, 8]));
        // Before FEATURES_OK.
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w32(&mut t, reg::QUEUE_NUM, 4);
        w32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!((t.queues[0].size, t.queues[0].ready), (16, false));

        w32(&mut t, reg::STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // A selector past the last queue reads zeros and changes nothing.
        for sel in [2, u32::MAX] {
            w32(&mut t, reg::QUEUE_SEL, sel);
            assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0);
            assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
            w32(&mut t, reg::QUEUE_NUM, 4);
            w32(&mut t, reg::QUEUE_READY, 1);
            w32(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        }
        assert!(t
            .queues
            .iter()
            .all(|q| q.size == u32::from(q.max_size) && !q.ready));
        assert!(t.queues.iter().all(|q| q.desc == 0));

        // A ready queue is frozen, except for QueueReady itself.
        setup_queue(&mut t, 0, 16);
        w32(&mut t, reg::QUEUE_NUM, 4);
        w32(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!((t.queues[0].size, t.queues[0].desc), (16, 0x1_0000));

        // After DRIVER_OK nothing changes.
        setup_queue(&mut t, 1, 8);
        w32(&mut t, reg::STATUS, ALL_OK);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
        let before = format!("{:?}", t.queues);
        for sel in [0, 1] {
            w32(&mut t, reg::QUEUE_SEL, sel);
            w32(&mut t, reg::QUEUE_READY, 0);
            w32(&mut t, reg::QUEUE_NUM, 2);
            for off in (reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH).step_by(4) {
                w32(&mut t, off, 0x40);
            }
        }
        assert_eq!(format!("{:?}", t.queues), before);
        // Nor do features.
        w32(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, _dev) = transport(Dummy::new(&[16]));
        t.irq().signal_used().unwrap();
        t.irq().signal_config().unwrap();
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        w32(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        w32(&mut t, reg::INTERRUPT_ACK, u32::MAX);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        // The register is not writable.
        w32(&mut t, reg::INTERRUPT_STATUS, INT_VRING);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn reset_stops_the_device_and_clears_state() {
        let (mut t, dev) = transport(Dummy::new(&[16, 8]));
        activate_dummy(&mut t);
        t.irq().signal_used().unwrap();
        t.queue_evts()[0].write(1).unwrap();
        w32(&mut t, reg::QUEUE_SEL, 1);
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);

        w32(&mut t, reg::STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(!dev.lock().unwrap().active);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0, "QueueSel back to 0");
        assert_eq!(
            r32(&mut t, reg::DEVICE_FEATURES),
            VIRTIO_RING_F_EVENT_IDX as u32 | 8
        );
        assert_eq!(t.acked_features, 0);
        assert!(t
            .queues
            .iter()
            .all(|q| !q.ready && q.desc == 0 && q.size == u32::from(q.max_size)));
        assert!(t.queue_evts()[0].read().is_err(), "stale kick drained");

        // The driver can start over.
        activate_dummy(&mut t);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK);
        assert_eq!(dev.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn reset_of_a_device_that_cannot_reset() {
        let mut d = Dummy::new(&[16, 8]);
        d.can_reset = false;
        let (mut t, dev) = transport(d);
        // Before activation there is nothing to stop: Linux resets every device it probes.
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 0);

        activate_dummy(&mut t);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r32(&mut t, reg::STATUS), ALL_OK | DEVICE_NEEDS_RESET);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        // The old queues stay in place and cannot be activated over.
        w32(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        assert_eq!(dev.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn config_space_goes_to_the_device() {
        let (mut t, dev) = transport(Dummy::new(&[16]));
        let mut b = [0u8; 4];
        t.read(CONFIG_OFFSET + 2, &mut b);
        assert_eq!(b, [3, 4, 5, 6]);
        let mut one = [0u8; 1];
        t.read(CONFIG_OFFSET + 7, &mut one);
        assert_eq!(one, [8]);
        let mut wide = [0xffu8; 8];
        t.read(CONFIG_OFFSET + 4, &mut wide);
        assert_eq!(wide, [5, 6, 7, 8, 0, 0, 0, 0]);

        // Writes only once a driver has the device.
        t.write(CONFIG_OFFSET, &[9]);
        assert!(dev.lock().unwrap().config_writes.is_empty());
        w32(&mut t, reg::STATUS, ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        t.write(CONFIG_OFFSET + 1, &[9, 10]);
        t.write(CONFIG_OFFSET + 4, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            dev.lock().unwrap().config_writes,
            vec![(1, vec![9, 10]), (4, vec![1, 2, 3, 4, 5, 6, 7, 8])]
        );
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), 2);

        // Nothing past the 4 KiB window reaches the device.
        t.write(MMIO_WINDOW_SIZE - 2, &[1, 2, 3, 4]);
        t.write(MMIO_WINDOW_SIZE, &[1]);
        t.write(u64::MAX, &[1]);
        assert_eq!(dev.lock().unwrap().config_writes.len(), 2);
        let mut b = [0xffu8; 4];
        t.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);

        w32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        t.write(CONFIG_OFFSET, &[1]);
        assert_eq!(dev.lock().unwrap().config_writes.len(), 2);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut t, _dev) = transport(Dummy::new(&[16]));
        for len in [0usize, 1, 2, 3, 8] {
            let mut b = vec![0xffu8; len];
            t.read(reg::MAGIC_VALUE, &mut b);
            assert!(b.iter().all(|&x| x == 0));
            t.write(reg::STATUS, &vec![1u8; len]);
        }
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        // Unaligned, unknown and write-only registers.
        for off in [0x2, 0x18, 0x38, 0x50, 0x64, 0x80, 0xf8] {
            assert_eq!(r32(&mut t, off), 0, "{off:#x}");
        }
        for off in [0x1, 0x18, 0x0, 0x8, 0x60, 0xfc] {
            w32(&mut t, off, 1);
        }
        assert_eq!(r32(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn poisoned_device_fails_safely() {
        let (mut t, dev) = transport(Dummy::new(&[16, 8]));
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(dev.is_poisoned());
        assert_eq!(features(&mut t), 0);
        let mut b = [0xffu8; 4];
        t.read(CONFIG_OFFSET, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1),
            ACKNOWLEDGE | DRIVER,
            "FEATURES_OK needs the device"
        );
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(
            r32(&mut t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET
        );
    }

    #[test]
    fn command_line_entry() {
        assert_eq!(
            cmdline_entry(0x1000, 0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            cmdline_entry(0x20_0000, 0x1000, 12),
            "virtio_mmio.device=2M@0x1000:12"
        );
        assert_eq!(
            cmdline_entry(0x1_0000_0000, 0, 1),
            "virtio_mmio.device=4G@0x0:1"
        );
        assert_eq!(cmdline_entry(100, 0x10, 1), "virtio_mmio.device=100@0x10:1");
    }

    #[test]
    fn transport_can_move_to_a_vcpu_thread() {
        fn is_send<T: Send>() {}
        is_send::<MmioTransport>();
    }

    const REGISTERS: &[u64] = &[
        reg::DEVICE_FEATURES_SEL,
        reg::DRIVER_FEATURES,
        reg::DRIVER_FEATURES_SEL,
        reg::QUEUE_SEL,
        reg::QUEUE_NUM,
        reg::QUEUE_READY,
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_ACK,
        reg::STATUS,
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_DESC_HIGH,
        reg::QUEUE_DRIVER_LOW,
        reg::QUEUE_DRIVER_HIGH,
        reg::QUEUE_DEVICE_LOW,
        reg::QUEUE_DEVICE_HIGH,
    ];

    fn any_access() -> impl Strategy<Value = (bool, u64, usize, u64)> {
        let offset = prop_oneof![
            4 => prop::sample::select(REGISTERS),
            2 => 0u64..0x1100,
            1 => any::<u64>(),
        ];
        let width = prop_oneof![8 => Just(4usize), 1 => 0usize..=9];
        // Small values walk the status machine and queue selectors; big ones are hostile.
        let value = prop_oneof![
            3 => 0u64..0x10,
            1 => prop::sample::select(vec![0x1_0000u64, 0x2_0000, 0x2_1000, 0x2_2000]),
            1 => any::<u64>(),
        ];
        (any::<bool>(), offset, width, value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_accesses_never_panic(
            accesses in prop::collection::vec(any_access(), 1..96),
            can_reset in any::<bool>(),
            start in 0..3u8,
        ) {
            let mut d = Dummy::new(&[16, 8]);
            d.can_reset = can_reset;
            let (mut t, dev) = transport(d);
            // Random accesses rarely complete the handshake; start some runs further on.
            match start {
                1 => {
                    negotiate(&mut t, VIRTIO_F_VERSION_1);
                }
                2 => activate_dummy(&mut t),
                _ => {}
            }
            for (write, offset, width, value) in accesses {
                let bytes = value.to_le_bytes();
                let mut buf = vec![0u8; width];
                let n = width.min(8);
                buf[..n].copy_from_slice(&bytes[..n]);
                if write {
                    t.write(offset, &buf);
                } else {
                    t.read(offset, &mut buf);
                }
                let status = t.device_status;
                let d = dev.lock().unwrap();
                // The device runs only behind a completed handshake.
                if d.active {
                    prop_assert_eq!(status & ALL_OK, ALL_OK);
                }
                if status & DRIVER_OK != 0 {
                    prop_assert!(status & FEATURES_OK != 0);
                }
                if status & FEATURES_OK != 0 {
                    prop_assert!(t.acked_features & VIRTIO_F_VERSION_1 != 0);
                    prop_assert_eq!(t.acked_features & !d.avail, 0);
                }
                prop_assert!(d.activations.len() <= d.resets + 1);
            }
        }
    }
}
