//! The hostile guest's raw virtio-net driver: the kernel driver is unbound, the device's
//! MMIO window is mapped from /dev/mem, and the rings live in locked pages whose
//! guest-physical addresses come from /proc/self/pagemap. With that the guest hands the
//! VMM what no kernel driver would: offload features never offered, TX headers asking for
//! checksum and segmentation offload, descriptor loops, self-referencing indirect tables,
//! out-of-range addresses and lengths, a runaway available index, rings outside RAM.
//!
//! Every attack reports how many chains the device gave back, so the closing note can say
//! what the VMM did with each; the host side of the test judges whether the VMM survived.
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::{errno, R};

// virtio-mmio registers (virtio 1.x, 4.2.2).
const MAGIC: usize = 0x000;
const DEVICE_ID: usize = 0x008;
const DRV_FEATURES: usize = 0x020;
const DRV_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC: usize = 0x080;
const QUEUE_AVAIL: usize = 0x090;
const QUEUE_USED: usize = 0x0a0;

const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Our queue size: descriptors at 0, available ring at 0x100, used ring at 0x200 of a page.
const QSIZE: u16 = 16;
const AVAIL: usize = 0x100;
const USED: usize = 0x200;
/// Far past any guest's RAM.
const OUT_OF_RANGE: u64 = 1 << 40;

/// The device's MMIO window, mapped from /dev/mem.
struct Mmio(*mut u32);

impl Mmio {
    fn map(base: u64) -> Result<Mmio, String> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(|e| format!("open /dev/mem: {e}"))?;
        // SAFETY: a fresh shared mapping of one page of /dev/mem at `base`; nothing else in
        // this process refers to that address range. The mapping outlives the fd (mmap keeps
        // its own reference).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno(&format!("mmap /dev/mem at {base:#x}")));
        }
        Ok(Mmio(p.cast()))
    }
    fn r(&self, off: usize) -> u32 {
        // SAFETY: off is a register offset below 0x100, inside the mapped page; MMIO needs
        // volatile access.
        unsafe { self.0.add(off / 4).read_volatile() }
    }
    fn w(&self, off: usize, v: u32) {
        // SAFETY: as in `r`.
        unsafe { self.0.add(off / 4).write_volatile(v) }
    }
    fn w64(&self, off: usize, v: u64) {
        self.w(off, v as u32);
        self.w(off + 4, (v >> 32) as u32);
    }
}

/// One locked page of our memory and its guest-physical address.
struct Page {
    ptr: *mut u8,
    phys: u64,
}

impl Page {
    fn new(pagemap: &File) -> Result<Page, String> {
        // SAFETY: a fresh private anonymous page, owned by this struct for the process's life
        // (PID 1 never unmaps it: the device may still write to it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno("mmap a ring page"));
        }
        // SAFETY: p is our mapping of 4096 bytes; locked so its physical page never moves.
        if unsafe { libc::mlock(p, 4096) } != 0 {
            return Err(errno("mlock"));
        }
        // SAFETY: p is valid for 4096 bytes; writing also makes the page present.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, 4096) };
        let mut e = [0u8; 8];
        pagemap
            .read_exact_at(&mut e, (p as u64 / 4096) * 8)
            .map_err(|e| format!("read pagemap: {e}"))?;
        let e = u64::from_le_bytes(e);
        let pfn = e & ((1 << 55) - 1);
        if e >> 63 == 0 || pfn == 0 {
            return Err(format!("pagemap gives no frame ({e:#x}): not root?"));
        }
        Ok(Page {
            ptr: p.cast(),
            phys: pfn * 4096,
        })
    }
    fn put(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= 4096);
        // SAFETY: inside our page (checked above); volatile: the device reads it.
        unsafe {
            for (i, b) in bytes.iter().enumerate() {
                self.ptr.add(off + i).write_volatile(*b);
            }
        }
    }
    fn get16(&self, off: usize) -> u16 {
        // SAFETY: inside our page, 2-aligned (ring fields); volatile: the device writes it.
        unsafe { self.ptr.add(off).cast::<u16>().read_volatile() }
    }
}

/// One virtqueue of ours: its ring page and the next available index.
struct Ring {
    page: Page,
    index: u32,
    avail: u16,
}

impl Ring {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(next.to_le_bytes());
        self.page.put(16 * usize::from(i % QSIZE), &d);
    }
    /// Offers `heads`, moves the available index by `bump` more than their count (a runaway
    /// index when non-zero), kicks, and returns how many the device gave back within 2 s.
    fn offer(&mut self, m: &Mmio, heads: &[u16], bump: u16) -> u16 {
        let used_before = self.page.get16(USED + 2);
        for h in heads {
            let slot = AVAIL + 4 + 2 * usize::from(self.avail % QSIZE);
            self.page.put(slot, &h.to_le_bytes());
            self.avail = self.avail.wrapping_add(1);
        }
        self.avail = self.avail.wrapping_add(bump);
        fence(Ordering::SeqCst);
        self.page.put(AVAIL + 2, &self.avail.to_le_bytes());
        fence(Ordering::SeqCst);
        m.w(QUEUE_NOTIFY, self.index);
        let deadline = Instant::now() + Duration::from_secs(2);
        let want = heads.len() as u16;
        loop {
            let got = self.page.get16(USED + 2).wrapping_sub(used_before);
            if got >= want || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The virtio-net device's platform-device name and MMIO base: the kernel names the
/// command line's `virtio_mmio.device=` entries virtio-mmio.0, .1, ... in order.
fn find_net() -> Result<(String, u64), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| e.to_string())?;
    let bases: Vec<u64> = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(|v| v.split_once("@0x"))
        .filter_map(|(_, r)| u64::from_str_radix(r.split(':').next()?, 16).ok())
        .collect();
    for (n, base) in bases.iter().enumerate() {
        let dev = format!("virtio-mmio.{n}");
        let dir = format!("/sys/bus/platform/devices/{dev}");
        for e in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let e = e.map_err(|e| e.to_string())?;
            let id = std::fs::read_to_string(e.path().join("device")).unwrap_or_default();
            if e.file_name().to_string_lossy().starts_with("virtio") && id.trim() == "0x0001" {
                return Ok((dev, *base));
            }
        }
    }
    Err(format!(
        "no virtio-net among {} virtio-mmio devices",
        bases.len()
    ))
}

/// Resets the device and walks the status bits up to FEATURES_OK acking `features`;
/// returns whether the device kept FEATURES_OK.
fn negotiate(m: &Mmio, features: u64) -> bool {
    m.w(STATUS, 0);
    m.w(STATUS, ACK);
    m.w(STATUS, ACK | DRIVER);
    m.w(DRV_FEATURES_SEL, 0);
    m.w(DRV_FEATURES, features as u32);
    m.w(DRV_FEATURES_SEL, 1);
    m.w(DRV_FEATURES, (features >> 32) as u32);
    m.w(STATUS, ACK | DRIVER | FEATURES_OK);
    m.r(STATUS) & FEATURES_OK != 0
}

fn setup_queue(m: &Mmio, index: u32, desc: u64, page: u64) {
    m.w(QUEUE_SEL, index);
    m.w(QUEUE_NUM, u32::from(QSIZE));
    m.w64(QUEUE_DESC, desc);
    m.w64(QUEUE_AVAIL, page + AVAIL as u64);
    m.w64(QUEUE_USED, page + USED as u64);
    m.w(QUEUE_READY, 1);
}

const VERSION_1: u64 = 1 << 32;
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
/// CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4, HOST_UFO: offloads husk never offers.
const NET_OFFLOADS: u64 = 1 << 0 | 1 << 1 | 1 << 7 | 1 << 11 | 1 << 14;

/// A vnet header asking for checksum offload and TCPv4 segmentation, then an
/// Ethernet/IPv4/TCP-looking frame of `len` bytes.
fn offload_frame(len: usize) -> Vec<u8> {
    let mut f = vec![1u8, 1]; // NEEDS_CSUM, GSO_TCPV4
    for v in [54u16, 100, 34, 16, 0] {
        f.extend(v.to_le_bytes()); // hdr_len, gso_size, csum_start, csum_offset, num_buffers
    }
    f.extend([0xff; 6]);
    f.extend([6, 0, 0, 0, 0, 1]);
    f.extend([8, 0]);
    f.extend((0..len - 14).map(|i| i as u8));
    f
}

pub fn attack() -> R {
    let (dev, base) = find_net()?;
    let m = Mmio::map(base)?;
    if m.r(MAGIC) != 0x7472_6976 || m.r(DEVICE_ID) != 1 {
        return Err(format!("{dev} at {base:#x} is not virtio-net"));
    }
    std::fs::write("/sys/bus/platform/drivers/virtio-mmio/unbind", &dev)
        .map_err(|e| format!("unbind {dev}: {e}"))?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut rx = Ring {
        page: Page::new(&pagemap)?,
        index: 0,
        avail: 0,
    };
    let mut tx = Ring {
        page: Page::new(&pagemap)?,
        index: 1,
        avail: 0,
    };
    let buf = Page::new(&pagemap)?;
    let mut out = Vec::new();

    // Offloads never offered: the device must refuse FEATURES_OK.
    let took_offloads = negotiate(&m, VERSION_1 | NET_F_MAC | NET_F_STATUS | NET_OFFLOADS);
    out.push(format!("offload_features_accepted={took_offloads}"));
    if !negotiate(&m, VERSION_1 | NET_F_STATUS) {
        return Err("the device refused plain VERSION_1 | STATUS".into());
    }
    setup_queue(&m, 0, rx.page.phys, rx.page.phys);
    setup_queue(&m, 1, tx.page.phys, tx.page.phys);
    m.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    if m.r(STATUS) & NEEDS_RESET != 0 {
        return Err(format!(
            "device needs reset after setup: {:#x}",
            m.r(STATUS)
        ));
    }

    // 1000 frames whose headers ask for checksum and TSO offload, 8 per kick.
    let frame = offload_frame(1200);
    buf.put(0, &frame);
    let (mut sent, mut back) = (0u32, 0u32);
    for _ in 0..125 {
        for i in 0..8u16 {
            tx.desc(2 * i, buf.phys, 12, F_NEXT, 2 * i + 1);
            tx.desc(2 * i + 1, buf.phys + 12, frame.len() as u32 - 12, 0, 0);
        }
        let heads: Vec<u16> = (0..8).map(|i| 2 * i).collect();
        back += u32::from(tx.offer(&m, &heads, 0));
        sent += 8;
    }
    out.push(format!("offload_frames={back}/{sent}"));

    // One chain per kind, each its own kick.
    let table = tx.page.phys;
    let mut one = |name: &str, descs: &[(u64, u32, u16, u16)]| {
        for (i, d) in descs.iter().enumerate() {
            tx.desc(i as u16, d.0, d.1, d.2, d.3);
        }
        let got = tx.offer(&m, &[0], 0);
        out.push(format!("{name}={got}/1"));
    };
    one(
        "loop",
        &[(buf.phys, 12, F_NEXT, 1), (buf.phys, 64, F_NEXT, 0)],
    );
    one("next_out_of_range", &[(buf.phys, 12, F_NEXT, 999)]);
    one("addr_out_of_range", &[(OUT_OF_RANGE, 1500, 0, 0)]);
    one("len_4g", &[(buf.phys, u32::MAX, 0, 0)]);
    one("len_past_ram", &[(buf.phys, 64 << 20, 0, 0)]);
    one("write_only_tx", &[(buf.phys, 1500, F_WRITE, 0)]);
    one("indirect_self", &[(table, 256, F_INDIRECT, 0)]);
    one("indirect_oob", &[(OUT_OF_RANGE, 256, F_INDIRECT, 0)]);

    // RX buffers no frame fits in, or outside RAM: handed back empty on the kick.
    rx.desc(0, OUT_OF_RANGE, 2048, F_WRITE, 0);
    rx.desc(1, buf.phys, 4, F_WRITE, 0);
    rx.desc(2, buf.phys, 2048, 0, 0);
    let got = rx.offer(&m, &[0, 1, 2], 0);
    out.push(format!("bad_rx_buffers={got}/3"));

    // An available index 1000 ahead of what was offered: the queue is broken for good.
    tx.desc(0, buf.phys, 64, 0, 0);
    let got = tx.offer(&m, &[0], 1000);
    out.push(format!("runaway_avail_idx={got}/1"));

    // Rings outside RAM: activation must fail, only for this device.
    if !negotiate(&m, VERSION_1 | NET_F_STATUS) {
        return Err("renegotiation refused".into());
    }
    setup_queue(&m, 0, OUT_OF_RANGE, OUT_OF_RANGE);
    setup_queue(&m, 1, OUT_OF_RANGE, OUT_OF_RANGE);
    m.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    std::thread::sleep(Duration::from_millis(100));
    out.push(format!("rings_outside_ram_status={:#x}", m.r(STATUS)));
    m.w(STATUS, 0);
    Ok(out.join(" "))
}
