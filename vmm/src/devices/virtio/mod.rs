//! virtio devices on the MMIO transport.
//!
//! A device is one module (state, queue handling, config space, errors), driven from two
//! sides: the vCPU thread reaches it through the MMIO transport (feature negotiation,
//! config space, activation), and the VM's event loop drives its queues and back end once
//! it is active. Activation happens on the vCPU thread, so a device keeps an `activate_evt`
//! that it registers in `init` and signals from `activate`; the event loop then registers
//! the queue and back-end fds (the Firecracker pattern).

pub mod activation;
pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
mod single_queue;
/// Driver-side queue handling for device unit tests: lays a split queue out in guest memory
/// (with virtio-queue's mock), then adds chains and reads used entries across many
/// requests, which `MockSplitQueue` alone cannot do without borrowing the memory for good.
#[cfg(test)]
pub(crate) mod test_queue;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::MutEventSubscriber;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::{Queue, QueueT};

/// Guest memory as every device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Device IDs from the virtio spec (5 Device Types).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Feature bits common to every device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bits of the MMIO transport.
pub const INT_VRING: u32 = 0x1;
pub const INT_CONFIG: u32 = 0x2;

/// Raises the device's interrupt: sets a bit in the transport's InterruptStatus register
/// (which the guest's handler reads and acks) and kicks the irqfd KVM injects from.
#[derive(Clone)]
pub struct IrqTrigger {
    pub status: Arc<AtomicU32>,
    pub evt: Arc<EventFd>,
}

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqTrigger {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    pub fn trigger(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The guest has used buffers to look at.
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.trigger(INT_VRING)
    }

    pub fn signal_config(&self) -> std::io::Result<()> {
        self.trigger(INT_CONFIG)
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    /// One per queue, written by KVM (ioeventfd) when the guest notifies that queue.
    pub queue_evts: Vec<EventFd>,
    pub irq: IrqTrigger,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("wrong number of queues: expected {expected}, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device back end: {0}")]
    Backend(String),
    #[error("cannot signal the event loop: {0}")]
    Signal(std::io::Error),
}

/// A virtio device as the MMIO transport sees it.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// Device ID (one of the `TYPE_*` constants).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`, already masked).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device config space at `offset`; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; devices ignore writes they do not allow.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: queues are valid and set up by the driver.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device after the driver wrote 0 to Status. Returns false when the device
    /// cannot be reset (the transport then marks it as needing a reset).
    fn reset(&mut self) -> bool {
        false
    }
    fn is_activated(&self) -> bool;
}

/// Reads `data.len()` bytes of `config` at `offset`, zero-filling past its end, so a guest
/// reading outside a config struct gets zeros instead of host memory.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Guest memory and mock queues for device unit tests.
    use super::*;
    use vm_memory::GuestAddress;

    pub fn guest_memory(size: usize) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut out);
        assert_eq!(out, [0, 0, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [0, 0, 0, 0]);
    }

    #[test]
    fn irq_trigger_sets_status_and_kicks() {
        let irq = IrqTrigger::new().unwrap();
        irq.signal_used().unwrap();
        irq.signal_config().unwrap();
        assert_eq!(irq.status.load(Ordering::SeqCst), INT_VRING | INT_CONFIG);
        assert_eq!(irq.evt.read().unwrap(), 2);
    }
}
