//! Feature negotiation and the Status register's one-step-at-a-time initialisation.

use super::*;

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
