//! Device tests: a mock guest driver (descriptor chains in real guest memory) on one side,
//! real Unix sockets on the other, and the real `EventManager` in between. This module holds
//! that harness; the tests are in the submodules, by what they exercise.

mod device_basics;
mod flow_control;
mod fuzzing;
mod guest_to_host;
mod host_to_guest;
mod packet_parsing;
mod teardown;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::connection::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::guest_memory;
use crate::devices::virtio::{Activation, GuestMemory, IrqTrigger, VirtioDevice};

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
