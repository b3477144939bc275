use super::*;
use crate::devices::virtio::test_queue::{r, w, TestQueue};
use crate::devices::virtio::test_utils::guest_memory;
use crate::devices::virtio::{GuestMemory, IrqTrigger};
use event_manager::{EventManager, SubscriberOps};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x10_0000;
const RXQ: u64 = 0;
const TXQ: u64 = 0x4000;
const BUF: u64 = 0x1_0000;
const RX_BUF: u64 = 0x8_0000;
const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x01];
/// IEEE "local experimental" ethertype: nothing else on the host sends it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn unique_tap_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "hkt{}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes the tap even when a test fails. The device's fd closing normally removes a
/// (non-persistent) tap already; this covers anything left behind.
struct TapGuard(String);

impl Drop for TapGuard {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.0).exists() {
            let _ = Command::new("ip")
                .args(["link", "delete", &self.0])
                .status();
        }
    }
}

fn ifindex(name: &str) -> i32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Brings the interface up, with IPv6 off so the kernel does not send its own frames.
fn link_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name).unwrap();
    // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`, which `req` matches.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    assert!(ret >= 0, "SIOCGIFFLAGS: {}", io::Error::last_os_error());
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above, for SIOCSIFFLAGS.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) };
    assert!(ret >= 0, "SIOCSIFFLAGS: {}", io::Error::last_os_error());
}

/// An AF_PACKET socket on the tap's host side: what it sends comes out of the tap fd,
/// and it sees what is written into the tap fd.
struct PacketSocket(File);

impl PacketSocket {
    fn bind(name: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: proto,
            sll_ifindex: ifindex(name),
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `addr` is a valid sockaddr_ll and the length given is its size.
        let ret = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert!(ret >= 0, "bind: {}", io::Error::last_os_error());
        PacketSocket(File::from(sock))
    }

    fn send(&self, frame: &[u8]) {
        assert_eq!((&self.0).write(frame).unwrap(), frame.len());
    }

    /// The next frame carrying our ethertype, if one comes within two seconds.
    fn recv_ours(&self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            match (&self.0).read(&mut buf) {
                Ok(n) if n >= 14 && buf[12..14] == ETHERTYPE => return Some(buf[..n].to_vec()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("packet socket read: {e}"),
            }
        }
        None
    }
}

fn frame(tag: u8, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(31) ^ tag));
    f
}

struct Setup {
    _guard: TapGuard,
    mem: GuestMemory,
    rxq: TestQueue,
    txq: TestQueue,
    irq: IrqTrigger,
    rx_kick: EventFd,
    sock: PacketSocket,
    rx_posted: u16,
}

/// A device on a fresh, up tap, activated with two test queues.
fn setup() -> (Net, Setup) {
    let name = unique_tap_name();
    let guard = TapGuard(name.clone());
    let mut net = Net::new_with_tap_name(&name, Some(MAC))
        .unwrap_or_else(|e| panic!("cannot create tap {name}: {e}"));
    assert_eq!(net.tap_name(), name);
    link_up(&name);
    let sock = PacketSocket::bind(&name);
    let mem = guest_memory(MEM_SIZE);
    let mut rxq = TestQueue::new(&mem, RXQ, 16);
    let mut txq = TestQueue::new(&mem, TXQ, 16);
    let irq = IrqTrigger::new().unwrap();
    let rx_evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let rx_kick = rx_evt.try_clone().unwrap();
    net.activate(Activation {
        mem: mem.clone(),
        queues: vec![rxq.take_queue(), txq.take_queue()],
        queue_evts: vec![rx_evt, EventFd::new(EFD_NONBLOCK).unwrap()],
        irq: irq.clone(),
    })
    .unwrap();
    let s = Setup {
        _guard: guard,
        mem,
        rxq,
        txq,
        irq,
        rx_kick,
        sock,
        rx_posted: 0,
    };
    (net, s)
}

fn rx_buf(head: u32) -> u64 {
    RX_BUF + u64::from(head) * 0x1000
}

/// Used RX entries that hold one of our frames: (header, frame).
fn received(s: &Setup) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..s.rxq.used_idx(&s.mem) {
        let (id, len) = s.rxq.used(&s.mem, i);
        let mut data = vec![0u8; len as usize];
        s.mem
            .read_slice(&mut data, GuestAddress(rx_buf(id)))
            .unwrap();
        if data.len() >= VNET_HDR_LEN + 14 && data[VNET_HDR_LEN + 12..][..2] == ETHERTYPE {
            let frame = data.split_off(VNET_HDR_LEN);
            out.push((data, frame));
        }
    }
    out
}

/// Posts an RX chain of one writable buffer of `len` bytes; buffers sit at an address
/// derived from their head index, which these tests hand out in order.
fn post_rx(s: &mut Setup, len: u32) {
    let head = s.rx_posted;
    let got = s.rxq.add(&s.mem, &[w(rx_buf(u32::from(head)), len)]);
    assert_eq!(got, head);
    s.rx_posted += 1;
}

#[test]
fn tx_frame_comes_out_of_the_tap() {
    let (mut net, mut s) = setup();
    let f = frame(1, 100);
    s.mem
        .write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(BUF))
        .unwrap();
    s.mem.write_slice(&f, GuestAddress(BUF + 0x1000)).unwrap();
    // Header and frame in separate descriptors, and the frame itself split in two.
    let head = s.txq.add(
        &s.mem,
        &[
            r(BUF, VNET_HDR_LEN as u32),
            r(BUF + 0x1000, 20),
            r(BUF + 0x1000 + 20, f.len() as u32 - 20),
        ],
    );
    net.process_tx();
    assert_eq!(s.txq.used_idx(&s.mem), 1);
    assert_eq!(s.txq.used(&s.mem, 0), (u32::from(head), 0));
    assert_eq!(s.irq.evt.read().unwrap(), 1);
    assert_eq!(s.sock.recv_ours().expect("frame not seen on the tap"), f);
}

/// A header asking for checksum offload and TCP segmentation, which were never
/// negotiated: the tap must get a plain frame (the host kernel refuses or acts on it
/// otherwise).
#[test]
fn tx_offload_requests_of_the_guest_are_cleared() {
    let (mut net, mut s) = setup();
    let f = frame(3, 100);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    hdr[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    hdr[2..4].copy_from_slice(&14u16.to_le_bytes()); // hdr_len
    hdr[4..6].copy_from_slice(&8u16.to_le_bytes()); // gso_size
    hdr[6..8].copy_from_slice(&200u16.to_le_bytes()); // csum_start, past the frame
    hdr[8..10].copy_from_slice(&0xfff0u16.to_le_bytes()); // csum_offset
    s.mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
    s.mem.write_slice(&f, GuestAddress(BUF + 0x1000)).unwrap();
    s.txq.add(
        &s.mem,
        &[r(BUF, VNET_HDR_LEN as u32), r(BUF + 0x1000, f.len() as u32)],
    );
    net.process_tx();
    assert_eq!(s.txq.used_idx(&s.mem), 1);
    assert_eq!(s.sock.recv_ours().expect("frame not seen on the tap"), f);
}

#[test]
fn oversize_and_short_tx_chains_are_dropped() {
    let (mut net, mut s) = setup();
    s.txq.add(&s.mem, &[r(BUF, MAX_FRAME_LEN as u32 + 1)]);
    s.txq.add(&s.mem, &[r(BUF, VNET_HDR_LEN as u32)]);
    s.txq.add(&s.mem, &[w(BUF, 100)]);
    s.txq.add(&s.mem, &[r(1 << 40, 100)]);
    net.process_tx();
    assert_eq!(s.txq.used_idx(&s.mem), 4);
    assert!(s.sock.recv_ours().is_none());
}

#[test]
fn rx_frame_arrives_behind_a_vnet_header() {
    let (mut net, mut s) = setup();
    for _ in 0..4 {
        post_rx(&mut s, 2048);
    }
    let f = frame(2, 200);
    s.sock.send(&f);
    let deadline = Instant::now() + Duration::from_secs(2);
    while received(&s).is_empty() && Instant::now() < deadline {
        net.process_rx();
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = received(&s);
    assert_eq!(got.len(), 1, "frame not delivered");
    let (hdr, body) = &got[0];
    // All zeros but num_buffers, which is 1 (virtio 1.x, 5.1.6.4).
    assert_eq!(hdr[..NUM_BUFFERS_OFFSET], [0u8; NUM_BUFFERS_OFFSET]);
    assert_eq!(hdr[NUM_BUFFERS_OFFSET..], 1u16.to_le_bytes());
    assert_eq!(body, &f);
    assert!(s.irq.evt.read().unwrap() >= 1);
}

#[test]
fn rx_frame_too_big_for_the_buffer_is_dropped() {
    let (mut net, mut s) = setup();
    post_rx(&mut s, 100);
    s.sock.send(&frame(3, 300));
    let small = frame(4, 40);
    s.sock.send(&small);
    let deadline = Instant::now() + Duration::from_secs(2);
    while received(&s).is_empty() && Instant::now() < deadline {
        net.process_rx();
        std::thread::sleep(Duration::from_millis(5));
    }
    // The big frame went, and the buffer it could not fill took the next one.
    let got = received(&s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, small);
}

#[test]
fn rx_waits_for_buffers_without_losing_frames() {
    let (net, mut s) = setup();
    let mut em = EventManager::<Net>::new().unwrap();
    em.add_subscriber(net);
    em.run_with_timeout(100).unwrap(); // activation: registers the queues and the tap

    let f = frame(5, 64);
    s.sock.send(&f);
    // The tap becomes readable and is reported, but there is nowhere to put the frame.
    let deadline = Instant::now() + Duration::from_secs(2);
    while em.run_with_timeout(50).unwrap() == 0 && Instant::now() < deadline {}
    assert!(Instant::now() < deadline, "tap readiness never reported");
    assert_eq!(s.rxq.used_idx(&s.mem), 0);
    // No further tap event comes (edge-triggered), so only the guest's kick can resume RX.
    for _ in 0..4 {
        post_rx(&mut s, 2048);
    }
    s.rx_kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while received(&s).is_empty() && Instant::now() < deadline {
        em.run_with_timeout(50).unwrap();
    }
    let got = received(&s);
    assert_eq!(got.len(), 1, "frame lost");
    assert_eq!(got[0].1, f);
}

#[test]
fn after_a_reset_a_second_activation_gets_the_frames_that_waited() {
    let (net, mut s) = setup();
    let mut em = EventManager::<Net>::new().unwrap();
    let id = em.add_subscriber(net);
    em.run_with_timeout(100).unwrap();
    let net = em.subscriber_mut(id).unwrap();
    assert!(net.reset());
    assert!(!net.is_activated());
    em.run_with_timeout(100).unwrap();
    // The frame arrives while the device is down: the tap keeps it, and its one edge
    // reaches a device with no queues.
    let f = frame(9, 64);
    s.sock.send(&f);
    em.run_with_timeout(200).unwrap();
    s.rxq = TestQueue::new(&s.mem, 0x8000, 16);
    s.txq = TestQueue::new(&s.mem, 0xc000, 16);
    s.rx_posted = 0;
    post_rx(&mut s, 2048);
    let net = em.subscriber_mut(id).unwrap();
    net.activate(Activation {
        mem: s.mem.clone(),
        queues: vec![s.rxq.take_queue(), s.txq.take_queue()],
        queue_evts: vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ],
        irq: s.irq.clone(),
    })
    .unwrap();
    // No kick and no new tap edge: going live alone must move the waiting frame.
    let deadline = Instant::now() + Duration::from_secs(2);
    while received(&s).is_empty() && Instant::now() < deadline {
        em.run_with_timeout(50).unwrap();
    }
    let got = received(&s);
    assert_eq!(got.len(), 1, "the frame that waited was lost");
    assert_eq!(got[0].1, f);
}

/// RX limited to one frame per 300 ms: of two frames that arrive together, the second
/// waits in the device (not dropped, not delivered early) until the limiter's timer.
#[test]
fn a_rate_limited_rx_holds_a_frame_until_its_token_comes() {
    use husk_vmm_api::{RateLimiterConfig, TokenBucketConfig};
    let (net, mut s) = setup();
    let limiter = RateLimiter::new(&RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 300,
        }),
    })
    .unwrap();
    let net = net.with_rate_limiters(Some(limiter), None);
    let mut em = EventManager::<Net>::new().unwrap();
    em.add_subscriber(net);
    em.run_with_timeout(100).unwrap();
    for _ in 0..4 {
        post_rx(&mut s, 2048);
    }
    let (f1, f2) = (frame(1, 64), frame(2, 64));
    let t = Instant::now();
    s.sock.send(&f1);
    s.sock.send(&f2);
    // When each of our frames reached the guest (the host may send frames of its own,
    // which take tokens too, so only the gap between ours is certain).
    let mut seen = Vec::new();
    while seen.len() < 2 && t.elapsed() < Duration::from_secs(5) {
        em.run_with_timeout(10).unwrap();
        let n = received(&s).len();
        while seen.len() < n {
            seen.push(t.elapsed());
        }
    }
    let got = received(&s);
    assert_eq!(got.len(), 2, "a throttled frame was lost");
    assert_eq!((&got[0].1, &got[1].1), (&f1, &f2));
    assert!(
        seen[1] - seen[0] >= Duration::from_millis(250),
        "the second frame came {:?} after the first, before its token",
        seen[1] - seen[0]
    );
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let (mut net, mut s) = setup();
    s.rxq.add(&s.mem, &[r(BUF, 2048)]);
    s.rxq.add(&s.mem, &[w(BUF, 4)]);
    s.rxq.add(&s.mem, &[w(1 << 40, 2048)]);
    net.process_rx();
    assert_eq!(s.rxq.used_idx(&s.mem), 3);
    for i in 0..3 {
        assert_eq!(s.rxq.used(&s.mem, i).1, 0);
    }
}

#[test]
fn features_and_config() {
    let (net, _s) = setup();
    assert_eq!(net.device_type(), TYPE_NET);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = net.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_STATUS), 0);
    // No offloads, no mergeable buffers, no control queue.
    assert_eq!(
        f & 0xffff_ffff,
        1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    );
    let mut cfg = [0u8; 10];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], MAC);
    assert_eq!(cfg[6..8], 1u16.to_le_bytes());
    assert_eq!(cfg[8..], [0, 0]);
    assert_eq!(net.mac(), Some(MAC));
}

#[test]
fn tap_fd_from_the_parent() {
    let name = unique_tap_name();
    let _guard = TapGuard(name.clone());
    let tap = Tap::open(&name).unwrap();
    let net = Net::new_with_tap_fd(OwnedFd::from(tap.file), None).unwrap();
    assert_eq!(net.tap_name(), name);
    assert_eq!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
    assert_eq!(net.mac(), None);

    // Wrong kinds of fd are refused.
    let null = File::open("/dev/null").unwrap();
    assert!(matches!(
        Net::new_with_tap_fd(OwnedFd::from(null), None),
        Err(NetError::Ioctl("TUNGETIFF", _))
    ));
    let name2 = unique_tap_name();
    let _guard2 = TapGuard(name2.clone());
    let (plain, _) = tap::open_tun(&name2, libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
    assert!(matches!(
        Net::new_with_tap_fd(OwnedFd::from(plain), None),
        Err(NetError::TapFlags(_))
    ));
}

#[test]
fn bad_tap_names_are_refused() {
    for name in ["", "a-name-that-is-too-long", "nul\0byte"] {
        assert!(matches!(
            Net::new_with_tap_name(name, None),
            Err(NetError::Tap(TapError::InvalidName(_)))
        ));
    }
}

#[test]
fn activation_needs_two_queues() {
    let name = unique_tap_name();
    let _guard = TapGuard(name.clone());
    let mut net = Net::new_with_tap_name(&name, None).unwrap();
    let mem = guest_memory(MEM_SIZE);
    let mut q = TestQueue::new(&mem, 0, 16);
    let err = net
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![q.take_queue()],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            irq: IrqTrigger::new().unwrap(),
        })
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { expected: 2, .. }));
    assert!(!net.is_activated());
}
