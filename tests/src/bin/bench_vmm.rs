//! husk-bench-vmm: boot-time and overhead benchmark of husk-vmm against QEMU's microvm on
//! the same guest kernel and initramfs, in the same run. Run it where KVM works (inside
//! the lab: `tests/lab/run -- target/release/husk-bench-vmm`).
//!
//! Boot figure: from spawning the VMM process to the guest's "userspace reached" line on
//! its serial console, the same measure for both VMMs (husk's own boot-timer port gives
//! the same point, and is printed for reference). Runs alternate between husk-vmm, husk-vmm
//! jailed as the sandbox layer runs it (`--jail`), and QEMU.
//!
//! Boot phases, for both VMMs on the same guest: VMM start → the guest kernel's clock
//! starts (the VMM's start-up, loading, firmware or none), and kernel → init on the guest's
//! own clock (testinit prints `/proc/uptime` at init).
//!
//! `--startup` measures only the VMM's own start-up, from process start to its first
//! KVM_RUN, phase by phase (from husk-vmm's log), and kills the VM right there. It needs only
//! a `/dev/kvm` that can create VMs, so it also runs on hosts where guests would be emulated
//! (a PVM host), outside the lab.
//!
//! `--agent-ready [--peer BIN_DIR GUEST_DIR]` boots the pod initramfs (the agent as init)
//! and times VMM start → the agent listening on vsock → its first answer, alternating with
//! a peer build's husk-vmm and guest image when given (see bench_vmm/agent_ready.rs).
//!
//! Both VMMs boot from one staged copy of husk-vmm, the kernel and the initramfs on local
//! storage (bench_vmm/stage.rs), and every boot is preceded by a scrub of host RAM
//! (bench_vmm/scrub.rs: under the lab's TCG a VM on pages an earlier guest ran code from
//! boots a second slower); `--no-scrub` leaves the scrub out, to see that effect.
//!
//! `--kernel-log` boots the guest once under each VMM with testinit's `kmsg` test and prints
//! the largest gaps between the kernel's log records: where the kernel's own time goes
//! (`HUSK_BENCH_KMSG_ALL=1` prints the whole logs too).
#[path = "bench_vmm/agent_ready.rs"]
mod agent_ready;
#[path = "bench_vmm/scrub.rs"]
mod scrub;
#[path = "bench_vmm/stage.rs"]
mod stage;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use husk_tests::bench::ms;
use std::time::{Duration, Instant};

const MARKER: &str = "husk-testinit: userspace reached";
const MEM_MIB: u64 = 128;

/// The staged husk-vmm, vmlinux and testinit.cpio (see bench_vmm/stage.rs).
static STAGED: OnceLock<PathBuf> = OnceLock::new();

fn staged() -> &'static Path {
    STAGED.get().expect("the bench's files are staged first")
}

fn husk_cmd(test: &str) -> Command {
    let g = staged();
    let mut c = Command::new(g.join("husk-vmm"));
    c.arg("--kernel").arg(g.join("vmlinux"));
    c.arg("--initramfs").arg(g.join("testinit.cpio"));
    c.args([
        "--mem",
        &MEM_MIB.to_string(),
        "--cmdline",
        &format!("quiet husk_test={test}"),
    ]);
    c
}

/// husk-vmm as the sandbox layer runs it: jailed (own PID, mount, IPC and UTS namespaces, a
/// uid of the jail range, limits) in a fresh directory.
fn husk_jailed_cmd(test: &str, run: usize) -> Command {
    // Inside the stage directory, so that it goes with it.
    let dir = staged().join(format!("jail-{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    let id = (husk_shim::sandbox::jail::UID_BASE + 7000 + run as u32).to_string();
    let mut c = husk_cmd(test);
    c.arg("--jail").arg(dir).args(["--uid", &id, "--gid", &id]);
    c
}

fn qemu_cmd(test: &str) -> Command {
    let g = staged();
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-machine",
        "microvm,acpi=off,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
    ]);
    c.args([
        "-m",
        &MEM_MIB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
    ]);
    c.args([
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "i8042",
    ]);
    c.arg("-kernel").arg(g.join("vmlinux"));
    c.arg("-initrd").arg(g.join("testinit.cpio"));
    c.args([
        "-append",
        &format!("console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd quiet husk_test={test}"),
    ]);
    c
}

const GUEST_CLOCK: &str = "husk-testinit: guest clock at init ";

/// Starts the VMM with its console on a pipe: the child and the console's lines.
fn spawn_console(mut c: Command) -> (Child, impl Iterator<Item = String>) {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn VMM");
    let out = child.stdout.take().unwrap();
    (child, BufReader::new(out).lines().map_while(Result::ok))
}

/// Time to the marker line, and the VMM's resident memory outside guest RAM (KiB) sampled
/// right after the marker.
fn boot_once(c: Command, sample_rss: bool) -> (Duration, Option<u64>) {
    let (boot, rss, _) = boot_phases(c, sample_rss);
    (boot, rss)
}

/// One boot: the time to the marker (host clock), the VMM's RSS outside guest RAM when
/// asked, and the guest's own clock at init (from its kernel's start).
fn boot_phases(c: Command, sample_rss: bool) -> (Duration, Option<u64>, Option<Duration>) {
    scrub::before_boot();
    let start = Instant::now();
    let (mut child, console) = spawn_console(c);
    let mut boot = None;
    let mut rss = None;
    let mut guest = None;
    for line in console {
        if let Some((_, rest)) = line.split_once(GUEST_CLOCK) {
            guest = rest
                .trim_end_matches(" s")
                .trim()
                .parse::<f64>()
                .ok()
                .map(Duration::from_secs_f64);
        }
        if boot.is_none() && line.contains(MARKER) {
            boot = Some(start.elapsed());
            if sample_rss {
                rss = overhead_kib(child.id());
            }
        }
    }
    let _ = child.wait();
    (boot.expect("guest never reached userspace"), rss, guest)
}

/// Sum of Rss over the process's mappings, minus the guest RAM mapping(s).
fn overhead_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut size) = (0u64, 0u64);
    for l in smaps.lines() {
        let mut it = l.split_whitespace();
        match it.next() {
            Some("Size:") => size = it.next()?.parse().ok()?,
            Some("Rss:") => {
                let rss: u64 = it.next()?.parse().ok()?;
                if size < MEM_MIB * 1024 {
                    total += rss;
                }
            }
            _ => {}
        }
    }
    Some(total)
}

fn vsock_round_trip() -> Duration {
    let dir = std::env::temp_dir().join(format!("husk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let _host = std::os::unix::net::UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let mut c = husk_cmd("vsock");
    c.arg("--vsock-uds").arg(&uds);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = c.spawn().unwrap();
    let rt = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no vsock round trip"
        );
        if let Ok(mut s) = UnixStream::connect(&uds) {
            if s.write_all(b"CONNECT 1024\n").is_ok() {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                    s.write_all(b"ping\n").unwrap();
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    assert_eq!(line, "ping\n");
                    break start.elapsed();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    rt
}

/// A boot's two phases in ms: VMM start → the guest kernel's clock starts (the host-measured
/// boot less the guest's clock at init), and kernel → init (the guest's clock).
fn split(boot: Duration, kernel: Duration) -> (f64, f64) {
    (ms(boot) - ms(kernel), ms(kernel))
}

fn stats(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

/// One start-up: (phase name, ms) in order, then ("first KVM_RUN", ms since VMM start).
fn startup_once(mut c: Command) -> Vec<(String, f64)> {
    c.args(["--serial", "none"])
        .env("HUSK_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn husk-vmm");
    let err = child.stderr.take().unwrap();
    let mut phases = Vec::new();
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        if let Some((_, list)) = line.split_once("VM built: ").or_else(|| {
            line.split_once(" as uid ")
                .and_then(|(_, r)| r.split_once(": "))
        }) {
            // "kvm 0.41 ms, memory 0.12 ms, ...", and the jail's steps the same way.
            for p in list.split(", ") {
                let mut words: Vec<&str> = p.split(' ').collect();
                if words.pop() != Some("ms") {
                    continue;
                }
                if let Some(ms) = words.pop().and_then(|v| v.parse().ok()) {
                    phases.push((words.join(" "), ms));
                }
            }
        } else if let Some((_, rest)) = line.split_once("first KVM_RUN ") {
            let ms = rest.split_whitespace().next().and_then(|v| v.parse().ok());
            phases.push((
                "first KVM_RUN".into(),
                ms.expect("unparseable first KVM_RUN line"),
            ));
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        phases.last().is_some_and(|(n, _)| n == "first KVM_RUN"),
        "husk-vmm never reached KVM_RUN"
    );
    phases
}

fn startup_table(runs: usize) {
    // Alternating, so both see the same host.
    let (mut all, mut jailed) = (Vec::new(), Vec::new());
    for i in 0..runs {
        all.push(startup_once(husk_cmd("boot")));
        jailed.push(startup_once(husk_jailed_cmd("boot", i)));
    }
    println!("husk-vmm start-up on this host ({runs} alternating runs each, {MEM_MIB} MiB; medians, min / max)");
    println!("| phase | husk-vmm (ms) | jailed, as the sandbox layer runs it (ms) |");
    println!("| --- | --- | --- |");
    let phase = |runs: &[Vec<(String, f64)>], name: &str| {
        let mut v: Vec<Duration> = runs
            .iter()
            .filter_map(|r| r.iter().find(|(n, _)| n == name))
            .map(|(_, ms)| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        (!v.is_empty()).then(|| stats(&mut v))
    };
    let cell = |v: Option<(f64, f64, f64)>| match v {
        Some((m, lo, hi)) => format!("{m:.2} ({lo:.2} / {hi:.2})"),
        None => "-".into(),
    };
    let mut names: Vec<String> = Vec::new();
    for r in all.iter().chain(&jailed) {
        for (n, _) in r {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    // The total last.
    names.retain(|n| n != "first KVM_RUN");
    names.push("first KVM_RUN".into());
    for name in &names {
        let label = if name == "first KVM_RUN" {
            "total: VMM start to first KVM_RUN"
        } else {
            name
        };
        println!(
            "| {label} | {} | {} |",
            cell(phase(&all, name)),
            cell(phase(&jailed, name))
        );
    }
    // The jail's own steps, summed per run: its cost without the noise of the other phases.
    let mut own: Vec<Duration> = jailed
        .iter()
        .map(|r| {
            r.iter()
                .filter(|(n, _)| JAIL_STEPS.contains(&n.as_str()))
                .map(|(_, ms)| Duration::from_secs_f64(ms / 1000.0))
                .sum()
        })
        .collect();
    let (m, lo, hi) = stats(&mut own);
    println!("| the jail's own steps, summed | - | {m:.2} ({lo:.2} / {hi:.2}) |");
}

/// The steps `husk-vmm --jail` logs (vmm::jail).
const JAIL_STEPS: [&str; 6] = [
    "namespaces",
    "private mounts",
    "pivot_root",
    "chroot",
    "helpers",
    "privileges",
];

/// The guest kernel's log under one VMM: (µs since the kernel's clock started, message).
fn kernel_log(c: Command) -> Vec<(u64, String)> {
    scrub::before_boot();
    let (mut child, console) = spawn_console(c);
    let mut log = Vec::new();
    for line in console {
        if let Some((_, rec)) = line.split_once("husk-testinit: kmsg ") {
            if let Some((us, msg)) = rec.split_once(' ') {
                log.extend(us.parse().ok().map(|us| (us, msg.to_string())));
            }
        }
    }
    let _ = child.wait();
    assert!(!log.is_empty(), "the guest printed no kernel log");
    log
}

/// Where the guest kernel's boot time goes under each VMM: the largest gaps between its
/// successive log records (the record that ends each gap names what took the time).
fn kernel_log_table(top: usize) {
    husk_tests::require_kvm();
    for (name, c) in [
        ("husk-vmm", husk_cmd("kmsg")),
        ("QEMU microvm", qemu_cmd("kmsg")),
    ] {
        let log = kernel_log(c);
        let mut gaps: Vec<(u64, u64, &str)> = log
            .windows(2)
            .map(|w| (w[1].0.saturating_sub(w[0].0), w[1].0, w[1].1.as_str()))
            .collect();
        gaps.sort_by_key(|g| std::cmp::Reverse(g.0));
        let last = log.last().map_or(0, |r| r.0);
        println!(
            "{name}: {} kernel log records, the last at {:.1} ms; the {top} largest gaps",
            log.len(),
            last as f64 / 1000.0
        );
        println!("| gap (ms) | at (ms) | the record after the gap |");
        println!("| --- | --- | --- |");
        for (gap, at, msg) in gaps.iter().take(top) {
            println!(
                "| {:.1} | {:.1} | {} |",
                *gap as f64 / 1000.0,
                *at as f64 / 1000.0,
                msg.replace('|', "/")
            );
        }
        if std::env::var_os("HUSK_BENCH_KMSG_ALL").is_some() {
            for (us, msg) in &log {
                println!("{name} [{:>10.3}] {msg}", *us as f64 / 1000.0);
            }
        }
    }
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if std::env::args().any(|a| a == "--agent-ready") {
        let this = agent_ready::Build {
            name: "this build".into(),
            bin_dir: husk_tests::bin_dir(),
            guest_dir: husk_tests::guest_dir(),
        };
        return agent_ready::table(this, agent_ready::peer_from_args(), runs);
    }
    let stage = stage::Stage::new(
        "boot",
        &husk_tests::bin_dir(),
        &husk_tests::guest_dir(),
        &["vmlinux", "testinit.cpio"],
    );
    STAGED.set(stage.dir().to_owned()).unwrap();
    if std::env::args().any(|a| a == "--kernel-log") {
        return kernel_log_table(15);
    }
    if std::env::args().any(|a| a == "--startup") {
        return startup_table(runs);
    }
    husk_tests::require_kvm();
    // One unmeasured boot each first, so that neither VMM's first start (its binary and
    // libraries read in) is a sample.
    boot_once(husk_cmd("boot"), false);
    boot_once(qemu_cmd("boot"), false);
    let (mut husk, mut jailed, mut qemu) = (vec![], vec![], vec![]);
    // Per run under each VMM: (VMM start → kernel clock start, kernel → init), ms.
    let (mut husk_phases, mut qemu_phases) = (vec![], vec![]);
    for i in 0..runs {
        let (boot, _, kernel) = boot_phases(husk_cmd("boot"), false);
        husk.push(boot);
        husk_phases.extend(kernel.map(|k| split(boot, k)));
        jailed.push(boot_once(husk_jailed_cmd("boot", i), false).0);
        let (boot, _, kernel) = boot_phases(qemu_cmd("boot"), false);
        qemu.push(boot);
        qemu_phases.extend(kernel.map(|k| split(boot, k)));
        eprintln!(
            "run {}/{runs}: husk {:?} jailed {:?} qemu {:?}",
            i + 1,
            husk[i],
            jailed[i],
            qemu[i]
        );
    }
    let husk_rss = boot_once(husk_cmd("hold"), true).1.unwrap_or(0);
    let qemu_rss = boot_once(qemu_cmd("hold"), true).1.unwrap_or(0);
    let rt = vsock_round_trip();
    let (hm, hmin, hmax) = stats(&mut husk);
    let (qm, qmin, qmax) = stats(&mut qemu);
    let (jm, jmin, jmax) = stats(&mut jailed);
    let scrubbed = if scrub::enabled() {
        "host RAM scrubbed before each boot"
    } else {
        "no scrub (--no-scrub)"
    };
    println!("husk-vmm vs QEMU microvm ({runs} alternating runs each, 1 vCPU, {MEM_MIB} MiB, same kernel + initramfs; {scrubbed})");
    println!("| metric | husk-vmm | QEMU microvm | husk/QEMU |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| boot to userspace, median (ms) | {hm:.0} | {qm:.0} | {:.2} |",
        hm / qm
    );
    println!("| boot, min / max (ms) | {hmin:.0} / {hmax:.0} | {qmin:.0} / {qmax:.0} | |");
    println!(
        "| boot jailed, median (min / max) (ms) | {jm:.0} ({jmin:.0} / {jmax:.0}) | | jailed/unjailed {:.3} |",
        jm / hm
    );
    let med = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        husk_tests::bench::median(v.iter().map(pick).collect())
    };
    let (hp, qp) = (med(&husk_phases, |p| p.0), med(&qemu_phases, |p| p.0));
    let (hk, qk) = (med(&husk_phases, |p| p.1), med(&qemu_phases, |p| p.1));
    println!(
        "| phase: VMM start → the guest kernel's clock starts, median (ms) | {hp:.0} | {qp:.0} | {:.2} |",
        hp / qp
    );
    println!(
        "| phase: kernel → init, guest clock, median (ms) | {hk:.0} | {qk:.0} | {:.2} |",
        hk / qk
    );
    println!(
        "| VMM RSS outside guest RAM (MiB) | {:.1} | {:.1} | {:.2} |",
        husk_rss as f64 / 1024.0,
        qemu_rss as f64 / 1024.0,
        husk_rss as f64 / qemu_rss.max(1) as f64
    );
    println!(
        "| VMM start to first vsock round trip (ms) | {:.0} | n/a | |",
        rt.as_secs_f64() * 1000.0
    );
}
