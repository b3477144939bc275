//! The filters in real threads: forbidden calls kill a re-executed copy of the test binary,
//! allowed ones work.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use super::*;

/// Set in the environment of a re-executed test binary: the child tests below only act
/// when it is present, so a plain `cargo test` (even with `--include-ignored`) never
/// installs a filter on the test harness itself.
const CHILD_ENV: &str = "HUSK_SECCOMP_TEST_CHILD";

/// Runs the ignored test `name` (in this module) alone in a fresh copy of this test binary.
fn run_child(name: &str, extra_env: &[(&str, &str)]) -> Output {
    let full = format!("seccomp::tests::{name}");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        &full,
        "--exact",
        "--ignored",
        "--test-threads=1",
        "--nocapture",
    ])
    .env(CHILD_ENV, "1")
    .env_remove(MODE_ENV);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    eprintln!(
        "child {name}: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether this is a re-executed child; if so, it will not dump core when killed.
fn is_child() -> bool {
    if std::env::var_os(CHILD_ENV).is_none() {
        return false;
    }
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid struct. Lowering a limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) }, 0);
    true
}

/// The child ran our test and it passed (not merely "0 tests run").
fn assert_child_passed(out: &Output, name: &str) {
    assert!(out.status.success(), "child failed: {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("seccomp::tests::{name} ... ok")),
        "{stdout}"
    );
}

fn assert_killed_by_sigsys(out: &Output, syscall: i64) {
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "status {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("husk-vmm: seccomp: forbidden syscall {syscall} (");
    assert!(stderr.contains(&expected), "{stderr}");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh fds that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// socket(2) raw, so that nothing else (std's socket code) runs under the filter.
fn raw_socket(domain: libc::c_int) -> libc::c_int {
    // SAFETY: plain syscall; the fd (if any) is closed by the caller.
    unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }
}

/// Like a vCPU thread: a new thread installs the filter first, then works, then exits.
fn on_filtered_thread(kind: ThreadKind, work: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        install(kind).unwrap();
        work();
    })
    .join()
    .unwrap();
}

#[test]
#[ignore = "runs in a child process, from forbidden_syscall_kills_the_process"]
fn child_vcpu_forbidden_socket() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::Vcpu, || {
        let fd = raw_socket(libc::AF_INET);
        // Not reached: the filter kills the process first.
        eprintln!("socket returned {fd}: the filter let it through");
    });
}

#[test]
fn forbidden_syscall_kills_the_process() {
    let out = run_child("child_vcpu_forbidden_socket", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_socket);
    assert!(String::from_utf8_lossy(&out.stderr).contains("on a vcpu thread"));
}

#[test]
#[ignore = "runs in a child process, from vmm_thread_may_open_unix_sockets_only"]
fn child_vmm_socket_domains() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::Vmm, || {
        let fd = raw_socket(libc::AF_UNIX);
        assert!(fd >= 0, "AF_UNIX socket refused");
        // SAFETY: `fd` is ours.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        eprintln!("AF_UNIX socket allowed");
        raw_socket(libc::AF_INET);
        eprintln!("AF_INET socket allowed: the filter let it through");
    });
}

#[test]
#[ignore = "runs in a child process, from vmm_thread_may_not_open_unix_datagram_sockets"]
fn child_vmm_unix_datagram() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::Vmm, || {
        // SAFETY: plain syscall; the filter stops it.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        eprintln!("AF_UNIX datagram socket allowed: the filter let it through");
    });
}

#[test]
fn vmm_thread_may_not_open_unix_datagram_sockets() {
    let out = run_child("child_vmm_unix_datagram", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_socket);
}

#[test]
#[ignore = "runs in a child process, from vmm_thread_may_not_unlink"]
fn child_vmm_unlink() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::Vmm, || {
        // SAFETY: a static path; the filter stops the call before it looks at it.
        unsafe { libc::unlink(c"/nonexistent-husk-seccomp-test".as_ptr()) };
        eprintln!("unlink allowed: the filter let it through");
    });
}

#[test]
fn vmm_thread_may_not_unlink() {
    let out = run_child("child_vmm_unlink", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_unlink);
}

#[test]
fn vmm_thread_may_open_unix_sockets_only() {
    let out = run_child("child_vmm_socket_domains", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AF_UNIX socket allowed"), "{stderr}");
    assert!(stderr.contains("on a vmm thread"), "{stderr}");
}

#[test]
#[ignore = "runs in a child process, from device_io_thread_may_not_open_any_socket"]
fn child_device_io_socket() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::DeviceIo, || {
        let fd = raw_socket(libc::AF_UNIX);
        eprintln!("socket returned {fd}: the filter let it through");
    });
}

#[test]
fn device_io_thread_may_not_open_any_socket() {
    let out = run_child("child_device_io_socket", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("on a device I/O thread"), "{stderr}");
}

#[test]
#[ignore = "runs in a child process, from vcpu_thread_may_only_run"]
fn child_vcpu_kvm_ioctls() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::Vcpu, || {
        // SAFETY: an ioctl on no fd: the kernel answers EBADF, once the filter lets it by.
        let r = unsafe { libc::ioctl(-1, KVM_RUN as _, 0) };
        assert_eq!(r, -1);
        eprintln!("KVM_RUN allowed");
        // KVM_SET_USER_MEMORY_REGION: _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region).
        // SAFETY: as above.
        unsafe { libc::ioctl(-1, 0x4020_ae46 as _, 0) };
        eprintln!("KVM_SET_USER_MEMORY_REGION allowed: the filter let it through");
    });
}

#[test]
fn vcpu_thread_may_only_run() {
    let out = run_child("child_vcpu_kvm_ioctls", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_ioctl);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KVM_RUN allowed"), "{stderr}");
}

#[test]
#[ignore = "runs in a child process, from vcpu_thread_may_not_exec"]
fn child_vcpu_execve() {
    if !is_child() {
        return;
    }
    let path = c"/bin/true";
    on_filtered_thread(ThreadKind::Vcpu, move || {
        let argv = [path.as_ptr(), std::ptr::null()];
        // SAFETY: NUL-terminated path and argv; on success this process would be replaced.
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    });
}

#[test]
fn vcpu_thread_may_not_exec() {
    let out = run_child("child_vcpu_execve", &[]);
    assert_killed_by_sigsys(&out, libc::SYS_execve);
}

#[test]
#[ignore = "runs in a child process, from allowed_syscalls_work_after_install"]
fn child_allowed_syscalls() {
    if !is_child() {
        return;
    }
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::DeviceIo,
        ThreadKind::Watchdog,
        ThreadKind::VhostUser,
    ] {
        let (read_end, write_end) = pipe();
        on_filtered_thread(kind, move || {
            let msg = b"still alive";
            // SAFETY: writes from / reads into live buffers of the given lengths.
            let n = unsafe { libc::write(write_end.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
            assert_eq!(n, msg.len() as isize);
            let mut buf = [0u8; 32];
            // SAFETY: as above.
            let n = unsafe { libc::read(read_end.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(&buf[..n as usize], msg);
            // Allocation, a lock and a clock read, as any Rust code does.
            let v: Vec<u64> = (0..100_000).collect();
            let m = std::sync::Mutex::new(v.len());
            assert_eq!(*m.lock().unwrap(), 100_000);
            let _ = std::time::Instant::now();
            // Dropping the pipe closes it (close is allowed); then the thread exits.
        });
    }
}

#[test]
fn allowed_syscalls_work_after_install() {
    let out = run_child("child_allowed_syscalls", &[]);
    assert_child_passed(&out, "child_allowed_syscalls");
}

#[test]
#[ignore = "runs in a child process, from log_mode_only_logs"]
fn child_log_mode() {
    if !is_child() {
        return;
    }
    on_filtered_thread(ThreadKind::Vcpu, || {
        let fd = raw_socket(libc::AF_INET);
        assert!(fd >= 0, "socket failed in log mode");
        // SAFETY: `fd` is ours.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    });
}

#[test]
fn log_mode_only_logs() {
    let out = run_child("child_log_mode", &[(MODE_ENV, "log")]);
    assert_child_passed(&out, "child_log_mode");
}

#[test]
#[ignore = "runs in a child process, from bad_mode_is_an_error"]
fn child_bad_mode() {
    if !is_child() {
        return;
    }
    let err = install(ThreadKind::Vcpu).unwrap_err();
    assert!(
        matches!(err, SeccompError::BadMode(ref v) if v == "lgo"),
        "{err}"
    );
}

#[test]
fn bad_mode_is_an_error() {
    // Through a child: changing this process's environment would race other tests.
    let out = run_child("child_bad_mode", &[(MODE_ENV, "lgo")]);
    assert_child_passed(&out, "child_bad_mode");
}

#[test]
fn filters_build_in_both_modes() {
    for kind in [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::DeviceIo,
        ThreadKind::Watchdog,
        ThreadKind::VhostUser,
    ] {
        for mode in [Mode::Enforce, Mode::Log] {
            let bpf = filter_with_mode(kind, mode).unwrap();
            assert!(
                !bpf.is_empty() && bpf.len() < 4096,
                "{kind} {mode:?}: {}",
                bpf.len()
            );
        }
    }
    assert_ne!(
        filter_with_mode(ThreadKind::Vcpu, Mode::Enforce).unwrap(),
        filter_with_mode(ThreadKind::Vcpu, Mode::Log).unwrap()
    );
}

#[test]
fn lists_are_what_they_say() {
    let vmm = allowed_syscalls(ThreadKind::Vmm);
    let vcpu = allowed_syscalls(ThreadKind::Vcpu);
    let io = allowed_syscalls(ThreadKind::DeviceIo);
    let watchdog = allowed_syscalls(ThreadKind::Watchdog);
    let vhost_user = allowed_syscalls(ThreadKind::VhostUser);
    for name in [
        "epoll_pwait",
        "accept4",
        "recvmsg",
        "ioctl",
        "socket",
        "tgkill",
    ] {
        assert!(vmm.contains(&name), "vmm lacks {name}");
    }
    for name in ["ioctl", "write", "futex", "exit", "rt_sigreturn"] {
        assert!(vcpu.contains(&name), "vcpu lacks {name}");
    }
    // vhost-user messages go out on the worker only, never on a vCPU.
    for name in ["sendmsg", "recvmsg"] {
        assert!(
            vhost_user.contains(&name),
            "the vhost-user worker lacks {name}"
        );
        assert!(!vcpu.contains(&name), "vcpu allows {name}");
    }
    for name in [
        "ioctl",
        "socket",
        "connect",
        "accept4",
        "epoll_ctl",
        "unlink",
    ] {
        assert!(
            !vhost_user.contains(&name),
            "the vhost-user worker allows {name}"
        );
    }
    // The calls an escaped guest would want most.
    for name in [
        "execve",
        "execveat",
        "open",
        "openat",
        "clone",
        "clone3",
        "fork",
        "ptrace",
        "mount",
        "setuid",
        "kill",
        "prctl",
        "seccomp",
        "rt_sigaction",
        "bind",
        "listen",
    ] {
        assert!(
            ![&vmm, &vcpu, &io, &watchdog, &vhost_user]
                .iter()
                .any(|list| list.contains(&name)),
            "{name} allowed"
        );
    }
    // Disk I/O happens on the disks' own threads only, and they do nothing else.
    for name in ["pread64", "pwrite64", "fdatasync", "epoll_pwait"] {
        assert!(io.contains(&name), "device I/O lacks {name}");
    }
    for name in ["pwrite64", "fdatasync", "lseek"] {
        assert!(!vmm.contains(&name), "vmm allows {name}");
    }
    for name in [
        "ioctl", "socket", "connect", "accept4", "sendmsg", "recvmsg", "unlink",
    ] {
        assert!(!io.contains(&name), "device I/O allows {name}");
        assert!(!watchdog.contains(&name), "the watchdog allows {name}");
    }
    assert!(watchdog.contains(&"shutdown"));
    for name in ["epoll_ctl", "pwrite64", "lseek"] {
        assert!(!watchdog.contains(&name), "the watchdog allows {name}");
    }
    // (epoll_ctl is allowed: a driver reset resets the device on the vCPU thread.)
    for name in ["socket", "connect", "accept4", "pwrite64"] {
        assert!(!vcpu.contains(&name), "vcpu allows {name}");
    }
}

#[test]
fn stack_message_formats_numbers() {
    let mut m = StackMsg::new();
    m.push_int(41);
    m.push(b" ");
    m.push_int(0);
    m.push(b" ");
    m.push_int(-7);
    assert_eq!(&m.buf[..m.len], b"41 0 -7");
    m.push(&[b'x'; 400]);
    assert_eq!(m.len, 256, "overflow is truncated, not a panic");
}
