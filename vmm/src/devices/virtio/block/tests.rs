use super::*;
use crate::devices::virtio::test_queue::{
    check_one_queue_activation_cycle, r, w, TestDesc, TestQueue,
};
use crate::devices::virtio::test_utils::guest_memory;
use crate::devices::virtio::IrqTrigger;
use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use std::io::{Read, Write};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: usize = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x8_0000;
const DISK_SECTORS: u64 = 64;

struct Harness {
    mem: GuestMemory,
    queue: TestQueue,
    blk: Block,
    file: TempFile,
    irq: IrqTrigger,
}

impl Harness {
    fn new(read_only: bool) -> Self {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(DISK_SECTORS * SECTOR_SIZE).unwrap();
        let blk = Block::new(file.as_path(), read_only).unwrap();
        Self::with_block(blk, file)
    }

    fn with_block(mut blk: Block, file: TempFile) -> Self {
        let mem = guest_memory(MEM_SIZE);
        let mut queue = TestQueue::new(&mem, 0, 16);
        blk.set_acked_features(blk.avail_features());
        let irq = IrqTrigger::new().unwrap();
        blk.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue.take_queue()],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            irq: irq.clone(),
        })
        .unwrap();
        Harness {
            mem,
            queue,
            blk,
            file,
            irq,
        }
    }

    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs one chain through the device; returns the used length.
    fn run(&mut self, descs: &[TestDesc]) -> u32 {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let before = self.queue.used_idx(&self.mem);
        let head = self.queue.add(&self.mem, descs);
        self.blk.process_queue();
        assert_eq!(
            self.queue.used_idx(&self.mem),
            before.wrapping_add(1),
            "chain not returned"
        );
        let (id, len) = self.queue.used(&self.mem, before);
        assert_eq!(id, u32::from(head));
        len
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn disk_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let mut f = File::open(self.file.as_path()).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }
}

#[test]
fn write_then_read_back() {
    let mut h = Harness::new(false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_OUT, 3);
    // Data split over two descriptors of unequal size.
    let len = h.run(&[r(HDR, 16), r(DATA, 300), r(DATA + 300, 724), w(STATUS, 1)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1);
    let disk = h.disk_bytes();
    assert_eq!(&disk[3 * 512..5 * 512], &pattern[..]);
    assert!(disk[..3 * 512].iter().all(|&b| b == 0));
    assert!(disk[5 * 512..].iter().all(|&b| b == 0));

    let back = DATA + 0x1_0000;
    h.header(VIRTIO_BLK_T_IN, 3);
    let len = h.run(&[r(HDR, 16), w(back, 512), w(back + 512, 512), w(STATUS, 1)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1024 + 1);
    let mut got = vec![0u8; 1024];
    h.mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, pattern);
    assert_eq!(h.irq.evt.read().unwrap(), 2);
}

#[test]
fn reads_see_the_backing_file() {
    let mut h = Harness::new(false);
    let mut f = OpenOptions::new()
        .write(true)
        .open(h.file.as_path())
        .unwrap();
    f.seek(SeekFrom::Start(63 * 512)).unwrap();
    f.write_all(&[0xab; 512]).unwrap();
    h.header(VIRTIO_BLK_T_IN, 63);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut got = [0u8; 512];
    h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0xab; 512]);
}

#[test]
fn flush_and_write_through() {
    let mut h = Harness::new(false);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert!(h.blk.disk.writeback);
    // A driver that did not ack FLUSH gets write-through, and writes still work.
    h.blk.set_acked_features(VIRTIO_F_VERSION_1);
    assert!(!h.blk.disk.writeback);
    h.mem.write_slice(&[5u8; 512], GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&h.disk_bytes()[..512], &[5u8; 512][..]);
}

#[test]
fn get_id_returns_serial() {
    let file = TempFile::new().unwrap();
    file.as_file().set_len(4096).unwrap();
    let blk = Block::new(file.as_path(), false)
        .unwrap()
        .with_serial("husk-disk-0");
    let mut h = Harness::with_block(blk, file);
    h.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), 21);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"husk-disk-0");
    assert_eq!(id[11..], [0u8; 9]);
    // A shorter buffer gets a truncated id.
    h.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 4), w(STATUS, 1)]), 5);
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..5], b"husk\xee");
}

/// The API's longest id fills GET_ID's 20 bytes: no NUL, and nothing of an earlier,
/// longer serial shows through.
#[test]
fn get_id_of_twenty_bytes_fills_the_buffer() {
    let file = TempFile::new().unwrap();
    file.as_file().set_len(4096).unwrap();
    let blk = Block::new(file.as_path(), false)
        .unwrap()
        .with_serial("an-earlier-serial-that-is-long")
        .with_serial("read-only-disk-20byt");
    let mut h = Harness::with_block(blk, file);
    h.mem.write_slice(&[0xee; 24], GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), 21);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 24];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..20], b"read-only-disk-20byt");
    assert_eq!(id[20..], [0xee; 4], "nothing written past the buffer");
}

#[test]
fn default_serial_is_derived_from_the_file() {
    let h = Harness::new(false);
    assert!(h.blk.disk.id.iter().any(|&b| b != 0));
    assert!(h
        .blk
        .disk
        .id
        .iter()
        .all(|&b| b == 0 || b.is_ascii_hexdigit()));
}

#[test]
fn read_only_rejects_writes() {
    let mut h = Harness::new(true);
    assert_ne!(h.blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    h.mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
    h.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    assert!(h.disk_bytes().iter().all(|&b| b == 0));
    // Reads and flushes still work.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 513);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.run(&[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn out_of_range_and_bad_lengths_get_ioerr() {
    let mut h = Harness::new(false);
    for (sector, len) in [
        (DISK_SECTORS, 512),
        (DISK_SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512 + 1, 512),
        (0, 511),
        (0, 513),
    ] {
        h.header(VIRTIO_BLK_T_IN, sector);
        assert_eq!(h.run(&[r(HDR, 16), w(DATA, len), w(STATUS, 1)]), 1);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8, "IN sector {sector}");
        h.header(VIRTIO_BLK_T_OUT, sector);
        h.run(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)]);
        assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8, "OUT sector {sector}");
    }
    assert!(h.disk_bytes().iter().all(|&b| b == 0));
    // The last sector itself is fine.
    h.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn unknown_type_is_unsupported() {
    let mut h = Harness::new(false);
    h.header(0x1234, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn malformed_chains_do_not_panic() {
    let mut h = Harness::new(false);
    h.header(VIRTIO_BLK_T_IN, 0);
    // No writable status byte: returned with length 0, status untouched.
    assert_eq!(h.run(&[r(HDR, 16), r(STATUS, 1)]), 0);
    assert_eq!(h.status(), 0xff);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 0)]), 0);
    // IN whose data descriptor is device-readable.
    assert_eq!(h.run(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    // OUT whose data descriptor is device-writable.
    h.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    // Readable after writable.
    assert_eq!(h.run(&[w(HDR, 16), r(DATA, 512), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    // Header too short, and header outside guest memory.
    assert_eq!(h.run(&[r(HDR, 8), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.run(&[r(1 << 40, 16), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    // Data running off the end of guest memory.
    h.header(VIRTIO_BLK_T_IN, 0);
    let edge = MEM_SIZE as u64 - 256;
    assert_eq!(h.run(&[r(HDR, 16), w(edge, 512), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    // Status outside guest memory, or wrapping the address space.
    assert_eq!(h.run(&[r(HDR, 16), w(1 << 40, 1)]), 0);
    assert_eq!(h.run(&[r(HDR, 16), w(u64::MAX, 2)]), 0);
    // Status sharing the last descriptor with data: any layout is accepted.
    h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(h.run(&[r(HDR, 16), w(DATA, 513)]), 513);
    let status: u8 = h.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn header_split_over_descriptors() {
    let mut h = Harness::new(false);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(h.run(&[r(HDR, 5), r(HDR + 5, 11), w(STATUS, 1)]), 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn activation_goes_through_the_event_loop() {
    let file = TempFile::new().unwrap();
    file.as_file().set_len(4096).unwrap();
    let mem = guest_memory(MEM_SIZE);
    mem.write_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes(), GuestAddress(HDR))
        .unwrap();
    let blk = Block::new(file.as_path(), false).unwrap();
    let used = check_one_queue_activation_cycle(blk, &mem, &[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!(used, [1, 1], "each flush wrote its status byte");
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

/// One request per 200 ms: of three queued, one is served at once and the others as the
/// limiter's timer lets them, never before their tokens exist.
#[test]
fn a_rate_limited_disk_serves_requests_as_tokens_come() {
    use husk_vmm_api::{RateLimiterConfig, TokenBucketConfig};
    use std::time::{Duration, Instant};
    let file = TempFile::new().unwrap();
    file.as_file().set_len(4096).unwrap();
    let limiter = RateLimiter::new(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 200,
        }),
    })
    .unwrap();
    let blk = Block::new(file.as_path(), false)
        .unwrap()
        .with_rate_limiter(limiter);
    let mem = guest_memory(MEM_SIZE);
    let mut queue = TestQueue::new(&mem, 0, 16);
    let mut em = EventManager::<Block>::new().unwrap();
    let id = em.add_subscriber(blk);
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = evt.try_clone().unwrap();
    em.subscriber_mut(id)
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![queue.take_queue()],
            queue_evts: vec![evt],
            irq: IrqTrigger::new().unwrap(),
        })
        .unwrap();
    em.run_with_timeout(100).unwrap();
    mem.write_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes(), GuestAddress(HDR))
        .unwrap();
    for i in 0..3 {
        queue.add(&mem, &[r(HDR, 16), w(STATUS + i * 16, 1)]);
    }
    let t = Instant::now();
    kick.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(queue.used_idx(&mem), 1, "the bucket held one request");
    while queue.used_idx(&mem) < 3 && t.elapsed() < Duration::from_secs(5) {
        em.run_with_timeout(100).unwrap();
    }
    assert_eq!(
        queue.used_idx(&mem),
        3,
        "throttled requests were never served"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(390),
        "two more requests in {:?}: faster than their tokens",
        t.elapsed()
    );
}

#[test]
fn config_space_has_capacity_and_seg_max() {
    let h = Harness::new(false);
    let mut cap = [0u8; 8];
    h.blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg = [0u8; 4];
    h.blk.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    assert_eq!(h.blk.device_type(), TYPE_BLOCK);
    assert_eq!(h.blk.queue_max_sizes(), &[QUEUE_SIZE]);
}

fn any_desc() -> impl Strategy<Value = TestDesc> {
    let addr = prop_oneof![
        HDR..MEM_SIZE as u64 + 0x1000,
        Just(HDR),
        Just(STATUS),
        any::<u64>(),
    ];
    let len = prop_oneof![
        0u32..2048,
        Just(16u32),
        Just(1u32),
        Just(512u32),
        any::<u32>()
    ];
    (addr, len, any::<bool>()).prop_map(|(addr, len, write)| TestDesc { addr, len, write })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_requests_never_panic(
        descs in prop::collection::vec(any_desc(), 1..8),
        req_type in prop_oneof![0u32..10, any::<u32>()],
        sector in prop_oneof![0..DISK_SECTORS + 2, any::<u64>()],
        read_only in any::<bool>(),
    ) {
        let mut h = Harness::new(read_only);
        h.header(req_type, sector);
        let len = h.run(&descs);
        prop_assert!(len <= (DISK_SECTORS * SECTOR_SIZE) as u32 + 1);
    }
}
