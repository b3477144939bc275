//! Device tests: a mock guest driver (descriptor chains in real guest memory) on one side,
//! real Unix sockets on the other, and the real `EventManager` in between.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::connection::{CONN_BUF_ALLOC, REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT};
use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::guest_memory;
use crate::devices::virtio::{
    Activation, GuestMemory, IrqTrigger, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

const GUEST_CID: u64 = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
const RING_ADDRS: [u64; 3] = [0x0, 0x1_0000, 0x2_0000];
const BUF_BASE: u64 = 0x10_0000;
const QSIZE: u16 = 256;

fn tmp_dir() -> TempDir {
    TempDir::new_with_prefix("/tmp/husk-vsock-").unwrap()
}

/// The guest side of a split queue, driven by hand. Descriptors come from a free list and
/// go back to it when the device returns their chain, like a real driver's.
///
/// The used ring lives at `used_addr`, not where `MockSplitQueue` puts it: the mock places it
/// `len` bytes after the avail ring's entries instead of `2 * len`, so with more than half a
/// ring of buffers in flight the two rings would overwrite each other.
struct Ring {
    mem: &'static GuestMemory,
    used_addr: GuestAddress,
    mock: MockSplitQueue<'static, GuestMemory>,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    used_seen: u16,
}

impl Ring {
    fn new(mem: &'static GuestMemory, addr: u64) -> Self {
        // flags and idx of a fresh used ring.
        mem.write_obj(0u32, GuestAddress(addr + 0x4000)).unwrap();
        Ring {
            mem,
            used_addr: GuestAddress(addr + 0x4000),
            mock: MockSplitQueue::create(mem, GuestAddress(addr), QSIZE),
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            used_seen: 0,
        }
    }

    fn create_queue(&self) -> Queue {
        let mut q: Queue = self.mock.create_queue().unwrap();
        let a = self.used_addr.0;
        q.set_used_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q
    }

    fn outstanding(&self) -> usize {
        self.chains.len()
    }

    /// Publishes one chain of (addr, len, flags) descriptors.
    fn add_chain(&mut self, descs: &[(u64, u32, u16)]) {
        assert!(
            self.free.len() >= descs.len(),
            "test driver ran out of descriptors"
        );
        let idxs: Vec<u16> = (0..descs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idxs.get(i + 1) {
                Some(&next) => (flags | VRING_DESC_F_NEXT as u16, next),
                None => (flags & !(VRING_DESC_F_NEXT as u16), 0),
            };
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mock.desc_table().store(idxs[i], raw).unwrap();
        }
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at((idx % QSIZE) as usize)
            .unwrap()
            .store(idxs[0]);
        avail.idx().store(idx.wrapping_add(1));
        self.chains.insert(idxs[0], idxs);
    }

    /// The chains the device returned since the last call; their descriptors are free again
    /// once the caller is done reading them (they are only reused by a later `add_chain`).
    fn used(&mut self) -> Vec<VirtqUsedElem> {
        let idx: u16 = self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let elem: VirtqUsedElem = self
                .mem
                .read_obj(self.used_addr.unchecked_add(4 + 8 * slot))
                .unwrap();
            let chain = self
                .chains
                .remove(&(elem.id() as u16))
                .expect("device returned a chain it was not given");
            self.free.extend(chain);
            out.push(elem);
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

type Em = EventManager<Arc<Mutex<Vsock>>>;

struct Harness {
    mem: &'static GuestMemory,
    mem_size: u64,
    rings: [Ring; 3],
    kicks: Vec<EventFd>,
    next_buf: u64,
    em: Em,
    dev: Arc<Mutex<Vsock>>,
    irq: IrqTrigger,
    uds: PathBuf,
    _dir: TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with_mem(64 << 20)
    }

    fn with_mem(mem_size: usize) -> Self {
        let dir = tmp_dir();
        let uds = dir.as_path().join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        // Leaked so the mock queues can borrow it for the test's whole life.
        let mem: &'static GuestMemory = Box::leak(Box::new(guest_memory(mem_size)));
        let mut h = Harness {
            mem,
            mem_size: mem_size as u64,
            rings: RING_ADDRS.map(|a| Ring::new(mem, a)),
            kicks: Vec::new(),
            next_buf: BUF_BASE,
            em,
            dev,
            irq: IrqTrigger::new().unwrap(),
            uds,
            _dir: dir,
        };
        h.activate();
        h
    }

    /// Activates the device with fresh queues, as a driver setting DRIVER_OK does.
    fn activate(&mut self) {
        self.rings = RING_ADDRS.map(|a| Ring::new(self.mem, a));
        self.kicks = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let activation = Activation {
            mem: self.mem.clone(),
            queues: self.rings.iter().map(Ring::create_queue).collect(),
            queue_evts: self.kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
            irq: self.irq.clone(),
        };
        self.dev().activate(activation).unwrap();
        self.pump();
    }

    fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    /// Runs the event loop until nothing is left to do.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("event loop does not settle");
    }

    /// Runs the event loop, waiting up to `ms` for something to happen.
    fn pump_wait(&mut self, ms: i32) {
        self.em.run_with_timeout(ms).unwrap();
        self.pump();
    }

    fn uds(&self) -> &PathBuf {
        &self.uds
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1).next_multiple_of(64);
        if self.next_buf + len > self.mem_size {
            self.next_buf = BUF_BASE;
        }
        let a = self.next_buf;
        self.next_buf += len;
        a
    }

    fn kick(&mut self, q: usize) {
        self.kicks[q].write(1).unwrap();
        self.pump();
    }

    /// Offers `n` RX buffers of `size` bytes each (one descriptor per chain).
    /// Tops the RX queue up to `n` outstanding buffers.
    fn top_up_rx(&mut self, n: usize, size: u32) {
        let have = self.rings[RXQ].outstanding();
        if have < n {
            self.give_rx(n - have, size);
        }
    }

    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let a = self.alloc(size.into());
            self.rings[RXQ].add_chain(&[(a, size, VRING_DESC_F_WRITE as u16)]);
        }
        self.kick(RXQ);
    }

    /// Queues a raw TX chain with the given pieces, each readable unless `write_only`.
    fn queue_tx_raw(&mut self, pieces: &[(&[u8], bool)]) {
        self.rings[TXQ].used();
        let descs: Vec<(u64, u32, u16)> = pieces
            .iter()
            .map(|(bytes, write_only)| {
                let a = self.alloc(bytes.len() as u64);
                self.mem.write_slice(bytes, GuestAddress(a)).unwrap();
                let flags = if *write_only {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                (a, bytes.len() as u32, flags)
            })
            .collect();
        self.rings[TXQ].add_chain(&descs);
    }

    fn send(&mut self, hdr: VsockHeader, data: &[u8]) {
        let mut hdr = hdr;
        hdr.len = data.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.queue_tx_raw(&[(&bytes, false)]);
        self.kick(TXQ);
    }

    /// The packets the device put in RX buffers since the last call.
    fn take_rx(&mut self) -> Vec<RxPacket> {
        let used = self.rings[RXQ].used();
        used.iter()
            .map(|elem| {
                let desc = SplitDescriptor::from(
                    self.rings[RXQ]
                        .mock
                        .desc_table()
                        .load(elem.id() as u16)
                        .unwrap(),
                );
                let mut buf = vec![0u8; elem.len() as usize];
                self.mem.read_slice(&mut buf, desc.addr()).unwrap();
                assert!(buf.len() >= HDR_SIZE, "RX packet without a header");
                let hdr = VsockHeader::from_bytes(buf[..HDR_SIZE].try_into().unwrap());
                let data = buf[HDR_SIZE..].to_vec();
                assert_eq!(hdr.len as usize, data.len());
                RxPacket { hdr, data }
            })
            .collect()
    }

    /// Connects a host client to guest port `guest_port` and completes the handshake with
    /// the given guest credit. Returns the client and the host port.
    fn open_host_stream(&mut self, guest_port: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(self.uds()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        self.pump();
        let pkts = self.take_rx();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].hdr;
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(req.dst_port, guest_port);
        let mut resp = guest_reply(&req, OP_RESPONSE);
        resp.buf_alloc = guest_buf_alloc;
        self.send(resp, &[]);
        let line = read_line(&mut client);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (client, req.src_port)
    }
}

/// A guest packet header for stream `guest_port` → host `host_port`.
fn ghdr(guest_port: u32, host_port: u32, op: u16) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// The guest's answer to a packet the device sent.
fn guest_reply(to: &VsockHeader, op: u16) -> VsockHeader {
    ghdr(to.dst_port, to.src_port, op)
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF in the middle of a line");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn data_of(pkts: &[RxPacket]) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.hdr.op == OP_RW)
        .flat_map(|p| p.data.iter().copied())
        .collect()
}

fn standalone_mem() -> &'static GuestMemory {
    Box::leak(Box::new(guest_memory(1 << 20)))
}

// ---- packet parsing -------------------------------------------------------------------------

#[test]
fn header_round_trips() {
    let hdr = VsockHeader {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 0xdead_beef,
        dst_port: 7,
        len: 9,
        type_: TYPE_STREAM,
        op: OP_RW,
        flags: 3,
        buf_alloc: 0x1234,
        fwd_cnt: 0x5678,
    };
    let b = hdr.to_bytes();
    assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&b[28..30], &1u16.to_le_bytes());
    assert_eq!(VsockHeader::from_bytes(&b), hdr);
}

#[test]
fn parses_header_and_payload_split_across_descriptors() {
    let mem = standalone_mem();
    let q = MockSplitQueue::new(mem, 16);
    let mut hdr = ghdr(1, 2, OP_RW);
    hdr.len = 10;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(b"0123456789");
    // 10 | 34 (rest of header) + 3 | 7: the header spans two descriptors and the payload
    // starts in the middle of one.
    let cuts = [(0, 10), (10, 47), (47, 54)];
    let descs: Vec<RawDescriptor> = cuts
        .iter()
        .enumerate()
        .map(|(i, &(s, e))| {
            let addr = 0x1_0000 + 0x1000 * i as u64;
            mem.write_slice(&bytes[s..e], GuestAddress(addr)).unwrap();
            RawDescriptor::from(SplitDescriptor::new(addr, (e - s) as u32, 0, 0))
        })
        .collect();
    let chain = q.build_desc_chain(&descs).unwrap();
    let (got, data) = read_tx_packet(mem, chain).unwrap();
    assert_eq!(got, hdr);
    assert_eq!(data, b"0123456789");
}

#[test]
fn malformed_chains_are_errors_not_panics() {
    let mem = standalone_mem();
    let q = MockSplitQueue::new(mem, 16);
    let one = |addr: u64, len: u32, flags: u16| {
        vec![RawDescriptor::from(SplitDescriptor::new(
            addr, len, flags, 0,
        ))]
    };

    // Too short for a header.
    let chain = q.build_desc_chain(&one(0x1_0000, 20, 0)).unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::HeaderTooShort { have: 20 })
    ));

    // `len` larger than the buffers.
    let mut hdr = ghdr(1, 2, OP_RW);
    hdr.len = 100;
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x2_0000))
        .unwrap();
    let chain = q
        .build_desc_chain(&one(0x2_0000, HDR_SIZE as u32 + 10, 0))
        .unwrap();
    match read_tx_packet(mem, chain) {
        Err(VsockError::PayloadTruncated { len, have, .. }) => {
            assert_eq!((len, have), (100, 10));
        }
        other => panic!("{other:?}"),
    }

    // `len` over the cap, whatever the buffers hold.
    hdr.len = u32::MAX;
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x2_0000))
        .unwrap();
    let chain = q.build_desc_chain(&one(0x2_0000, 0x8_0000, 0)).unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::PayloadTooLarge { .. })
    ));

    // Header in a write-only descriptor: the device must not read it.
    let chain = q
        .build_desc_chain(&one(0x2_0000, 4096, VRING_DESC_F_WRITE as u16))
        .unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::HeaderTooShort { have: 0 })
    ));

    // Buffer outside guest memory.
    let chain = q.build_desc_chain(&one(0xfff_0000, 4096, 0)).unwrap();
    assert!(matches!(
        read_tx_packet(mem, chain),
        Err(VsockError::DescriptorChain(_))
    ));
}

#[test]
fn truncated_packet_on_the_queue_gets_rst() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut hdr = ghdr(77, 88, OP_RW);
    hdr.len = 1000;
    // Claims 1000 bytes, carries 5.
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(b"short");
    h.queue_tx_raw(&[(&bytes, false)]);
    // Too short to hold a header at all: dropped, nobody to answer.
    h.queue_tx_raw(&[(&[1, 2, 3], false)]);
    h.kick(TXQ);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (88, 77));
    // Both TX chains were returned to the guest.
    assert_eq!(h.rings[TXQ].used().len(), 2);
}

// ---- device basics --------------------------------------------------------------------------

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

// ---- host → guest ---------------------------------------------------------------------------

#[test]
fn host_initiated_stream_carries_data_both_ways() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    // Drain the activation interrupt.
    let _ = h.irq.evt.read();

    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Stream bytes right behind the CONNECT line must not be eaten by the handshake.
    client.write_all(b"CONNECT 1024\nearly bird").unwrap();
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].hdr;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    // The guest was interrupted for it.
    assert!(h.irq.evt.read().unwrap() >= 1);

    h.send(guest_reply(&req, OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));

    // Host → guest, including the bytes sent with the CONNECT line.
    h.pump();
    client.write_all(b", hello guest").unwrap();
    h.pump();
    let pkts = h.take_rx();
    assert!(pkts
        .iter()
        .all(|p| p.hdr.op == OP_RW && p.hdr.src_port == req.src_port && p.hdr.dst_port == 1024));
    assert_eq!(data_of(&pkts), b"early bird, hello guest");

    // Guest → host.
    h.send(guest_reply(&req, OP_RW), b"hello host");
    let mut buf = [0u8; 10];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    assert_eq!(h.dev().muxer().conn_count(), 1);
}

#[test]
fn guest_refusing_a_host_stream_closes_the_client() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    h.pump();
    let req = h.take_rx()[0].hdr;
    h.send(guest_reply(&req, OP_RST), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn bad_handshakes_are_dropped() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    for line in [
        &b"HELLO 5\n"[..],
        b"CONNECT\n",
        b"CONNECT abc\n",
        &[b'x'; 100],
    ] {
        let mut client = UnixStream::connect(h.uds()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(line).unwrap();
        h.pump();
        let mut buf = [0u8; 8];
        // Unread bytes left behind make the close a reset.
        match client.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{line:?}: {other:?}"),
        }
    }
    assert!(h.take_rx().is_empty());
}

#[test]
fn request_without_rx_buffers_waits_for_them() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    h.pump();
    assert!(h.take_rx().is_empty());
    h.give_rx(1, 4096);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_REQUEST);
}

// ---- guest → host ---------------------------------------------------------------------------

#[test]
fn guest_initiated_stream_reaches_the_port_listener() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    let listener = UnixListener::bind(format!("{}_5000", h.uds().display())).unwrap();

    h.send(ghdr(2000, 5000, OP_REQUEST), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let resp = pkts[0].hdr;
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 2000));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));

    let (mut srv, _) = listener.accept().unwrap();
    srv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.send(ghdr(2000, 5000, OP_RW), b"ping");
    let mut buf = [0u8; 4];
    srv.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    srv.write_all(b"pong").unwrap();
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(data_of(&pkts), b"pong");
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5000, 2000));

    // Guest half-close: the host reads EOF but can still send.
    let mut sd = ghdr(2000, 5000, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_SEND;
    h.send(sd, &[]);
    assert_eq!(srv.read(&mut buf).unwrap(), 0);
    srv.write_all(b"still here").unwrap();
    h.pump();
    assert_eq!(data_of(&h.take_rx()), b"still here");
}

/// A guest stream to the host port the next host client would get must not be replaced by
/// that client's stream (same key): both live, on different host ports.
#[test]
fn host_ports_never_collide_with_guest_streams() {
    let mut h = Harness::new();
    h.give_rx(16, 4096);
    let first_host_port = 1u32 << 30;
    let _listener = UnixListener::bind(format!("{}_{first_host_port}", h.uds().display())).unwrap();
    h.send(ghdr(3000, first_host_port, OP_REQUEST), &[]);
    assert_eq!(h.take_rx()[0].hdr.op, OP_RESPONSE);
    let (_client, host_port) = h.open_host_stream(3000, 4096);
    assert_ne!(host_port, first_host_port);
    assert_eq!(h.dev().muxer().conn_count(), 2);
}

#[test]
fn guest_connect_to_nothing_gets_rst() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    h.send(ghdr(2001, 5001, OP_REQUEST), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5001, 2001));
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn misaddressed_and_unknown_packets() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    // Wrong source CID, wrong destination CID: ignored.
    let mut p = ghdr(1, 2, OP_REQUEST);
    p.src_cid = 42;
    h.send(p, &[]);
    let mut p = ghdr(1, 2, OP_REQUEST);
    p.dst_cid = 7;
    h.send(p, &[]);
    assert!(h.take_rx().is_empty());
    // Unknown type: RST.
    let mut p = ghdr(1, 2, OP_REQUEST);
    p.type_ = 2;
    h.send(p, &[]);
    // Data for a stream that does not exist: RST. RST for one: nothing.
    h.send(ghdr(3, 4, OP_RW), b"x");
    h.send(ghdr(5, 6, OP_RST), &[]);
    let pkts = h.take_rx();
    let ops: Vec<_> = pkts
        .iter()
        .map(|p| (p.hdr.op, p.hdr.src_port, p.hdr.dst_port))
        .collect();
    assert_eq!(ops, vec![(OP_RST, 2, 1), (OP_RST, 4, 3)]);
}

#[test]
fn guest_without_rx_buffers_is_throttled_not_queued_for() {
    let mut h = Harness::new();
    // Data for streams that do not exist: each one earns the guest an RST it has no buffer
    // for.
    let mut port = 0;
    for _ in 0..5 {
        for _ in 0..250 {
            port += 1;
            let mut hdr = ghdr(port, 1, OP_RW);
            hdr.len = 1;
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.push(b'x');
            h.queue_tx_raw(&[(&bytes, false)]);
        }
        h.kick(TXQ);
    }
    h.rings[TXQ].used();
    // The device stopped reading TX once its backlog was full.
    assert_eq!(
        h.rings[TXQ].outstanding(),
        1250 - super::muxer::MAX_CTRL_BACKLOG
    );

    // RX buffers let it catch up, and every packet gets its answer.
    let mut rsts = 0;
    for _ in 0..20 {
        h.give_rx(200, 256);
        rsts += h.take_rx().iter().filter(|p| p.hdr.op == OP_RST).count();
        if rsts == 1250 {
            break;
        }
    }
    assert_eq!(rsts, 1250);
    h.rings[TXQ].used();
    assert_eq!(h.rings[TXQ].outstanding(), 0);
}

// ---- flow control ---------------------------------------------------------------------------

#[test]
fn never_sends_more_than_the_guest_credit() {
    let mut h = Harness::new();
    h.give_rx(32, 4096);
    let (mut client, port) = h.open_host_stream(1024, 1000);
    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    client.write_all(&payload).unwrap();
    h.pump();
    h.give_rx(8, 4096);
    let got = data_of(&h.take_rx());
    assert_eq!(got.len(), 1000, "credit was 1000 bytes");

    // The guest consumed 1000 bytes and says so.
    let mut cu = ghdr(1024, port, OP_CREDIT_UPDATE);
    cu.buf_alloc = 1000;
    cu.fwd_cnt = 1000;
    h.send(cu, &[]);
    let more = data_of(&h.take_rx());
    assert_eq!(more.len(), 1000);

    // A bigger buffer: the rest flows, bounded by the RX buffer size per packet.
    cu.buf_alloc = 1 << 20;
    cu.fwd_cnt = 2000;
    h.send(cu, &[]);
    let pkts = h.take_rx();
    assert!(pkts.iter().all(|p| p.data.len() <= 4096 - HDR_SIZE));
    let rest = data_of(&pkts);
    let all: Vec<u8> = got.into_iter().chain(more).chain(rest).collect();
    assert_eq!(all, payload);

    // The guest asks for our credit.
    h.send(ghdr(1024, port, OP_CREDIT_REQUEST), &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].hdr.buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut h = Harness::new();
    h.give_rx(32, 4096);
    let (mut client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    // The client never reads: once its socket buffer is full, everything goes to the
    // device's buffer, which must stay within the credit it advertised.
    let chunk = vec![7u8; MAX_PKT_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        h.send(ghdr(1024, port, OP_RW), &chunk);
        if h.take_rx().iter().any(|p| p.hdr.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit must be reset");
    assert_eq!(h.dev().muxer().conn_count(), 0);
    // The client sees the stream end after what was delivered.
    client.set_nonblocking(true).unwrap();
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink);
}

/// The guest sends 16 KiB chunks on a stream for as long as its credit lasts, as a driver
/// does. Returns the chunk, the bytes sent and the last fwd_cnt we told the guest.
fn send_until_out_of_credit(
    h: &mut Harness,
    guest_port: u32,
    host_port: u32,
) -> (Vec<u8>, u32, u32) {
    let chunk: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut sent: u32 = 0;
    let mut peer_fwd: u32 = 0;
    loop {
        for p in h.take_rx() {
            assert_ne!(p.hdr.op, OP_RST, "stream reset: {p:?}");
            if p.hdr.src_port == host_port {
                peer_fwd = p.hdr.fwd_cnt;
            }
        }
        if ((CONN_BUF_ALLOC - (sent - peer_fwd)) as usize) < chunk.len() {
            return (chunk, sent, peer_fwd);
        }
        h.send(ghdr(guest_port, host_port, OP_RW), &chunk);
        sent += chunk.len() as u32;
        assert!(sent < 64 << 20, "credit never runs out");
    }
}

#[test]
fn slow_host_reader_does_not_stall_other_streams() {
    let mut h = Harness::new();
    h.give_rx(64, 4096);
    let (mut slow, slow_port) = h.open_host_stream(1000, CONN_BUF_ALLOC);
    let (mut fast, fast_port) = h.open_host_stream(1001, CONN_BUF_ALLOC);

    // The guest sends to the slow stream for as long as its credit lasts, as a driver does.
    let (chunk, sent, mut peer_fwd) = send_until_out_of_credit(&mut h, 1000, slow_port);
    assert!(sent >= CONN_BUF_ALLOC, "sent {sent}");

    // The other stream is unaffected, both ways.
    h.send(ghdr(1001, fast_port, OP_RW), b"fast lane");
    let mut buf = [0u8; 9];
    fast.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"fast lane");
    fast.write_all(b"reply").unwrap();
    h.pump();
    let pkts = h.take_rx();
    let fast_data: Vec<u8> = pkts
        .iter()
        .filter(|p| p.hdr.src_port == fast_port)
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(fast_data, b"reply");

    // The slow reader wakes up and gets every byte, in order; the guest hears about the
    // freed space.
    slow.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_credit = false;
    while got.len() < sent as usize {
        assert!(Instant::now() < deadline, "got {} of {sent}", got.len());
        let mut buf = vec![0u8; 64 * 1024];
        match slow.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump_wait(1);
        h.top_up_rx(16, 4096);
        for p in h.take_rx() {
            if p.hdr.src_port == slow_port && p.hdr.fwd_cnt != peer_fwd {
                saw_credit = true;
                peer_fwd = p.hdr.fwd_cnt;
            }
        }
    }
    assert_eq!(got.len(), sent as usize);
    assert!(got.chunks(chunk.len()).all(|c| c == &chunk[..c.len()]));
    assert!(saw_credit, "no credit update after the host drained");
    // The guest may not hear about the last few bytes, but it has ample credit again.
    assert!(sent - peer_fwd < CONN_BUF_ALLOC / 4, "{sent} {peer_fwd}");
}

// ---- teardown -------------------------------------------------------------------------------

#[test]
fn host_close_sends_shutdown_then_guest_rst_closes() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    client.write_all(b"last words").unwrap();
    drop(client);
    h.pump();
    let pkts = h.take_rx();
    assert_eq!(data_of(&pkts), b"last words");
    let last = pkts.last().unwrap().hdr;
    assert_eq!(last.op, OP_SHUTDOWN);
    assert_eq!(last.flags, SHUTDOWN_F_BOTH);
    assert_eq!(h.dev().muxer().conn_count(), 1);
    h.send(ghdr(1024, port, OP_RST), &[]);
    assert_eq!(h.dev().muxer().conn_count(), 0);
    assert!(h.take_rx().is_empty());
}

#[test]
fn shutdown_the_guest_never_finishes_times_out_with_rst() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    drop(client);
    h.pump();
    assert_eq!(h.take_rx().last().unwrap().hdr.op, OP_SHUTDOWN);
    let deadline = Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_secs(3);
    let rst = loop {
        assert!(
            Instant::now() < deadline,
            "no RST after the shutdown timeout"
        );
        h.pump_wait(500);
        if let Some(p) = h.take_rx().into_iter().find(|p| p.hdr.op == OP_RST) {
            break p;
        }
    };
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (port, 1024));
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn unanswered_request_times_out() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let mut client = UnixStream::connect(h.uds()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();
    let req = h.take_rx()[0].hdr;
    assert_eq!(req.op, OP_REQUEST);
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(3);
    while h.dev().muxer().conn_count() > 0 {
        assert!(Instant::now() < deadline, "request never timed out");
        h.pump_wait(500);
    }
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.op, OP_RST);
    assert_eq!(pkts[0].hdr.src_port, req.src_port);
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn guest_shutdown_flushes_then_resets() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut client, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    h.send(ghdr(1024, port, OP_RW), b"bye");
    let mut sd = ghdr(1024, port, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_BOTH;
    h.send(sd, &[]);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_RST);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn guest_close_waits_for_a_slow_host_reader() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut slow, port) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    // Fill the host socket and our buffer, as far as the guest's credit goes.
    let (_, sent, _) = send_until_out_of_credit(&mut h, 1024, port);
    let mut sd = ghdr(1024, port, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_BOTH;
    h.send(sd, &[]);
    // The host reader sleeps past the guest-RST timeout; its bytes must still be there.
    let idle_until = Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_millis(500);
    while Instant::now() < idle_until {
        h.pump_wait(100);
    }
    assert_eq!(
        h.dev().muxer().conn_count(),
        1,
        "stream dropped with bytes owed"
    );
    slow.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut buf = [0u8; 65536];
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => h.pump_wait(20),
            Err(e) => panic!("host read: {e}"),
        }
        assert!(Instant::now() < deadline, "got {} of {sent}", got.len());
    }
    assert_eq!(got.len(), sent as usize);
    assert!(h.take_rx().iter().any(|p| p.hdr.op == OP_RST));
    assert_eq!(h.dev().muxer().conn_count(), 0);
}

#[test]
fn reset_closes_streams_and_reactivation_works() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (mut client, _) = h.open_host_stream(1024, CONN_BUF_ALLOC);
    let old_kicks: Vec<EventFd> = h.kicks.iter().map(|k| k.try_clone().unwrap()).collect();
    assert!(h.dev().reset());
    assert!(!h.dev().is_activated());
    // A late notification on the old queues must not wedge the event loop.
    old_kicks[RXQ].write(1).unwrap();
    old_kicks[TXQ].write(1).unwrap();
    h.pump();
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);

    // Not listening while reset: the client waits in the backlog.
    let mut waiting = UnixStream::connect(h.uds()).unwrap();
    waiting.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();

    h.activate();
    assert!(h.dev().is_activated());
    h.give_rx(8, 4096);
    let pkts = h.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].hdr.op, OP_REQUEST);
    // The new queues' notifications are wired up.
    h.send(guest_reply(&pkts[0].hdr, OP_RESPONSE), &[]);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        read_line(&mut waiting),
        format!("OK {}\n", pkts[0].hdr.src_port)
    );
}

#[test]
fn many_concurrent_streams() {
    let mut h = Harness::new();
    h.give_rx(128, 4096);
    let mut streams: Vec<(UnixStream, u32, u32)> = (0..40)
        .map(|i| {
            let (c, port) = h.open_host_stream(3000 + i, CONN_BUF_ALLOC);
            (c, port, 3000 + i)
        })
        .collect();
    for (c, _, gp) in &mut streams {
        c.write_all(format!("from host {gp}").as_bytes()).unwrap();
    }
    h.pump();
    h.give_rx(64, 4096);
    let pkts = h.take_rx();
    for (c, port, gp) in &mut streams {
        let data: Vec<u8> = pkts
            .iter()
            .filter(|p| p.hdr.src_port == *port && p.hdr.op == OP_RW)
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(data, format!("from host {gp}").as_bytes());
        h.send(ghdr(*gp, *port, OP_RW), format!("to {gp}").as_bytes());
        let mut buf = vec![0u8; format!("to {gp}").len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, format!("to {gp}").as_bytes());
    }
}

// ---- fuzzing --------------------------------------------------------------------------------

/// Cuts `bytes` into up to `pieces` descriptors, some marked write-only.
fn tx_pieces(bytes: &[u8], cuts: &[usize], wo_mask: u8) -> Vec<(Vec<u8>, bool)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<(Vec<u8>, bool)> = points
        .windows(2)
        .enumerate()
        .map(|(i, w)| (bytes[w[0]..w[1]].to_vec(), wo_mask & (1 << (i % 8)) != 0))
        .collect();
    if out.is_empty() {
        out.push((Vec::new(), false));
    }
    out
}

fn feed(h: &mut Harness, pkts: &[(Vec<u8>, Vec<usize>, u8)]) {
    for (bytes, cuts, wo) in pkts {
        let pieces = tx_pieces(bytes, cuts, *wo);
        let refs: Vec<(&[u8], bool)> = pieces.iter().map(|(b, w)| (&b[..], *w)).collect();
        h.queue_tx_raw(&refs);
    }
    h.kick(TXQ);
    h.give_rx(8, 256);
    h.take_rx();
}

/// A header with plausible fields, so random input reaches the stream logic.
fn plausible_header() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(GUEST_CID), any::<u64>()],
        prop_oneof![Just(HOST_CID), any::<u64>()],
        0u32..4,
        prop_oneof![0u32..4, Just(1 << 30), Just((1 << 30) + 1)],
        prop_oneof![0u32..300, any::<u32>()],
        0u16..3,
        0u16..9,
        0u32..4,
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(src_cid, dst_cid, sp, dp, len, ty, op, flags, ba, fc, payload)| {
                let hdr = VsockHeader {
                    src_cid,
                    dst_cid,
                    src_port: sp,
                    dst_port: dp,
                    len,
                    type_: ty,
                    op,
                    flags,
                    buf_alloc: ba,
                    fwd_cnt: fc,
                };
                let mut b = hdr.to_bytes().to_vec();
                b.extend(payload);
                b
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_tx_bytes_never_panic(
        pkts in proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(any::<usize>(), 0..4),
                any::<u8>(),
            ),
            1..6,
        )
    ) {
        let mut h = Harness::with_mem(4 << 20);
        feed(&mut h, &pkts);
    }

    #[test]
    fn random_headers_never_panic(
        pkts in proptest::collection::vec(
            (
                plausible_header(),
                proptest::collection::vec(any::<usize>(), 0..3),
                prop_oneof![Just(0u8), any::<u8>()],
            ),
            1..12,
        )
    ) {
        let mut h = Harness::with_mem(4 << 20);
        h.give_rx(4, 4096);
        // Live streams for the random packets to hit (host ports 1<<30 and up, guest 0..4).
        let (_c1, _) = h.open_host_stream(1, CONN_BUF_ALLOC);
        let (_c2, _) = h.open_host_stream(2, 16);
        feed(&mut h, &pkts);
    }
}
