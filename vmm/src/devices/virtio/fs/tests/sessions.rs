//! FUSE sessions through a live virtiofsd: requests on both queues, a new session after
//! reset, and activations the device refuses.

use vhost::vhost_user::VhostUserVirtioFeatures;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

#[test]
fn serves_fuse_init_and_lookup_through_virtiofsd() {
    let vfs = Virtiofsd::start();
    std::fs::write(vfs.shared.as_path().join("hello.txt"), b"hello").unwrap();
    let mut guest = Guest::connect(&vfs);
    {
        let fs = guest.fs.lock().unwrap();
        assert_eq!(fs.device_type(), TYPE_FS);
        assert_eq!(fs.queue_max_sizes(), &[QSIZE, QSIZE]);
        assert_ne!(fs.avail_features() & VIRTIO_F_VERSION_1, 0);
        assert_eq!(
            fs.avail_features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "a vhost-user-only bit leaked to the guest"
        );
    }
    guest.activate();
    guest.init();

    let unique = guest.unique();
    let reply = guest.send(1, &fuse_lookup(unique, "hello.txt"));
    assert_eq!(reply.error(), 0, "LOOKUP hello.txt");
    assert_eq!(reply.unique(), unique);
    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, 2 x nsec, then fuse_attr
    // (ino, size, ...).
    assert_ne!(le_u64(&reply.bytes, 16), 0, "nodeid");
    assert_eq!(
        le_u64(&reply.bytes, 16 + 40 + 8),
        5,
        "attr.size of hello.txt"
    );

    let unique = guest.unique();
    let reply = guest.send(1, &fuse_lookup(unique, "missing"));
    assert_eq!(reply.error(), -libc::ENOENT, "LOOKUP of a missing file");
    assert_eq!(reply.unique(), unique);
    assert_eq!(reply.len(), 16, "an error reply is the bare header");

    // The high-priority queue is served too (virtiofsd answers any request on it).
    let unique = guest.unique();
    let reply = guest.send(0, &fuse_lookup(unique, "hello.txt"));
    assert_eq!(reply.unique(), unique);

    assert!(!guest.fs.lock().unwrap().is_backend_gone());
}

#[test]
fn reset_then_reactivate_starts_a_new_session() {
    let vfs = Virtiofsd::start();
    let mut guest = Guest::connect(&vfs);
    guest.activate();
    guest.init();
    assert!(guest.fs.lock().unwrap().reset(), "reset");
    assert!(!guest.fs.lock().unwrap().is_activated());
    guest.activate();
    // A fresh FUSE session: INIT is accepted again, and requests work.
    guest.init();
    let unique = guest.unique();
    let reply = guest.send(1, &fuse_lookup(unique, "missing"));
    assert_eq!(reply.error(), -libc::ENOENT);
}

#[test]
fn activation_needs_memfd_memory_and_valid_rings() {
    let vfs = Virtiofsd::start();
    let mut guest = Guest::connect(&vfs);

    let anon = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(BUF_BASE), REGION),
    ])
    .unwrap();
    let (activation, _kicks) = guest.activation(anon, make_queues(2));
    let err = guest.fs.lock().unwrap().activate(activation).unwrap_err();
    assert!(
        err.to_string()
            .contains("virtio-fs needs memfd-backed guest memory"),
        "{err}"
    );

    let mut queues = make_queues(2);
    queues[1].set_used_ring_address(Some(0x7000_0000), Some(0));
    let (activation, _kicks) = guest.activation(guest.mem.clone(), queues);
    let err = guest.fs.lock().unwrap().activate(activation).unwrap_err();
    assert!(err.to_string().contains("queue 1 used ring"), "{err}");
    assert!(err.to_string().contains("outside guest memory"), "{err}");

    // A ring straddling the end of a region is refused too: its host address would run off
    // the mapping.
    let mut queues = make_queues(2);
    let near_end = REGION as u64 - 0x40;
    queues[1].set_desc_table_address(Some(near_end as u32), Some(0));
    let (activation, _kicks) = guest.activation(guest.mem.clone(), queues);
    let err = guest.fs.lock().unwrap().activate(activation).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");

    let (activation, _kicks) = guest.activation(guest.mem.clone(), make_queues(3));
    let err = guest.fs.lock().unwrap().activate(activation).unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 3
            }
        ),
        "{err}"
    );

    // Refused activations sent nothing, so the device still works.
    guest.activate();
    guest.init();
}
