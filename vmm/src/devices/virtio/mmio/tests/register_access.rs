//! Interrupt acknowledgement, config-space accesses, and accesses of odd width or offset.

use super::*;
use crate::devices::virtio::{INT_CONFIG, INT_VRING};

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
