//! Tests against a real virtiofsd (built by scripts/setup): the device is driven like the
//! transport would, and FUSE requests go through guest-memory rings to virtiofsd and back.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use husk_vmm_api::virtiofsd_path;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::devices::virtio::{INT_VRING, VIRTIO_F_VERSION_1};

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

/// A virtiofsd that stops answering (SIGSTOP) costs the vCPU thread nothing: activation only
/// queues the exchange, and the device's mutex, which the event loop needs, stays free while
/// the worker waits. The watchdog then ends the exchange and the device is marked broken.
#[test]
fn a_stalled_virtiofsd_blocks_neither_the_vcpu_nor_the_device() {
    let vfs = Virtiofsd::start();
    let timeouts = Timeouts {
        connect: CONNECT_TIMEOUT,
        exchange: Duration::from_millis(500),
    };
    let mut guest = Guest::connect_with(&vfs, timeouts);
    let pid = vfs.child.id() as libc::pid_t;
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    guest.start_activation();
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "activation waited for virtiofsd: {:?}",
        t.elapsed()
    );
    // The worker is now blocked on virtiofsd; the lock is still ours to take at once.
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let fs = guest.fs.lock().unwrap();
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    assert!(
        !fs.broken.load(Ordering::SeqCst),
        "failed before the timeout"
    );
    drop(fs);
    guest.fs.lock().unwrap().wait_backend();
    assert!(
        guest.fs.lock().unwrap().broken.load(Ordering::SeqCst),
        "a stalled exchange must leave the device broken"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // A broken device refuses a reset instead of talking to virtiofsd again.
    assert!(!guest.fs.lock().unwrap().reset());
}

#[test]
fn virtiofsd_exit_is_reported() {
    let mut vfs = Virtiofsd::start();
    let mut guest = Guest::connect(&vfs);
    guest.activate();
    let flag = guest.fs.lock().unwrap().backend_gone_flag();
    assert!(!flag.load(Ordering::SeqCst));
    vfs.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "hang-up not noticed within 5 s");
        guest.em.run_with_timeout(50).unwrap();
    }
    // The loop stops watching the dead socket instead of spinning on it.
    assert_eq!(guest.em.run_with_timeout(0).unwrap(), 0);
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

#[test]
fn more_request_queues_than_virtiofsd_serves_is_refused() {
    let vfs = Virtiofsd::start();
    let err = Fs::new(&vfs.socket, "husk", 2, QSIZE)
        .err()
        .expect("2 request queues");
    assert!(
        matches!(err, FsError::TooManyQueues { wanted: 3, max: 2 }),
        "{err}"
    );
}

#[test]
fn nobody_listening_fails_clearly_in_bounded_time() {
    let dir = TempDir::new_with_prefix("/tmp/husk-fs-nolisten-").unwrap();

    // No socket file at all.
    let start = Instant::now();
    let err = Fs::new(dir.as_path().join("absent.sock"), "husk", 1, QSIZE)
        .err()
        .expect("no socket");
    assert!(start.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    assert!(matches!(err, FsError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains("cannot connect to virtiofsd"),
        "{err}"
    );

    // A stale socket file whose listener is gone (connection refused).
    let stale = dir.as_path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let timeouts = Timeouts {
        connect: Duration::from_millis(200),
        exchange: Duration::from_millis(300),
    };
    let start = Instant::now();
    let err = Fs::with_timeouts(&stale, "husk", 1, QSIZE, timeouts)
        .err()
        .expect("stale socket");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, FsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");

    // A listener that never accepts nor answers: connect succeeds, the handshake must not hang.
    let silent = dir.as_path().join("silent.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    let start = Instant::now();
    let err = Fs::with_timeouts(&silent, "husk", 1, QSIZE, timeouts)
        .err()
        .expect("silent listener");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, FsError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
}

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
