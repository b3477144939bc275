//! DRIVER_OK: handing queues to the device, refusing invalid ones, and guarding the queue
//! registers around activation.

use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::INT_CONFIG;

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
