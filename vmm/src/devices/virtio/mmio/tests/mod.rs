//! Transport tests: a dummy device behind a real `MmioTransport`, driven register by register
//! as a guest driver would. This module holds the dummy and the driver steps; the tests are
//! in the submodules, by what they exercise.

mod activation;
mod fuzzing;
mod negotiation;
mod register_access;
mod reset;
mod transport_basics;

use super::*;
use crate::devices::virtio::test_utils::guest_memory;
use crate::devices::virtio::{Activation, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use event_manager::{EventOps, Events, MutEventSubscriber};

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
