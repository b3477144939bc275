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

mod lifecycle;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, error};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::guest_warn::guest_warn;

use super::{ActivateError, GuestMemory, IrqTrigger, VirtioDevice};

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
mod tests;
