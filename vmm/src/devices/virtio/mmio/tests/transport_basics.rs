//! The transport as a whole: construction, identification, a poisoned device, the kernel
//! command line entry, and moving it to a vCPU thread.

use super::*;

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
