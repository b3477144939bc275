//! The device as the transport sees it: config space, features, construction, activation.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use super::*;
use crate::devices::virtio::{TYPE_VSOCK, VIRTIO_F_VERSION_1};

#[test]
fn config_space_and_features() {
    let dir = tmp_dir();
    let mut dev = Vsock::new(0x8765_4321, dir.as_path().join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x8765_4321);
    let mut mid = [0u8; 4];
    dev.read_config(2, &mut mid);
    assert_eq!(u32::from_le_bytes(mid), 0x8765);
    dev.write_config(0, &[0xff; 8]);
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x8765_4321);
    let mut past = [0xffu8; 4];
    dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    dev.set_acked_features(u64::MAX);
    assert!(!dev.is_activated());
}

#[test]
fn construction_checks_cid_and_socket_path() {
    let dir = tmp_dir();
    let path = dir.as_path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid, &path),
            Err(VsockError::InvalidCid(_))
        ));
    }

    let dev = Vsock::new(3, &path).unwrap();
    assert_eq!(dev.uds_path(), path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the vsock socket is open to others: {mode:o}");
    // A live listener is never taken over.
    assert!(matches!(
        Vsock::new(4, &path),
        Err(VsockError::AddressInUse(_))
    ));
    // Dropping the device closes its listener; the file is the cleanup helper's to remove
    // (`crate::cleanup`: the VMM's filter has no unlink). Left stale, it is replaced.
    drop(dev);
    assert!(path.exists());
    assert!(
        UnixStream::connect(&path).is_err(),
        "nobody listens any more"
    );
    let dev = Vsock::new(3, &path).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(dev);
    std::fs::remove_file(&path).unwrap();

    // A live listener whose backlog is full is in use, and finding that out never blocks.
    let busy = UnixListener::bind(&path).unwrap();
    let mut queued = Vec::new();
    while let Ok(c) = super::host_sock::connect_nonblocking(&path) {
        queued.push(c);
        assert!(queued.len() < 100_000, "the backlog never filled");
    }
    assert!(matches!(
        Vsock::new(3, &path),
        Err(VsockError::AddressInUse(_))
    ));
    drop((busy, queued));
    std::fs::remove_file(&path).unwrap();

    // Anything else is left alone.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        Vsock::new(3, &path),
        Err(VsockError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn activation_needs_three_queues() {
    let dir = tmp_dir();
    let mut dev = Vsock::new(3, dir.as_path().join("v.sock")).unwrap();
    let mem = standalone_mem();
    let q = MockSplitQueue::new(mem, 16);
    let err = dev
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            irq: IrqTrigger::new().unwrap(),
        })
        .unwrap_err();
    assert!(matches!(
        err,
        crate::devices::virtio::ActivateError::QueueCount {
            expected: 3,
            got: 1
        }
    ));
    assert!(!dev.is_activated());
}
