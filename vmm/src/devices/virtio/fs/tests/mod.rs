//! Tests against a real virtiofsd (built by scripts/setup): the device is driven like the
//! transport would, and FUSE requests go through guest-memory rings to virtiofsd and back.
//! This module holds the virtiofsd process, the FUSE encoding and the mock guest; the tests
//! are in the submodules.

mod configuration;
mod sessions;
mod virtiofsd_failures;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use husk_vmm_api::virtiofsd_path;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::devices::virtio::INT_VRING;

/// A virtiofsd serving a fresh temporary directory; killed on drop.
struct Virtiofsd {
    child: Child,
    socket: PathBuf,
    shared: TempDir,
    _sock_dir: TempDir,
}

impl Virtiofsd {
    fn start() -> Self {
        let bin = virtiofsd_path().unwrap_or_else(|| {
            panic!(
                "virtiofsd not found ($HUSK_VIRTIOFSD, ${{HUSK_CACHE:-/var/cache/husk}}/virtiofsd/bin, \
                 PATH): run scripts/setup"
            )
        });
        let shared = TempDir::new_with_prefix("/tmp/husk-fs-shared-").unwrap();
        let sock_dir = TempDir::new_with_prefix("/tmp/husk-fs-sock-").unwrap();
        let socket = sock_dir.as_path().join("vfs.sock");
        let child = Command::new(&bin)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(shared.as_path())
            .args([
                "--sandbox",
                "none",
                "--cache",
                "never",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut vfs = Virtiofsd {
            child,
            socket,
            shared,
            _sock_dir: sock_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vfs.socket.exists() {
            if let Some(status) = vfs.child.try_wait().unwrap() {
                panic!("virtiofsd exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd made no socket in 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vfs
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

const QSIZE: u16 = 16;
const REGION: usize = 0x10_0000;
/// Buffers live in the second region, so SET_MEM_TABLE carries more than one region.
const BUF_BASE: u64 = REGION as u64;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;

/// Ring addresses of queue `q`: descriptor table, available ring, used ring.
fn ring_addrs(q: usize) -> (u64, u64, u64) {
    let base = q as u64 * 0x1000;
    (base, base + 0x100, base + 0x200)
}

fn make_queues(n: usize) -> Vec<Queue> {
    (0..n)
        .map(|q| {
            let (desc, avail, used) = ring_addrs(q);
            let mut queue = Queue::new(QSIZE).unwrap();
            queue.set_size(QSIZE);
            queue.set_desc_table_address(Some(desc as u32), Some(0));
            queue.set_avail_ring_address(Some(avail as u32), Some(0));
            queue.set_used_ring_address(Some(used as u32), Some(0));
            queue.set_ready(true);
            queue
        })
        .collect()
}

fn fuse_in_header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding: root, no extensions
    h
}

fn fuse_init(unique: u64) -> Vec<u8> {
    let mut body = Vec::new();
    for v in [7u32, 38, 0x20000, 0] {
        // major, minor, max_readahead, flags (the pre-7.36 fuse_init_in)
        body.extend_from_slice(&v.to_le_bytes());
    }
    let mut req = fuse_in_header(40 + body.len(), FUSE_INIT, unique, 0);
    req.extend_from_slice(&body);
    req
}

fn fuse_lookup(unique: u64, name: &str) -> Vec<u8> {
    let mut req = fuse_in_header(40 + name.len() + 1, FUSE_LOOKUP, unique, FUSE_ROOT_ID);
    req.extend_from_slice(name.as_bytes());
    req.push(0);
    req
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A FUSE reply as read back from the guest buffer.
struct Reply {
    used_len: u32,
    bytes: Vec<u8>,
}

impl Reply {
    fn len(&self) -> u32 {
        le_u32(&self.bytes, 0)
    }
    fn error(&self) -> i32 {
        le_u32(&self.bytes, 4) as i32
    }
    fn unique(&self) -> u64 {
        le_u64(&self.bytes, 8)
    }
}

/// Plays the guest driver and the transport around one `Fs`.
struct Guest {
    mem: GuestMemory,
    fs: Arc<Mutex<Fs>>,
    em: EventManager<Arc<Mutex<Fs>>>,
    irq: IrqTrigger,
    kicks: Vec<EventFd>,
    avail_idx: Vec<u16>,
    next_unique: u64,
}

impl Guest {
    /// Connects to `vfs` and subscribes the device to a fresh event loop (not yet activated).
    fn connect(vfs: &Virtiofsd) -> Self {
        Self::connect_with(vfs, Timeouts::default())
    }

    fn connect_with(vfs: &Virtiofsd, timeouts: Timeouts) -> Self {
        let fs = Fs::with_timeouts(&vfs.socket, "husk", 1, QSIZE, timeouts)
            .expect("connect to virtiofsd");
        let fs = Arc::new(Mutex::new(fs));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(Arc::clone(&fs));
        Guest {
            mem: shared_guest_memory(&[
                (GuestAddress(0), REGION),
                (GuestAddress(BUF_BASE), REGION),
            ])
            .unwrap(),
            fs,
            em,
            irq: IrqTrigger::new().unwrap(),
            kicks: Vec::new(),
            avail_idx: Vec::new(),
            next_unique: 1,
        }
    }

    fn activation(&self, mem: GuestMemory, queues: Vec<Queue>) -> (Activation, Vec<EventFd>) {
        let evts: Vec<EventFd> = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let activation = Activation {
            mem,
            queues,
            queue_evts: evts,
            irq: self.irq.clone(),
        };
        (activation, kicks)
    }

    /// Activates with clean rings, as a driver does after setting the queues up, and waits
    /// until the worker has handed everything to virtiofsd.
    fn activate(&mut self) {
        self.start_activation();
        let fs = self.fs.lock().unwrap();
        fs.wait_backend();
        assert!(
            !fs.broken.load(Ordering::SeqCst),
            "the activation exchange failed"
        );
    }

    /// What the transport does on DRIVER_OK: returns once the device queued the exchange.
    fn start_activation(&mut self) {
        for q in 0..2 {
            let (desc, _, _) = ring_addrs(q);
            self.mem
                .write_slice(&[0u8; 0x1000], GuestAddress(desc))
                .unwrap();
        }
        let fs = self.fs.lock().unwrap();
        let features = fs.avail_features();
        drop(fs);
        let (activation, kicks) = self.activation(self.mem.clone(), make_queues(2));
        let mut fs = self.fs.lock().unwrap();
        fs.set_acked_features(features);
        fs.activate(activation).expect("activate");
        assert!(fs.is_activated());
        drop(fs);
        self.kicks = kicks;
        self.avail_idx = vec![0; 2];
    }

    /// Puts `request` and a writable reply buffer on queue `q`, kicks it, and waits for the
    /// interrupt the device raises from virtiofsd's call fd, then reads the used ring.
    fn send(&mut self, q: usize, request: &[u8]) -> Reply {
        const REPLY_LEN: u32 = 0x800;
        let (desc, avail, used) = ring_addrs(q);
        let idx = self.avail_idx[q];
        let head = (idx * 2) % QSIZE;
        let slot = BUF_BASE + (q as u64 * QSIZE as u64 + u64::from(head)) * 0x1000;
        let (req_addr, reply_addr) = (slot, slot + 0x800);
        assert!(request.len() <= 0x800);
        self.mem
            .write_slice(request, GuestAddress(req_addr))
            .unwrap();
        self.mem
            .write_slice(&[0xffu8; REPLY_LEN as usize], GuestAddress(reply_addr))
            .unwrap();
        let write_desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(desc + 16 * u64::from(i));
            self.mem.write_obj(addr.to_le(), at).unwrap();
            self.mem
                .write_obj(len.to_le(), at.unchecked_add(8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), at.unchecked_add(12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), at.unchecked_add(14))
                .unwrap();
        };
        write_desc(
            head,
            req_addr,
            request.len() as u32,
            VIRTQ_DESC_F_NEXT,
            head + 1,
        );
        write_desc(head + 1, reply_addr, REPLY_LEN, VIRTQ_DESC_F_WRITE, 0);
        let ring_slot = GuestAddress(avail + 4 + 2 * u64::from(idx % QSIZE));
        self.mem.write_obj(head.to_le(), ring_slot).unwrap();
        // used_event (EVENT_IDX is negotiated): interrupt as soon as this buffer is used, as
        // the Linux driver asks when it wants every completion.
        let used_event = GuestAddress(avail + 4 + 2 * u64::from(QSIZE));
        self.mem.write_obj(idx.to_le(), used_event).unwrap();
        // The ring entry must be visible before the index that publishes it.
        std::sync::atomic::fence(Ordering::SeqCst);
        let new_idx = idx.wrapping_add(1);
        self.mem
            .write_obj(new_idx.to_le(), GuestAddress(avail + 2))
            .unwrap();
        self.avail_idx[q] = new_idx;
        self.kicks[q].write(1).unwrap();

        // Only the device's call-fd path sets INT_VRING, so seeing it proves that path works.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.irq.status.swap(0, Ordering::SeqCst) & INT_VRING == 0 {
            assert!(
                Instant::now() < deadline,
                "no used-buffer interrupt from virtiofsd within 10 s"
            );
            self.em.run_with_timeout(50).unwrap();
        }
        let _ = self.irq.evt.read();
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(u16::from_le(used_idx), new_idx, "used ring index");
        let elem = GuestAddress(used + 4 + 8 * u64::from(idx % QSIZE));
        let id: u32 = self.mem.read_obj(elem).unwrap();
        let used_len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        assert_eq!(u32::from_le(id), u32::from(head), "used element id");
        let mut bytes = vec![0u8; REPLY_LEN as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(reply_addr))
            .unwrap();
        let reply = Reply {
            used_len: u32::from_le(used_len),
            bytes,
        };
        assert_eq!(
            reply.len(),
            reply.used_len,
            "fuse_out_header.len vs used length"
        );
        reply
    }

    fn unique(&mut self) -> u64 {
        self.next_unique += 1;
        self.next_unique
    }

    fn init(&mut self) {
        let unique = self.unique();
        let reply = self.send(1, &fuse_init(unique));
        assert_eq!(reply.error(), 0, "FUSE_INIT error");
        assert_eq!(reply.unique(), unique, "FUSE_INIT unique");
        assert_eq!(le_u32(&reply.bytes, 16), 7, "FUSE major version");
        assert!(
            reply.len() >= 16 + 24,
            "FUSE_INIT reply too short: {}",
            reply.len()
        );
    }
}
