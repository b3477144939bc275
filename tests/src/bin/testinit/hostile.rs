//! `husk_test=hostile`: a guest that tries to hurt its VMM (the lab test
//! vmm::a_hostile_guest_cannot_hurt_the_host judges whether it did). In turn:
//! 1. it tells the host it is ready on vsock port 5003 and waits for "go";
//! 2. it floods the console for `husk_flood_secs` (default 20): /dev/console through the
//!    kernel's tty and, at the same time, the UART's data port directly (ioperm + outb);
//! 3. it opens thousands of vsock streams to host port 5001 (the test listens there) and
//!    holds them, then to port 5099 (nobody listens);
//! 4. it drives the virtio-net device by hand (see `rawvirtio`);
//! 5. it reports what it did on port 5003 and in its verdict.
//!
//! The verdict is FAIL only when the guest could not mount an attack at all; what the VMM
//! made of the attacks is for the host side to judge.
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{errno, rawvirtio, vsock_addr, vsock_socket, R};

const CONTROL_PORT: u32 = 5003;
const STORM_PORT: u32 = 5001;
const DEAD_PORT: u32 = 5099;
/// Streams tried to STORM_PORT: well past the VMM's cap on streams.
const STORM_STREAMS: usize = 3000;
const DEAD_STREAMS: usize = 500;
const COM1_DATA: u16 = 0x3f8;

/// Connects to host `port`; `Err` holds the errno text.
fn connect(port: u32) -> Result<OwnedFd, String> {
    let s = vsock_socket()?;
    // A refused or dropped connect must not cost the storm the kernel's 2 s default.
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: tv is a valid timeval of the size given; SO_VM_SOCKETS_CONNECT_TIMEOUT (6)
    // at level AF_VSOCK takes one on x86_64.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::AF_VSOCK,
            6,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let addr = vsock_addr(libc::VMADDR_CID_HOST, port);
    // SAFETY: addr is a valid sockaddr_vm of the length given.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    if rc != 0 {
        return Err(errno("connect"));
    }
    Ok(s)
}

/// Sends `line` on the control port and returns the host's one-line answer.
fn control(line: &str) -> Result<String, String> {
    let s = File::from(connect(CONTROL_PORT).map_err(|e| format!("control port: {e}"))?);
    (&s).write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("control write: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("control read: {e}"))?;
    Ok(answer.trim().to_string())
}

/// Writes the console as fast as the guest can for `secs`; returns the bytes written
/// through the tty and straight to the UART.
fn flood(secs: u64) -> Result<(u64, u64), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tty = std::thread::spawn(move || {
        let mut c = match File::options().write(true).open("/dev/console") {
            Ok(c) => c,
            Err(_) => return 0u64,
        };
        let line = [b'T'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        let mut n = 0u64;
        while Instant::now() < deadline {
            if c.write_all(&line).is_err() {
                break;
            }
            n += line.len() as u64;
        }
        n
    });
    // SAFETY: ioperm for the UART's 8 ports of this process only; PID 1 is root.
    if unsafe { libc::ioperm(COM1_DATA.into(), 8, 1) } != 0 {
        return Err(errno("ioperm COM1"));
    }
    let mut port = 0u64;
    while Instant::now() < deadline {
        for i in 0..4096u32 {
            let b = if i % 64 == 63 { b'\n' } else { b'P' };
            // SAFETY: one byte to the UART data port we were granted; the VMM emulates it.
            unsafe { std::arch::asm!("out dx, al", in("dx") COM1_DATA, in("al") b) };
        }
        port += 4096;
    }
    let tty = tty.join().map_err(|_| "console writer panicked")?;
    if tty == 0 {
        return Err("could not write /dev/console at all".into());
    }
    Ok((tty, port))
}

fn raise_fd_limit() {
    let lim = libc::rlimit {
        rlim_cur: 16384,
        rlim_max: 16384,
    };
    // SAFETY: lim is a valid rlimit; PID 1 may raise its hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        println!("husk-testinit: hostile: {}", errno("setrlimit"));
    }
}

/// Connects `n` times to `port` within `budget`, holding what opens; returns the held
/// streams, the refusal count and the distinct errors seen.
fn storm(port: u32, n: usize, budget: Duration) -> (Vec<OwnedFd>, usize, Vec<String>) {
    let deadline = Instant::now() + budget;
    let (mut held, mut refused, mut kinds) = (Vec::new(), 0, Vec::<String>::new());
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        match connect(port) {
            Ok(s) => held.push(s),
            Err(e) => {
                refused += 1;
                if !kinds.contains(&e) {
                    kinds.push(e);
                }
            }
        }
    }
    (held, refused, kinds)
}

pub fn hostile() -> R {
    let secs: u64 = std::env::var("husk_flood_secs")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    raise_fd_limit();
    let go = control("ready")?;
    if go != "go" {
        return Err(format!("host said {go:?} instead of go"));
    }
    let (tty, port) = flood(secs)?;
    let mut figures = vec![format!("flood_tty_bytes={tty} flood_port_bytes={port}")];

    let t = Instant::now();
    let (held, refused, kinds) = storm(STORM_PORT, STORM_STREAMS, Duration::from_secs(120));
    let opened = held.len();
    figures.push(format!(
        "storm_opened={opened} storm_refused={refused} storm_secs={:.1} storm_errors={:?}",
        t.elapsed().as_secs_f64(),
        kinds.join("|")
    ));
    if opened == 0 {
        return Err(format!("no stream to port {STORM_PORT} opened: {kinds:?}"));
    }
    let (dead, dead_refused, _) = storm(DEAD_PORT, DEAD_STREAMS, Duration::from_secs(60));
    figures.push(format!(
        "dead_port_opened={} dead_port_refused={dead_refused}",
        dead.len()
    ));
    // Closing thousands at once is one more burst for the VMM to take.
    drop(held);
    drop(dead);

    // Reported even when it fails, so the host hears the rest and does not wait in vain.
    let raw = rawvirtio::attack();
    figures.push(match &raw {
        Ok(f) => f.clone(),
        Err(e) => format!("raw_error={e:?}"),
    });
    let figures = figures.join(" ");
    let ok = control(&format!("done {figures}"))?;
    raw?;
    if ok != "ok" {
        return Err(format!("host said {ok:?} at the end"));
    }
    Ok(figures)
}
