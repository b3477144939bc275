//! A guest that tries to hurt the host (testinit's `hostile` mode: console flood, vsock
//! storm, virtio-net driven by hand with offload requests and malformed rings) leaves its
//! VMM up, with its console log, its own log and its memory outside guest RAM bounded, and a
//! second VM beside it keeps working.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_tests::vmm_proc::{self, VmmExitStatus};
use vmm::devices::legacy::capped_log::DEFAULT_CONSOLE_CAP;
use vmm::devices::virtio::vsock::MAX_CONNECTIONS;

use super::{connect_guest, tmpdir, Netns};

const MEM_MIB: u64 = 128;
/// The console log's size before the guest boots: 16 KiB short of the cap.
const PREFILL: u64 = DEFAULT_CONSOLE_CAP - (16 << 10);
const PREFILL_MARK: &str = "husk-test: console prefill starts here";
const FLOOD_SECS: u64 = 20;
/// The guest tries this many streams to the storm port (testinit/hostile.rs).
const STORM_STREAMS: usize = 3000;
/// What the VMM may grow by, outside guest RAM, under the whole attack: its per-stream
/// buffers for MAX_CONNECTIONS streams and the console's are far below this.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 << 10;
/// The VMM's log after the attack: rate-limited guest warnings grow with the logarithm of
/// the guest's effort.
const VMM_LOG_LIMIT: usize = 256 << 10;

/// Resident KiB of `pid` outside its guest RAM mapping (the one mapping of MEM_MIB);
/// `None` once the process is gone.
fn rss_outside_ram_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let kib = |l: &str, name: &str| -> Option<u64> {
        l.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let (mut total, mut in_ram, mut ram_maps) = (0, false, 0);
    for l in smaps.lines() {
        if let Some(size) = kib(l, "Size:") {
            in_ram = size == MEM_MIB * 1024;
            ram_maps += usize::from(in_ram);
        } else if let Some(rss) = kib(l, "Rss:") {
            if !in_ram {
                total += rss;
            }
        }
    }
    (ram_maps == 1).then_some(total)
}

/// Lets the test process hold every stream the guest opens.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// Accepts and holds every stream on `l` until `stop`; returns how many came.
fn hold_streams(l: UnixListener, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        held.len()
    })
}

/// The next line the guest sends on the control port, and the stream to answer on.
fn control_line(l: &UnixListener, deadline: Instant) -> (String, UnixStream) {
    loop {
        assert!(Instant::now() < deadline, "the guest never called back");
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                return (line.trim().to_string(), s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `key=value` from the guest's figures.
fn figure<'a>(figures: &'a str, key: &str) -> &'a str {
    figures
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in the guest's figures: {figures}"))
}

fn number(figures: &str, key: &str) -> u64 {
    figure(figures, key)
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {figures}"))
}

/// A plain VM beside the hostile one: boots, echoes on vsock, reaches its host port.
fn neighbour_round_trip(dir: &Path) {
    let uds = dir.join("neighbour.sock");
    let host = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = host.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(b"hi neighbour\n").unwrap();
    });
    let child = vmm_proc::command("vsock", "")
        .arg("--vsock-uds")
        .arg(&uds)
        .spawn()
        .unwrap();
    let t = Instant::now();
    let s = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(180));
    (&s).write_all(b"ping beside a hostile guest\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    (&s).read_to_string(&mut back).unwrap();
    assert_eq!(back, "ping beside a hostile guest\n", "neighbour echo");
    drop(s);
    let o = vmm_proc::wait(child, Duration::from_secs(120));
    o.assert_pass("vsock");
    server.join().unwrap();
    eprintln!(
        "hostile: neighbour VM booted and echoed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn a_hostile_guest_cannot_hurt_the_host() {
    husk_tests::require_kvm();
    raise_fd_limit();
    let d = tmpdir("hostile");
    let uds = d.join("vsock.sock");
    let console = d.join("console.log");
    // Guest console writes are slow in the lab (each byte a VM exit two levels down: about
    // 3 KiB/s), so the log starts near its cap, as a long-lived pod's would be; the flood
    // then takes it over and the cap must cut it back.
    let mut prefill = format!("{PREFILL_MARK}\n").into_bytes();
    prefill.resize(PREFILL as usize, b'.');
    std::fs::write(&console, &prefill).unwrap();
    let control = UnixListener::bind(format!("{}_5003", uds.display())).unwrap();
    control.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let storm = hold_streams(
        UnixListener::bind(format!("{}_5001", uds.display())).unwrap(),
        stop.clone(),
    );
    let ns = Netns::new("husk-kvm-hostile");
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    let vmm = vmm_proc::command("hostile", &format!("husk_flood_secs={FLOOD_SECS}"));
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &ns.0]);
    c.arg(vmm.get_program()).args(vmm.get_args());
    c.args(["--mem", &MEM_MIB.to_string(), "--net-tap", "tap0"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--serial")
        .arg(&console)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    // `ip netns exec` execs the VMM in place: same PID.
    let pid = child.id();

    let (ready, s) = control_line(&control, Instant::now() + Duration::from_secs(180));
    assert_eq!(ready, "ready");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "husk-vmm", "not the VMM's PID");
    let rss_before = rss_outside_ram_kib(pid).expect("one guest RAM mapping in smaps");
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_outside_ram_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    (&s).write_all(b"go\n").unwrap();
    drop(s);

    // While the guest floods its console and storms vsock.
    neighbour_round_trip(&d);

    let (done, s) = control_line(&control, Instant::now() + Duration::from_secs(600));
    let rss_after = rss_outside_ram_kib(pid).expect("one guest RAM mapping in smaps");
    (&s).write_all(b"ok\n").unwrap();
    drop(s);
    let o = vmm_proc::wait(child, Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    let accepted = storm.join().unwrap();
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let console_text = std::fs::read(&console).unwrap();
    let console_text = String::from_utf8_lossy(&console_text);
    let figures = done
        .strip_prefix("done ")
        .unwrap_or_else(|| panic!("the guest said {done:?}"));

    eprintln!("hostile: guest: {figures}");
    eprintln!(
        "hostile: console log {} bytes (cap {DEFAULT_CONSOLE_CAP}, prefilled {PREFILL}), VMM log {} bytes, \
         VMM RSS outside guest RAM {rss_before} KiB before, {rss_after} KiB after, \
         {peak} KiB peak; host accepted {accepted} storm streams",
        console_text.len(),
        o.stderr.len()
    );
    let verdict = console_text
        .lines()
        .find(|l| l.starts_with("husk-testinit: hostile "))
        .unwrap_or_else(|| panic!("no verdict on the console; VMM log:\n{}", o.stderr));
    assert!(
        verdict.starts_with("husk-testinit: hostile PASS"),
        "{verdict}\n--- vmm log ---\n{}",
        o.stderr
    );
    assert_eq!(o.status, Some(VmmExitStatus::GuestEnded), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);

    // The console: the flood took the log past its cap, the file kept to it, and what it
    // dropped was the oldest (the prefill's start), not the newest (the verdict).
    let flooded = number(figures, "flood_tty_bytes") + number(figures, "flood_port_bytes");
    assert!(
        PREFILL + flooded > DEFAULT_CONSOLE_CAP,
        "a flood of {flooded} bytes never reached the cap"
    );
    assert!(
        !console_text.contains(PREFILL_MARK),
        "the console log was never cut back"
    );
    assert!(console_text.len() as u64 <= DEFAULT_CONSOLE_CAP);
    assert!(o.stderr.len() <= VMM_LOG_LIMIT, "VMM log:\n{}", o.stderr);
    assert!(
        peak.saturating_sub(rss_before) <= RSS_GROWTH_LIMIT_KIB,
        "the VMM grew by {} KiB outside guest RAM",
        peak - rss_before
    );

    // The storm: the VMM's cap on streams held, so some were refused.
    let opened = number(figures, "storm_opened") as usize;
    let refused = number(figures, "storm_refused") as usize;
    assert!(opened <= MAX_CONNECTIONS, "{opened} streams opened");
    assert!(
        accepted <= MAX_CONNECTIONS,
        "{accepted} streams reached the host"
    );
    assert!(
        refused > 0 && opened + refused == STORM_STREAMS,
        "{figures}"
    );
    assert_eq!(number(figures, "dead_port_opened"), 0, "{figures}");

    // The raw driver: offloads never offered are refused, and every attack was made.
    assert_eq!(figure(figures, "offload_features_accepted"), "false");
    for key in [
        "offload_frames",
        "loop",
        "addr_out_of_range",
        "runaway_avail_idx",
    ] {
        figure(figures, key);
    }
    std::fs::remove_dir_all(d).unwrap();
}
