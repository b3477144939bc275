use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_utils::guest_memory;
use crate::devices::virtio::{
    Activation, INT_CONFIG, INT_VRING, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
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
