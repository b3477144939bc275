//! virtio-rng (virtio spec 5.4): entropy for the guest from the host's /dev/urandom.
//!
//! One request queue. Each chain's device-writable buffers are filled straight from the
//! urandom file by vm-memory's checked volatile IO. A request is capped at
//! [`MAX_REQUEST_BYTES`] so a guest cannot make one notification cost unbounded host work.

use std::fs::File;
use std::io;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, error};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::activation::DeviceActivation;
use super::single_queue::{self, SingleQueueDevice, EV_ACTIVATE, EV_QUEUE};
use super::{ActivateError, Activation, GuestMemory, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::devices::guest_warn::guest_warn;
use crate::devices::rate_limiter::RateLimiter;

pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out for one request; the rest of a larger chain stays untouched.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
const ENTROPY_SOURCE: &str = "/dev/urandom";

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open {ENTROPY_SOURCE}: {0}")]
    Open(io::Error),
    #[error("cannot create eventfd: {0}")]
    EventFd(io::Error),
}

/// A virtio-rng device. The VM builder creates it with [`Rng::new`], attaches it to an
/// MMIO transport and adds it to the event manager as a subscriber.
pub struct Rng {
    source: File,
    acked_features: u64,
    activation: DeviceActivation,
    limiter: Option<RateLimiter>,
}

/// Fills the chain's writable buffers from `source`, up to [`MAX_REQUEST_BYTES`]; returns
/// how many bytes were written.
fn fill_chain(source: &mut File, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let mut written = 0u32;
    for desc in chain.filter(|d| d.is_write_only()) {
        let n = desc.len().min(MAX_REQUEST_BYTES - written);
        if n == 0 {
            // Either an empty buffer or the cap; only the cap ends the walk early.
            if written == MAX_REQUEST_BYTES {
                break;
            }
            continue;
        }
        match mem.read_exact_volatile_from(desc.addr(), source, n as usize) {
            Ok(()) => written += n,
            Err(e) => {
                guest_warn!(
                    "virtio-rng: cannot fill buffer at {:#x}: {e}",
                    desc.addr().0
                );
                break;
            }
        }
    }
    written
}

impl Rng {
    pub fn new() -> Result<Rng, RngError> {
        Ok(Rng {
            source: File::open(ENTROPY_SOURCE).map_err(RngError::Open)?,
            acked_features: 0,
            activation: DeviceActivation::new("virtio-rng", EV_ACTIVATE, &[EV_QUEUE])
                .map_err(RngError::EventFd)?,
            limiter: None,
        })
    }

    /// Limits the guest's requests: each costs an operation and the bytes it asks for.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    fn process_queue(&mut self) {
        let Some(active) = self.activation.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let queue = &mut active.queues[0];
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            if let Some(limiter) = &mut self.limiter {
                let asked: u64 = chain
                    .clone()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len()))
                    .sum();
                if !limiter.consume(asked.min(u64::from(MAX_REQUEST_BYTES))) {
                    // Served when the limiter's timer fires.
                    queue.go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            let len = fill_chain(&mut self.source, &active.mem, chain);
            if let Err(e) = queue.add_used(&active.mem, head, len) {
                guest_warn!("virtio-rng: cannot return descriptor {head}: {e}");
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = active.irq.signal_used() {
                error!("virtio-rng: cannot raise interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-rng: ignored {}-byte config write at {offset:#x}",
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

impl SingleQueueDevice for Rng {
    const NAME: &'static str = "virtio-rng";

    fn activation(&mut self) -> &mut DeviceActivation {
        &mut self.activation
    }

    fn limiter(&mut self) -> Option<&mut RateLimiter> {
        self.limiter.as_mut()
    }

    fn process_queue(&mut self) {
        Rng::process_queue(self)
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue::process(self, events, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_queue::{check_one_queue_activation_cycle, r, w, TestQueue};
    use crate::devices::virtio::test_utils::guest_memory;
    use crate::devices::virtio::IrqTrigger;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MEM_SIZE: usize = 0x40_0000;
    const BUF: u64 = 0x1_0000;

    fn activated(mem: &GuestMemory) -> (Rng, TestQueue, IrqTrigger) {
        let mut queue = TestQueue::new(mem, 0, 16);
        let irq = IrqTrigger::new().unwrap();
        let mut rng = Rng::new().unwrap();
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue.take_queue()],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            irq: irq.clone(),
        })
        .unwrap();
        (rng, queue, irq)
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = guest_memory(MEM_SIZE);
        let (mut rng, mut queue, irq) = activated(&mem);
        let head = queue.add(
            &mem,
            &[w(BUF, 256), r(BUF + 0x1000, 64), w(BUF + 0x2000, 100)],
        );
        rng.process_queue();
        assert_eq!(queue.used_idx(&mem), 1);
        assert_eq!(queue.used(&mem, 0), (u32::from(head), 356));
        assert!(read(&mem, BUF, 256).iter().any(|&b| b != 0));
        assert!(read(&mem, BUF + 0x2000, 100).iter().any(|&b| b != 0));
        // The device-readable buffer is left alone, and so are the bytes after each buffer.
        assert!(read(&mem, BUF + 0x1000, 64).iter().all(|&b| b == 0));
        assert!(read(&mem, BUF + 256, 16).iter().all(|&b| b == 0));
        assert_eq!(irq.evt.read().unwrap(), 1);
    }

    #[test]
    fn two_requests_get_different_bytes() {
        let mem = guest_memory(MEM_SIZE);
        let (mut rng, mut queue, _irq) = activated(&mem);
        queue.add(&mem, &[w(BUF, 64)]);
        queue.add(&mem, &[w(BUF + 0x1000, 64)]);
        rng.process_queue();
        assert_eq!(queue.used_idx(&mem), 2);
        assert_ne!(read(&mem, BUF, 64), read(&mem, BUF + 0x1000, 64));
    }

    #[test]
    fn oversize_request_is_capped() {
        let mem = guest_memory(MEM_SIZE);
        let (mut rng, mut queue, _irq) = activated(&mem);
        let big = MAX_REQUEST_BYTES / 2 + 4096;
        let second = BUF + 0x10_0000;
        queue.add(&mem, &[w(BUF, big), w(second, big), w(BUF + 0x30_0000, 16)]);
        rng.process_queue();
        assert_eq!(queue.used(&mem, 0).1, MAX_REQUEST_BYTES);
        // The tail of the second buffer past the cap, and the third, were not written.
        let filled = (MAX_REQUEST_BYTES - big) as usize;
        assert!(read(&mem, second + filled as u64, 4096)
            .iter()
            .all(|&b| b == 0));
        assert!(read(&mem, second + filled as u64 - 4096, 4096)
            .iter()
            .any(|&b| b != 0));
        assert!(read(&mem, BUF + 0x30_0000, 16).iter().all(|&b| b == 0));
    }

    #[test]
    fn odd_chains_are_returned() {
        let mem = guest_memory(MEM_SIZE);
        let (mut rng, mut queue, _irq) = activated(&mem);
        // Only device-readable buffers: nothing to fill.
        queue.add(&mem, &[r(BUF, 64)]);
        // A buffer outside guest memory after a good one: stops there.
        queue.add(&mem, &[w(BUF, 32), w(1 << 40, 32), w(BUF + 64, 32)]);
        // Empty buffers and one running off the end of memory.
        queue.add(&mem, &[w(BUF, 0), w(MEM_SIZE as u64 - 8, 16)]);
        queue.add(&mem, &[w(u64::MAX - 4, 16)]);
        rng.process_queue();
        assert_eq!(queue.used_idx(&mem), 4);
        assert_eq!(queue.used(&mem, 0).1, 0);
        assert_eq!(queue.used(&mem, 1).1, 32);
        assert_eq!(queue.used(&mem, 2).1, 0);
        assert_eq!(queue.used(&mem, 3).1, 0);
    }

    #[test]
    fn activation_goes_through_the_event_loop() {
        let mem = guest_memory(MEM_SIZE);
        let rng = Rng::new().unwrap();
        assert_eq!(rng.device_type(), TYPE_RNG);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        let used = check_one_queue_activation_cycle(rng, &mem, &[w(BUF, 32)]);
        assert_eq!(used, [32, 32]);
    }
}
