//! Random register accesses: the transport must never panic, nor start a device outside a
//! completed handshake.

use proptest::prelude::*;

use super::*;

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
