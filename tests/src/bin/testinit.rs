//! husk-testinit: a tiny static PID 1 for guest tests of the VMM. It mounts the basics,
//! prints a marker on the console, writes the boot-marker port, runs the test named by the
//! `husk_test` kernel parameter, prints `husk-testinit: <test> PASS|FAIL <detail>`, and
//! reboots (with `reboot=k` that ends the VM).
//!
//! Tests: `boot` (nothing more), `smp` (all CPUs online), `kmsg` (the kernel's log), `vsock` (echo server on vsock
//! port 1024, then a connect to host port 5000), `block` (pattern on /dev/vda, read back
//! with O_DIRECT; /dev/vdb must refuse writes; both disks' serials reported), `net` (address from `husk_net=GUEST/PREFIX,HOST`,
//! then ICMP echo to HOST), `fs` (mount virtio-fs tag `husk_fs`, read hello.txt, write
//! from-guest.txt), `panic` (PID 1 exits, so the kernel panics), `slowdisk` (a thread reads
//! /dev/vda with O_DIRECT, 4 MiB apart, for ever, from when vsock port 1024 accepts, and
//! that port echoes), `hostile` (a guest that floods the console, storms vsock and drives
//! virtio-net by hand with malformed rings: see testinit/hostile.rs).
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

#[path = "testinit/hostile.rs"]
mod hostile;
#[path = "testinit/rawvirtio.rs"]
mod rawvirtio;

/// The VMM's boot-timer port and value (vmm::devices::legacy::BOOT_MARKER_*).
const BOOT_MARKER_PORT: u16 = 0x3f0;
const BOOT_MARKER_VALUE: u8 = 123;

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs", "");
    mount("proc", "/proc", "proc", "");
    mount("sysfs", "/sys", "sysfs", "");
    println!("husk-testinit: userspace reached");
    boot_marker();
    // The guest's own clock at init (CLOCK_BOOTTIME, from the kernel's start): the bench's
    // kernel → init phase, the same measure under every VMM.
    if let Some(up) = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_string))
    {
        println!("husk-testinit: guest clock at init {up} s");
    }
    let test = std::env::var("husk_test").unwrap_or_else(|_| "boot".into());
    let result = match test.as_str() {
        "boot" => Ok("booted".to_string()),
        "hold" => {
            // Keeps the VM up a moment so a benchmark can look at the VMM's memory.
            std::thread::sleep(std::time::Duration::from_secs(3));
            Ok("held".to_string())
        }
        "smp" => smp(),
        "kmsg" => kmsg(),
        "vsock" => vsock(),
        "block" => block(),
        "net" => net(),
        "fs" => fs(),
        "slowdisk" => slow_disk(),
        "hostile" => hostile::hostile(),
        "panic" => {
            // PID 1 exiting makes the kernel panic ("Attempted to kill init!").
            println!("husk-testinit: panic: exiting PID 1");
            std::process::exit(1)
        }
        other => Err(format!("unknown test {other}")),
    };
    match result {
        Ok(d) => println!("husk-testinit: {test} PASS {d}"),
        Err(e) => println!("husk-testinit: {test} FAIL {e}"),
    }
    let _ = std::io::stdout().flush();
    // SAFETY: plain syscalls with constant arguments; as PID 1 we own the machine.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}

type R = Result<String, String>;

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in constant strings")
}

fn mount(src: &str, dst: &str, fstype: &str, data: &str) -> bool {
    let _ = std::fs::create_dir_all(dst);
    let (s, d, t, o) = (cstr(src), cstr(dst), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), 0, o.as_ptr().cast()) };
    if rc != 0 {
        eprintln!("husk-testinit: {}", errno(&format!("mount {dst}")));
    }
    rc == 0
}

fn boot_marker() {
    // SAFETY: ioperm on one port for this process, then one byte out to it; the VMM owns
    // that port and only records the time.
    unsafe {
        if libc::ioperm(BOOT_MARKER_PORT.into(), 1, 1) != 0 {
            eprintln!("husk-testinit: {}", errno("ioperm"));
            return;
        }
        std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") BOOT_MARKER_VALUE);
    }
}

fn smp() -> R {
    let online =
        std::fs::read_to_string("/sys/devices/system/cpu/online").map_err(|e| e.to_string())?;
    Ok(format!("online={}", online.trim()))
}

/// Prints the kernel's log records (from /dev/kmsg, each with its timestamp in µs), so a
/// benchmark can see where a boot's kernel time goes without a slow console printing it.
fn kmsg() -> R {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("/dev/kmsg: {e}"))?;
    // One record per read; EAGAIN once the log is drained.
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(len) => {
                let rec = String::from_utf8_lossy(&buf[..len]);
                // "prio,seq,usec,flags;message\n"
                if let Some((head, msg)) = rec.split_once(';') {
                    let usec = head.split(',').nth(2).unwrap_or("?");
                    println!("husk-testinit: kmsg {usec} {}", msg.trim_end());
                    n += 1;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Ok(format!("{n} records"))
}

fn vsock_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket() has no memory arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno("vsock socket"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as _;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// Accepts one stream on vsock port 1024, calls `accepted`, and echoes the stream to its
/// end; returns the bytes echoed.
fn echo_on_1024(accepted: impl FnOnce()) -> Result<usize, String> {
    use std::os::fd::AsRawFd;
    let l = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, 1024);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as u32;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    if unsafe {
        libc::bind(
            l.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    } != 0
    {
        return Err(errno("vsock bind"));
    }
    // SAFETY: plain syscall on our socket.
    if unsafe { libc::listen(l.as_raw_fd(), 4) } != 0 {
        return Err(errno("vsock listen"));
    }
    println!("husk-testinit: vsock listening on 1024");
    // SAFETY: no address wanted back.
    let c = unsafe { libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
    if c < 0 {
        return Err(errno("vsock accept"));
    }
    // SAFETY: c is a fresh descriptor nobody else owns.
    let mut conn = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(c) });
    accepted();
    let mut buf = vec![0u8; 64 << 10];
    let mut echoed = 0usize;
    loop {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("vsock read: {e}"))?;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])
            .map_err(|e| format!("vsock write: {e}"))?;
        echoed += n;
    }
    Ok(echoed)
}

/// Reads 4 KiB from /dev/vda every 4 MiB, with O_DIRECT (past the guest's page cache, and
/// far enough apart that host read-ahead does not serve the next one), until the VM ends.
fn read_disk_for_ever() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/vda")
    {
        Ok(f) => f,
        Err(e) => return println!("husk-testinit: slowdisk: open /dev/vda: {e}"),
    };
    let size = f.metadata().map(|m| m.len()).unwrap_or(0).max(1 << 30);
    let mut buf = Aligned::new(4096);
    let mut off = 0u64;
    println!("husk-testinit: slowdisk: reading");
    loop {
        let _ = f.read_exact_at(buf.as_mut(), off);
        off = (off + (4 << 20)) % size;
    }
}

/// The disk reader starts once the host is connected: the host slows the disk down first
/// (reads before that would fill its page cache and never reach the disk again).
fn slow_disk() -> R {
    let echoed = echo_on_1024(|| {
        std::thread::spawn(read_disk_for_ever);
    })?;
    Ok(format!("echoed {echoed} bytes"))
}

fn vsock() -> R {
    use std::os::fd::AsRawFd;
    let echoed = echo_on_1024(|| {})?;
    let s = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_HOST, 5000);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as u32;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    if unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    } != 0
    {
        return Err(errno("vsock connect to host port 5000"));
    }
    let mut s = std::fs::File::from(s);
    s.write_all(b"hello from the guest\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(format!("echoed={echoed} host-said={}", reply.trim()))
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn block() -> R {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const LEN: usize = 64 << 10;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/vda")
        .map_err(|e| format!("open /dev/vda: {e}"))?;
    let mut out = Aligned::new(LEN);
    for (i, b) in out.as_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f.write_all_at(out.as_mut(), 4096)
        .map_err(|e| format!("write: {e}"))?;
    f.sync_all().map_err(|e| format!("flush: {e}"))?;
    let mut back = Aligned::new(LEN);
    f.read_exact_at(back.as_mut(), 4096)
        .map_err(|e| format!("read: {e}"))?;
    if back.as_mut() != out.as_mut() {
        return Err("read back differs from what was written".into());
    }
    let _ = f.flush();
    let ro = match std::fs::OpenOptions::new().write(true).open("/dev/vdb") {
        Err(e) => format!("vdb-write-refused({e})"),
        Ok(mut w) => match w.write_all(b"x").and_then(|_| w.sync_all()) {
            Err(e) => format!("vdb-write-refused({e})"),
            Ok(()) => return Err("the read-only disk accepted a write".into()),
        },
    };
    // The disks' serials (virtio-blk GET_ID), as the host's `--block ...,id=` set them.
    let serial = |disk: &str| {
        std::fs::read_to_string(format!("/sys/block/{disk}/serial"))
            .map(|s| s.trim_end_matches(['\0', '\n']).to_string())
            .unwrap_or_else(|e| format!("unreadable({e})"))
    };
    Ok(format!(
        "pattern-ok {ro} vda-serial={} vdb-serial={}",
        serial("vda"),
        serial("vdb")
    ))
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn sockaddr_in(ip: [u8; 4]) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    a.sin_family = libc::AF_INET as _;
    a.sin_addr.s_addr = u32::from_ne_bytes(ip);
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctls take it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(a) }
}

fn parse_ip(s: &str) -> Result<[u8; 4], String> {
    s.parse::<std::net::Ipv4Addr>()
        .map(|a| a.octets())
        .map_err(|e| format!("bad address {s:?}: {e}"))
}

fn net() -> R {
    use std::os::fd::AsRawFd;
    let spec = std::env::var("husk_net").map_err(|_| "husk_net= not given".to_string())?;
    let (guest, host) = spec.split_once(',').ok_or("husk_net=GUEST/PREFIX,HOST")?;
    let (gip, prefix) = guest.split_once('/').ok_or("husk_net=GUEST/PREFIX,HOST")?;
    let (gip, hip) = (parse_ip(gip)?, parse_ip(host)?);
    let prefix: u32 = prefix.parse().map_err(|_| "bad prefix")?;
    let mask = (!0u32).checked_shl(32 - prefix).unwrap_or(0).to_be_bytes();
    // SAFETY: socket() has no memory arguments; wrapped in OwnedFd at once.
    let s = unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0)) };
    let ioctl = |req: libc::Ioctl, r: &mut libc::ifreq, what: &str| -> Result<(), String> {
        // SAFETY: r is a valid ifreq for these interface ioctls.
        if unsafe { libc::ioctl(s.as_raw_fd(), req, r as *mut libc::ifreq) } != 0 {
            return Err(errno(what));
        }
        Ok(())
    };
    let mut r = ifreq("eth0");
    r.ifr_ifru.ifru_addr = sockaddr_in(gip);
    ioctl(libc::SIOCSIFADDR, &mut r, "set eth0 address")?;
    let mut r = ifreq("eth0");
    r.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl(libc::SIOCSIFNETMASK, &mut r, "set eth0 netmask")?;
    let mut r = ifreq("eth0");
    ioctl(libc::SIOCGIFFLAGS, &mut r, "get eth0 flags")?;
    // SAFETY: reading the flags member the kernel just filled.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16 };
    ioctl(libc::SIOCSIFFLAGS, &mut r, "bring eth0 up")?;
    ping(hip)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping(dst: [u8; 4]) -> R {
    use std::os::fd::AsRawFd;
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(errno("raw ICMP socket"));
    }
    // SAFETY: fd is fresh and ours.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let addr = sockaddr_in(dst);
    for seq in 1..=10u16 {
        let mut pkt = vec![8u8, 0, 0, 0, 0x48, 0x4b, (seq >> 8) as u8, seq as u8];
        pkt.extend_from_slice(b"husk-ping");
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: pkt and addr are valid for the lengths given.
        unsafe {
            libc::sendto(
                s.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                &addr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let mut buf = [0u8; 1500];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl..n as usize];
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[6..8] == seq.to_be_bytes()
                && buf[12..16] == dst
            {
                return Ok(format!("echo-reply seq={seq}"));
            }
        }
    }
    Err("no echo reply in 10 tries".into())
}

fn fs() -> R {
    if !mount("husk_fs", "/mnt", "virtiofs", "") {
        return Err(errno("mount virtiofs"));
    }
    let hello = std::fs::read_to_string("/mnt/hello.txt").map_err(|e| format!("read: {e}"))?;
    std::fs::write("/mnt/from-guest.txt", "written by the guest\n")
        .map_err(|e| format!("write: {e}"))?;
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    Ok(format!("host-said={}", hello.trim()))
}
