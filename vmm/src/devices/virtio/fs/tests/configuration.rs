//! What needs no virtiofsd: tag and queue parameters, the features the guest sees, and the
//! memfd-backed guest memory.

use std::os::unix::fs::FileExt;

use vhost::vhost_user::VhostUserVirtioFeatures;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

#[test]
fn tag_is_validated_and_laid_out() {
    let long = "x".repeat(TAG_MAX_LEN + 1);
    // Checked before connecting: the socket path does not matter.
    let err = Fs::new("/nonexistent/vfs.sock", &long, 1, QSIZE)
        .err()
        .expect("long tag");
    assert!(matches!(err, FsError::InvalidTag { .. }), "{err}");
    assert!(err.to_string().contains("longer than 36 bytes"), "{err}");
    assert!(build_config("", 1).is_err());
    assert!(build_config("a\0b", 1).is_err());

    let max = "y".repeat(TAG_MAX_LEN);
    let config = build_config(&max, 1).unwrap();
    assert_eq!(&config[..TAG_MAX_LEN], max.as_bytes());

    let config = build_config("myfs", 3).unwrap();
    assert_eq!(&config[..4], b"myfs");
    assert!(
        config[4..TAG_MAX_LEN].iter().all(|&b| b == 0),
        "NUL padding"
    );
    assert_eq!(&config[TAG_MAX_LEN..], &3u32.to_le_bytes());
    let mut out = [0xffu8; 8];
    read_config_bytes(&config, 36, &mut out);
    assert_eq!(out, [3, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn queue_parameters_are_validated() {
    for bad in [0u16, 3, 1000] {
        let err = Fs::new("/nonexistent/vfs.sock", "husk", 1, bad)
            .err()
            .unwrap();
        assert!(matches!(err, FsError::InvalidQueueSize(_)), "{bad}: {err}");
    }
    let err = Fs::new("/nonexistent/vfs.sock", "husk", 0, QSIZE)
        .err()
        .unwrap();
    assert!(matches!(err, FsError::NoRequestQueue), "{err}");
}

#[test]
fn guest_sees_only_ring_features() {
    // What virtiofsd 1.x offers: VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES, LOG_ALL.
    let virtiofsd = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_RING_F_EVENT_IDX
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_eq!(
        guest_features(virtiofsd),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    );
    assert_eq!(guest_features(0), VIRTIO_F_VERSION_1);
}

#[test]
fn shared_guest_memory_is_file_backed_and_shared() {
    let mem = shared_guest_memory(&[(GuestAddress(0), 0x1000), (GuestAddress(0x10_0000), 0x2000)])
        .unwrap();
    assert_eq!(mem.num_regions(), 2);
    mem.write_slice(b"shared", GuestAddress(0x10_0010)).unwrap();
    let region = mem.find_region(GuestAddress(0x10_0000)).unwrap();
    assert_eq!(region.len(), 0x2000);
    let fo = region.file_offset().expect("memfd-backed");
    // What the VMM writes is in the file, so a process mapping the memfd (virtiofsd) sees it.
    let mut buf = [0u8; 6];
    fo.file()
        .read_exact_at(&mut buf, fo.start() + 0x10)
        .unwrap();
    assert_eq!(&buf, b"shared");
    assert!(
        shared_guest_memory(&[(GuestAddress(0), 0x1000), (GuestAddress(0x800), 0x1000)]).is_err()
    );
}
