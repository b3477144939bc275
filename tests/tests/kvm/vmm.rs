//! husk-vmm booting the real guest kernel with the test init, device by device.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_tests::vmm_proc::{self, Output, VmmExitStatus};

mod hostile;
mod jail;
mod slow_disk;
mod threads;

const T: Duration = Duration::from_secs(120);

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-kvm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn boot_ms(o: &Output) -> f64 {
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("guest userspace started"))
        .unwrap_or_else(|| panic!("no boot marker in the VMM log:\n{}", o.stderr));
    line.split("started ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparseable boot marker line {line}"))
}

#[test]
fn boots_to_userspace_and_exits_cleanly_on_reboot() {
    husk_tests::require_kvm();
    let o = vmm_proc::run("boot", "", &[], T);
    o.assert_pass("boot");
    assert_eq!(o.status, Some(VmmExitStatus::GuestEnded), "{}", o.stderr);
    assert!(o.stdout.contains("husk-testinit: userspace reached"));
    assert!(o.stderr.contains("VM ended: guest_reset"), "{}", o.stderr);
    let ms = boot_ms(&o);
    assert!(ms > 0.0 && ms < 120_000.0, "boot took {ms} ms");
}

#[test]
fn two_vcpus_come_online() {
    husk_tests::require_kvm();
    let o = vmm_proc::run("smp", "", &["--vcpus", "2"], T);
    let v = o.assert_pass("smp");
    assert!(v.contains("online=0-1"), "{v}");
}

#[test]
fn guest_panic_has_its_own_exit_status() {
    husk_tests::require_kvm();
    let o = vmm_proc::run("panic", "", &[], T);
    assert_eq!(
        o.status,
        Some(VmmExitStatus::GuestPanic),
        "{}\n{}",
        o.stdout,
        o.stderr
    );
    assert!(o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn bad_kernel_is_a_clear_setup_error() {
    husk_tests::require_kvm();
    let d = tmpdir("badkernel");
    let k = d.join("not-a-kernel");
    std::fs::write(&k, b"garbage").unwrap();
    let o = vmm_proc::wait(
        Command::new(husk_tests::bin_dir().join("husk-vmm"))
            .arg("--kernel")
            .arg(&k)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        T,
    );
    assert_eq!(o.status, Some(VmmExitStatus::SetupFailed));
    assert!(o.stderr.contains("kernel"), "{}", o.stderr);
    std::fs::remove_dir_all(d).unwrap();
}

fn connect_guest(uds: &Path, port: u32, deadline: Instant) -> UnixStream {
    loop {
        assert!(
            Instant::now() < deadline,
            "guest never accepted on vsock port {port}"
        );
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            // Byte by byte, so nothing after the OK line is swallowed by a buffer.
            let mut line = Vec::new();
            let mut b = [0u8];
            while (&s).read_exact(&mut b).is_ok() && b[0] != b'\n' {
                line.push(b[0]);
            }
            if line.starts_with(b"OK ") {
                // Shared by every clone of the stream: no read or write waits forever on a
                // guest that died.
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                return s;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn vsock_echoes_16_mib_and_guest_reaches_host() {
    husk_tests::require_kvm();
    let d = tmpdir("vsock");
    let uds = d.join("vsock.sock");
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut c, _) = host_listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(b"hi guest\n").unwrap();
        line
    });
    let child = vmm_proc::command("vsock", "")
        .arg("--vsock-uds")
        .arg(&uds)
        .spawn()
        .unwrap();
    let s = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(90));
    const LEN: usize = 16 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 253) as u8).collect();
    let mut w = s.try_clone().unwrap();
    let expect = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(LEN);
    (&s).take(LEN as u64).read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert!(
        got == expect,
        "echoed bytes differ (got {} bytes)",
        got.len()
    );
    drop(s);
    let o = vmm_proc::wait(child, T);
    let v = o.assert_pass("vsock");
    assert!(v.contains(&format!("echoed={LEN}")), "{v}");
    assert!(v.contains("host-said=hi guest"), "{v}");
    assert_eq!(server.join().unwrap(), "hello from the guest\n");
    assert_eq!(o.status, Some(VmmExitStatus::GuestEnded), "{}", o.stderr);
    assert!(!uds.exists(), "the VMM left its vsock socket behind");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn block_write_read_read_only_disk_and_serials() {
    husk_tests::require_kvm();
    let d = tmpdir("block");
    let (rw, ro) = (d.join("rw.img"), d.join("ro.img"));
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&ro, vec![0xeeu8; 1 << 20]).unwrap();
    let o = vmm_proc::run(
        "block",
        "",
        &[
            "--block",
            &format!("{},id=husk-rw-disk", rw.display()),
            "--block",
            // Exactly the 20 bytes GET_ID has room for: no NUL terminator in the guest.
            &format!("{},ro,id=read-only-disk-20byt", ro.display()),
        ],
        T,
    );
    let v = o.assert_pass("block");
    assert!(v.contains("vdb-write-refused"), "{v}");
    assert!(v.contains("vda-serial=husk-rw-disk "), "{v}");
    assert!(v.ends_with("vdb-serial=read-only-disk-20byt"), "{v}");
    let bytes = std::fs::read(&rw).unwrap();
    let expected: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        &bytes[4096..4096 + (64 << 10)],
        &expected[..],
        "host file lacks the guest's pattern"
    );
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|b| *b == 0xee),
        "read-only disk changed"
    );
    std::fs::remove_dir_all(d).unwrap();
}

/// A network namespace of our own, removed on drop, so the test's tap and addresses
/// never touch the host's network.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        assert!(Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success());
        Netns(name.into())
    }
    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args:?} failed", self.0);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn net_guest_pings_the_host_end_of_its_tap() {
    husk_tests::require_kvm();
    let ns = Netns::new("husk-kvm-net");
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.ip(&["addr", "add", "10.213.0.1/24", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0]);
    let vmm = vmm_proc::command("net", "husk_net=10.213.0.2/24,10.213.0.1");
    c.arg(vmm.get_program()).args(vmm.get_args());
    c.args(["--net-tap", "tap0,mac=06:00:0a:d5:00:02"]);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let o = vmm_proc::wait(c.spawn().unwrap(), T);
    let v = o.assert_pass("net");
    assert!(v.contains("echo-reply"), "{v}");
}

#[test]
fn fs_share_reads_and_writes_host_files() {
    husk_tests::require_kvm();
    let d = tmpdir("fs");
    let share = d.join("share");
    let (sock, mut vfsd) = shared_dir(&d);
    let o = vmm_proc::run(
        "fs",
        "",
        &["--fs-socket", &format!("{},tag=husk_fs", sock.display())],
        T,
    );
    let _ = vfsd.kill();
    let _ = vfsd.wait();
    let v = o.assert_pass("fs");
    assert!(v.contains("host-said=hello from the host"), "{v}");
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "written by the guest\n"
    );
    std::fs::remove_dir_all(d).unwrap();
}

/// `<d>/share` (holding hello.txt) served by virtiofsd on `<d>/vfs.sock`: the socket, and
/// virtiofsd for the test to kill.
fn shared_dir(d: &Path) -> (PathBuf, std::process::Child) {
    let share = d.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let sock = d.join("vfs.sock");
    let vfsd = spawn_virtiofsd(&share, &sock);
    (sock, vfsd)
}

/// virtiofsd serving `share` on `sock`, as the tests need it (no sandbox, no cache).
fn spawn_virtiofsd(share: &Path, sock: &Path) -> std::process::Child {
    let virtiofsd =
        husk_vmm_api::virtiofsd_path().expect("virtiofsd is missing: run scripts/setup");
    Command::new(virtiofsd)
        .arg("--socket-path")
        .arg(sock)
        .arg("--shared-dir")
        .arg(share)
        .args(["--sandbox", "none", "--cache", "never"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn vms_boot_concurrently(n: usize) {
    husk_tests::require_kvm();
    let children: Vec<_> = (0..n)
        .map(|_| vmm_proc::command("boot", "").spawn().unwrap())
        .collect();
    for c in children {
        let o = vmm_proc::wait(c, Duration::from_secs(240));
        o.assert_pass("boot");
        assert_eq!(o.status, Some(VmmExitStatus::GuestEnded));
    }
}

#[test]
fn four_vms_boot_concurrently() {
    vms_boot_concurrently(4);
}

/// What the lab can run of the test above (see scripts/test): still several VMMs, each with
/// its own KVM VM, vsock-less and independent, at the same time.
#[test]
fn two_vms_boot_concurrently() {
    vms_boot_concurrently(2);
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let after = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
            if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn killing_the_vmm_leaves_no_socket_tap_or_child() {
    husk_tests::require_kvm();
    let d = tmpdir("kill");
    let uds = d.join("vsock.sock");
    let tap = "huskkill0";
    let mut child = vmm_proc::command("vsock", "")
        .arg("--vsock-uds")
        .arg(&uds)
        .args(["--net-tap", tap])
        .spawn()
        .unwrap();
    // Once the guest listens, the VM is fully up.
    let s = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(90));
    let pid = child.id();
    assert!(
        Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "the VMM made no tap"
    );
    // The VMM's children, taken while it lives: after it is reaped they would be
    // reparented and no longer show as its children, so a check then could not fail.
    let kids = children_of(pid);
    assert!(!kids.is_empty(), "the VMM has no cleanup helper to watch");
    // A zombie has exited: its cleanup is done, only its reaping is left to PID 1.
    let alive = || -> Vec<u32> {
        kids.iter()
            .copied()
            .filter(
                |k| match std::fs::read_to_string(format!("/proc/{k}/stat")) {
                    Ok(st) => st
                        .rsplit_once(") ")
                        .is_some_and(|(_, r)| !r.starts_with('Z')),
                    // Reaped: gone from /proc. Any other error means we cannot look: fail.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => panic!("cannot read /proc/{k}/stat: {e}"),
                },
            )
            .collect()
    };
    let tap_exists = || Path::new(&format!("/sys/class/net/{tap}")).exists();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while (uds.exists() || tap_exists() || !alive().is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!uds.exists(), "vsock socket left behind");
    assert!(!tap_exists(), "tap left behind");
    assert_eq!(alive(), Vec::<u32>::new(), "the VMM's children outlived it");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn control_api_configures_starts_pauses_and_shuts_down() {
    use husk_vmm_api::{self as api, Request, VmState};
    husk_tests::require_kvm();
    let d = tmpdir("api");
    let sock = d.join("api.sock");
    let child = Command::new(husk_tests::bin_dir().join("husk-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let call = |r: Request| api::request(&sock, &r, &[]).expect("API round trip");
    let status = || -> api::VmStatus { call(Request::Status).parse_result().unwrap() };
    assert_eq!(status().state, VmState::Configuring);
    let early = call(Request::Start);
    assert!(!early.ok, "start without configure must be refused");
    let g = husk_tests::guest_dir();
    let cfg = format!(
        r#"{{"op":"configure","kernel":"{}","initramfs":"{}","cmdline":"quiet husk_test=vsock","mem_mib":128,"vcpus":1,"serial":"stdout"}}"#,
        g.join("vmlinux").display(),
        g.join("testinit.cpio").display()
    );
    assert!(call(serde_json::from_str(&cfg).unwrap()).ok);
    let uds = d.join("vsock.sock");
    assert!(
        call(Request::AddVsock(api::VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone()
        }))
        .ok
    );
    assert!(call(Request::Start).ok);
    assert_eq!(status().state, VmState::Running);
    let refused = call(Request::AddVsock(api::VsockConfig {
        guest_cid: 4,
        uds_path: d.join("x"),
    }));
    assert!(!refused.ok, "devices cannot be added after start");
    // The guest is up once it answers on vsock.
    let s = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(90));
    assert!(
        status().boot_ms.is_some(),
        "no boot time after the guest is up"
    );
    assert!(call(Request::Pause).ok);
    assert_eq!(status().state, VmState::Paused);
    assert!(call(Request::Resume).ok);
    assert_eq!(status().state, VmState::Running);
    let mut s2 = s.try_clone().unwrap();
    s2.write_all(b"still alive\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(
        line, "still alive\n",
        "the guest did not run again after resume"
    );
    assert!(call(Request::Shutdown).ok);
    let o = vmm_proc::wait(child, T);
    assert_eq!(o.status, Some(VmmExitStatus::GuestEnded), "{}", o.stderr);
    assert!(o.stderr.contains("VM ended: api"), "{}", o.stderr);
    assert!(!sock.exists() && !uds.exists(), "sockets left behind");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn jailed_vmm_boots_as_an_unprivileged_user() {
    husk_tests::require_kvm();
    let d = tmpdir("jail");
    let o = vmm_proc::run(
        "boot",
        "",
        &[
            "--jail",
            d.join("root").to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
        ],
        T,
    );
    o.assert_pass("boot");
    assert_eq!(o.status, Some(VmmExitStatus::GuestEnded), "{}", o.stderr);
    std::fs::remove_dir_all(d).unwrap();
}

/// Per mapping of `pid` whose size is `size_kib`: (Shared_Clean + Shared_Dirty, AnonHugePages).
fn smaps_of_mappings_sized(pid: u32, size_kib: u64) -> Vec<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/smaps: {e}"));
    let field = |l: &str, name: &str| -> Option<u64> {
        l.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut current: Option<usize> = None;
    for l in smaps.lines() {
        if let Some(size) = field(l, "Size:") {
            current = (size == size_kib).then(|| {
                out.push((0, 0));
                out.len() - 1
            });
        } else if let Some(i) = current {
            if let Some(kb) = field(l, "Shared_Clean:").or_else(|| field(l, "Shared_Dirty:")) {
                out[i].0 += kb;
            } else if let Some(kb) = field(l, "AnonHugePages:") {
                out[i].1 += kb;
            }
        }
    }
    out
}

/// Guest RAM is the VMM's alone: no helper or other child shares a page of it (a fork after
/// the kernel was loaded used to keep megabytes of it copy-on-write with the cleanup helper).
#[test]
fn guest_memory_is_shared_with_no_other_process() {
    husk_tests::require_kvm();
    let d = tmpdir("smaps");
    let uds = d.join("vsock.sock");
    let mut child = vmm_proc::command("vsock", "")
        .args(["--mem", "128"])
        .arg("--vsock-uds")
        .arg(&uds)
        .spawn()
        .unwrap();
    // Once the guest listens, the kernel and initramfs are loaded and the guest has run.
    let s = connect_guest(&uds, 1024, Instant::now() + Duration::from_secs(90));
    let pid = child.id();
    let ram = smaps_of_mappings_sized(pid, 128 * 1024);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(s);
    std::fs::remove_dir_all(d).unwrap();
    assert_eq!(
        ram.len(),
        1,
        "expected one 128 MiB guest RAM mapping: {ram:?}"
    );
    let (shared_kib, huge_kib) = ram[0];
    eprintln!("guest RAM: {shared_kib} KiB shared, {huge_kib} KiB in huge pages");
    assert_eq!(shared_kib, 0, "guest RAM shared with another process");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("no core limit in /proc/PID/limits");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(
        fields.get(4..6),
        Some(&["0", "0"][..]),
        "core dumps allowed: {core}"
    );
}

/// A vCPU thread that panics (this test binary is a debug build: panics unwind) ends the VM
/// with a vCPU error instead of leaving it running without that vCPU.
#[test]
fn a_panicking_vcpu_thread_ends_the_vm() {
    use std::sync::Arc;
    use vmm::devices::bus::Bus;
    use vmm::vstate::vcpu::{RunControl, Vcpu, VcpuShared};
    use vmm::vstate::{vm::Vm, ExitReason, VmExit};
    husk_tests::require_kvm();
    let vm = Vm::new().unwrap();
    let vcpu = Vcpu::new(&vm.fd, 0).unwrap();
    let exit = Arc::new(VmExit::new().unwrap());
    let shared = VcpuShared {
        pio: Arc::new(Bus::new()),
        mmio: Arc::new(Bus::new()),
        exit: exit.clone(),
        control: Arc::new(RunControl::default()),
        on_start: Arc::new(|| panic!("a bug on the vCPU thread")),
    };
    vcpu.spawn(shared).unwrap().join().unwrap();
    assert_eq!(
        exit.reason(),
        Some(ExitReason::VcpuError("vCPU 0 panicked".into()))
    );
}
