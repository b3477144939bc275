//! Reset through the Status register, of a device that can reset and of one that cannot.

use super::*;
use crate::devices::virtio::INT_CONFIG;

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
