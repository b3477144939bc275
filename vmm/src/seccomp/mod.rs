//! Seccomp filters: each VMM thread allows only the system calls its kind of work needs.
//!
//! A guest that breaks out of KVM into the VMM lands in a process that can do little: no
//! `open`, no `execve`, no new sockets but Unix ones, no thread creation, no `ptrace`, no
//! `mount`; only the calls listed below, some with their arguments checked too.
//!
//! # Thread kinds and when to install
//!
//! * [`ThreadKind::Vcpu`]: each vCPU thread, first thing (before its first `KVM_RUN`); the
//!   builder's `on_start` hook is the place.
//! * [`ThreadKind::Vmm`]: the main thread, which runs the event loop and serves the API (so
//!   there is no separate API kind). Install it right after `start` has spawned the vCPU
//!   threads: before that the VMM is still opening files and creating threads, and a filter is
//!   inherited by threads created after it, so a vCPU thread spawned later would have to pass
//!   both filters (and the `Vmm` one does not allow `seccomp` or `prctl`).
//!
//! * [`ThreadKind::DeviceIo`]: a device's own I/O thread (one per disk), first thing, like a
//!   vCPU thread: its event loop and the disk's reads, writes and flushes, nothing else. The
//!   main thread then no longer needs any file I/O call.
//!
//! * [`ThreadKind::Watchdog`]: virtio-fs's watchdog, which only waits and may shut the
//!   vhost-user socket down, and [`ThreadKind::VhostUser`], virtio-fs's worker, which alone
//!   talks vhost-user once the VM runs. Both start with the device (before any filter) and
//!   install their filter when the VM starts (`devices::helper_thread`, from the controller).
//!
//! [`install`] filters the calling thread only (no TSYNC) and sets `PR_SET_NO_NEW_PRIVS`.
//!
//! # What a forbidden call does
//!
//! `SeccompAction::Trap`: the kernel skips the call and raises SIGSYS on the thread; our SIGSYS
//! handler (installed by [`install`]) writes `husk-vmm: seccomp: forbidden syscall N ...` to
//! stderr and re-raises SIGSYS with its default action, so the process dies *by SIGSYS*, as
//! with `KillProcess`, but with the syscall number in the VMM's log (Firecracker's approach;
//! `KillProcess` would leave it only in the kernel's audit log, when that is enabled). The
//! default SIGSYS action dumps core: a core dump would include guest memory, so the VMM should
//! mark guest memory `MADV_DONTDUMP` or the shim should set `RLIMIT_CORE` to 0.
//!
//! # Finding missing syscalls: `HUSK_SECCOMP=log`
//!
//! With `HUSK_SECCOMP=log` in the VMM's environment a forbidden call is allowed and logged by
//! the kernel instead (`SeccompAction::Log`): run the workload, then
//! `dmesg | grep 'type=1326'` (or `journalctl -k`) lists each call as `syscall=N` with the
//! thread's name in `comm=` (`ausyscall N` or `/usr/include/asm/unistd_64.h` names it). Add
//! it to the right group below with a comment saying what needs it. Unset (or `enforce`) means
//! enforce; any other value is an error, so a typo cannot silently weaken or strengthen it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Once;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use tracing::{info, warn};

/// Environment variable that selects [`Mode`].
pub const MODE_ENV: &str = "HUSK_SECCOMP";

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("{MODE_ENV}={0:?} is not understood: use \"log\" to log forbidden syscalls instead of stopping the VMM, or leave it unset")]
    BadMode(String),
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        source: BackendError,
    },
    #[error("{name} is listed twice in the {kind} seccomp allow-list; merge the two entries")]
    Duplicate {
        kind: ThreadKind,
        name: &'static str,
    },
    #[error("cannot install the SIGSYS handler that reports forbidden syscalls: {0}")]
    SignalHandler(std::io::Error),
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// What a thread does, and so which filter it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: event loop, devices' I/O, the API socket.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the exits it handles (serial, MMIO, device activation).
    Vcpu,
    /// A device's I/O thread: an event loop serving a disk (virtio-blk).
    DeviceIo,
    /// virtio-fs's watchdog: waits, and may shut a socket down.
    Watchdog,
    /// virtio-fs's vhost-user worker: messages to and from virtiofsd.
    VhostUser,
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceIo => "device I/O",
            ThreadKind::Watchdog => "watchdog",
            ThreadKind::VhostUser => "vhost-user",
        }
    }
}

/// What a forbidden syscall does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SIGSYS, reported on stderr, and the process dies (the default).
    Enforce,
    /// Allowed, and logged by the kernel (`HUSK_SECCOMP=log`): for finding missing syscalls.
    Log,
}

impl Mode {
    /// The mode `HUSK_SECCOMP` asks for.
    pub fn from_env() -> Result<Mode, SeccompError> {
        match std::env::var_os(MODE_ENV) {
            None => Ok(Mode::Enforce),
            Some(v) => match v.to_str() {
                Some("" | "enforce") => Ok(Mode::Enforce),
                Some("log") => Ok(Mode::Log),
                _ => Err(SeccompError::BadMode(v.to_string_lossy().into_owned())),
            },
        }
    }

    fn mismatch_action(self) -> SeccompAction {
        match self {
            Mode::Enforce => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        }
    }
}

/// Installs `kind`'s filter on the calling thread, in the mode `HUSK_SECCOMP` selects.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let mode = Mode::from_env()?;
    let program = filter_with_mode(kind, mode)?;
    install_sigsys_handler()?;
    let _ = THREAD_KIND.try_with(|k| k.set(Some(kind)));
    match mode {
        Mode::Enforce => info!("seccomp: {kind} filter installed on this thread"),
        Mode::Log => warn!(
            "seccomp: {kind} filter installed in log mode ({MODE_ENV}=log): forbidden syscalls are only logged by the kernel"
        ),
    }
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })
}

/// `kind`'s filter as BPF, in the mode `HUSK_SECCOMP` selects.
pub fn filter_for(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    filter_with_mode(kind, Mode::from_env()?)
}

/// `kind`'s filter as BPF, in `mode`.
pub fn filter_with_mode(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules = BTreeMap::new();
    for allowed in allow_list(kind).map_err(build)? {
        if rules.insert(allowed.nr, allowed.rules).is_some() {
            return Err(SeccompError::Duplicate {
                kind,
                name: allowed.name,
            });
        }
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter = SeccompFilter::new(rules, mode.mismatch_action(), SeccompAction::Allow, arch)
        .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The names of the syscalls `kind` may make (some only with certain arguments).
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<&'static str> {
    allow_list(kind)
        .map(|list| list.into_iter().map(|a| a.name).collect())
        .unwrap_or_default()
}

/// One allow-list entry: a syscall and, if not empty, the argument rules of which one must
/// match (each rule is a conjunction of conditions).
struct Allowed {
    nr: i64,
    name: &'static str,
    rules: Vec<SeccompRule>,
}

/// `allow!(SYS_x)` allows any arguments; `allow!(SYS_x, rules)` only matching ones.
macro_rules! allow {
    ($sys:ident) => {
        Allowed {
            nr: libc::$sys,
            name: &stringify!($sys)[4..],
            rules: Vec::new(),
        }
    };
    ($sys:ident, $rules:expr) => {
        Allowed {
            nr: libc::$sys,
            name: &stringify!($sys)[4..],
            rules: $rules,
        }
    };
}

type Rules = Result<Vec<SeccompRule>, BackendError>;

/// Argument `arg` (32-bit) is one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Rules {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect()
}

/// Argument `arg` (32-bit) has `value` in the bits of `mask`.
fn arg_masked(arg: u8, mask: u64, value: u64) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )?])
}

/// `socket(AF_UNIX, SOCK_STREAM | flags, _)`: the type's low bits are the kind, the rest
/// are `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
fn unix_stream_socket() -> Rules {
    Ok(vec![SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?,
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xf),
            libc::SOCK_STREAM as u64,
        )?,
    ])?])
}

/// An ioctl request as a filter value. `libc::Ioctl` is `c_ulong` with glibc but `c_int` with
/// musl; the kernel (and the filter's 32-bit compare) only looks at the low 32 bits.
#[allow(clippy::unnecessary_cast)]
fn ioctl_req(req: libc::Ioctl) -> u64 {
    req as u64
}

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`, linux/kvm.h): the only KVM ioctl once a VM runs. Every
/// other one (vCPU registers, memory slots, irqfds, ioeventfds) is made while the VM is built,
/// before any filter, so a compromised VMM cannot remap guest memory or create VMs.
pub const KVM_RUN: u64 = 0xae80;

/// fcntl commands: F_GETFD everywhere (see its use below); dup with close-on-exec
/// everywhere, because a device is activated on the vCPU thread that wrote DRIVER_OK and
/// the transport hands it clones of the queue eventfds; on the main thread also O_NONBLOCK
/// on taps. Nothing else: no locks, no F_SETOWN, no leases.
fn fcntl_cmds(kind: ThreadKind) -> Rules {
    match kind {
        ThreadKind::Vmm => arg_in(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        ),
        ThreadKind::Vcpu => arg_in(1, &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64]),
        ThreadKind::DeviceIo | ThreadKind::Watchdog | ThreadKind::VhostUser => {
            arg_in(1, &[libc::F_GETFD as u64])
        }
    }
}

/// The allow-lists. Groups say who needs them; keep them that way when adding a call.
fn allow_list(kind: ThreadKind) -> Result<Vec<Allowed>, BackendError> {
    let pid = std::process::id() as u64;
    let no_exec = || arg_masked(2, libc::PROT_EXEC as u64, 0).map(|r| vec![r]);

    // Every thread.
    let mut list = vec![
        // Memory: the allocator (glibc malloc grows, trims and madvises its heaps; arenas of
        // other threads grow with mprotect), thread stacks. Never executable: nothing maps
        // code once the VM runs, so a compromised VMM cannot map shellcode either.
        allow!(SYS_brk),
        allow!(SYS_mmap, no_exec()?),
        allow!(SYS_mprotect, no_exec()?),
        allow!(SYS_munmap),
        allow!(SYS_mremap),
        allow!(SYS_madvise),
        // Locks, condvars, channels, thread join; sleeping and time (clock_gettime is usually
        // the vDSO, but falls back to the syscall on some clock sources).
        allow!(SYS_futex),
        allow!(SYS_sched_yield),
        allow!(SYS_clock_gettime),
        allow!(SYS_clock_nanosleep),
        allow!(SYS_nanosleep),
        // Signals: returning from the vCPU kick handler, a syscall restarted after it, the
        // masking glibc does around pthread_kill and abort, and Rust's per-thread alternate
        // signal stack (torn down when a thread exits).
        allow!(SYS_rt_sigreturn),
        allow!(SYS_restart_syscall),
        allow!(SYS_rt_sigprocmask),
        allow!(SYS_sigaltstack),
        // Signalling our own threads only: the vCPU kick (pthread_kill), abort(), and the
        // SIGSYS handler's re-raise. getpid/gettid are what glibc asks before tgkill.
        allow!(SYS_tgkill, arg_in(0, &[pid])?),
        allow!(SYS_getpid),
        allow!(SYS_gettid),
        // Ending a thread or the process.
        allow!(SYS_exit),
        allow!(SYS_exit_group),
        // Plain fd I/O: eventfds (irqfds, queue and exit events), the serial output, logs on
        // stderr, taps and disks (readv/writev), and closing what we are done with.
        allow!(SYS_read),
        allow!(SYS_write),
        allow!(SYS_readv),
        allow!(SYS_writev),
        allow!(SYS_close),
        // Debug builds of std check that an fd is open (fcntl F_GETFD) before closing it.
        allow!(SYS_fcntl, fcntl_cmds(kind)?),
        // New eventfds when a device is activated (activation runs on a vCPU thread).
        allow!(SYS_eventfd2),
        // A HashMap's random keys on a thread that never made one; no fd, no side effects.
        allow!(SYS_getrandom),
    ];

    match kind {
        ThreadKind::Vmm => list.extend([
            // The event loop (epoll_pwait is what some libcs call epoll_wait).
            allow!(SYS_epoll_ctl),
            #[cfg(target_arch = "x86_64")]
            allow!(SYS_epoll_wait),
            allow!(SYS_epoll_pwait),
            // Sockets: API clients and vsock host clients (accept4, recvmsg for SCM_RIGHTS),
            // vhost-user to virtiofsd (sendmsg/recvmsg), std's socket reads and vsock's send
            // (recvfrom/sendto), closing vsock streams (shutdown).
            allow!(SYS_accept4),
            // Reaping the socket-cleanup helper at exit (crate::cleanup), which removes the
            // socket files: the VMM itself has no unlink, so it cannot delete host files.
            allow!(SYS_wait4),
            allow!(SYS_recvmsg),
            allow!(SYS_sendmsg),
            allow!(SYS_recvfrom),
            allow!(SYS_sendto),
            allow!(SYS_shutdown),
            // Guest-initiated vsock connections go to `<uds_path>_<port>`: a new Unix stream
            // socket and a connect (inside the jail's directory when jailed). Unix streams
            // only: a compromised VMM cannot reach the network or the host's datagram sockets.
            allow!(SYS_socket, unix_stream_socket()?),
            allow!(SYS_connect),
            // ioctl: tap set-up that happens again when a device is reset, and std's
            // set_nonblocking (FIONBIO). No KVM ioctl: the VM is built before this filter.
            allow!(
                SYS_ioctl,
                arg_in(
                    1,
                    &[
                        ioctl_req(libc::FIONBIO),
                        ioctl_req(libc::TUNSETOFFLOAD),
                        ioctl_req(libc::TUNSETVNETHDRSZ),
                        ioctl_req(libc::TUNGETIFF),
                    ],
                )?
            ),
            // Timers for the event loop (rate limiting, pause timeouts).
            allow!(SYS_timerfd_create),
            allow!(SYS_timerfd_settime),
            allow!(SYS_timerfd_gettime),
        ]),
        ThreadKind::Vcpu => list.extend([
            // KVM_RUN and nothing else: registers were set while the VM was built, and
            // device activation only hands over eventfds KVM already knows.
            allow!(SYS_ioctl, arg_in(1, &[KVM_RUN])?),
            // A driver reset (Status = 0, e.g. at guest reboot) resets the device on the
            // vCPU thread that wrote it: vsock drops its streams from its epoll set and
            // shuts them down.
            allow!(SYS_epoll_ctl),
            allow!(SYS_shutdown),
            allow!(SYS_timerfd_settime),
            // The console log file is capped: when full, its newest half is read back and
            // the file truncated (devices::legacy::capped_log). Serial output is a PIO exit.
            allow!(SYS_pread64),
            allow!(SYS_ftruncate),
        ]),
        ThreadKind::DeviceIo => list.extend([
            // Its event loop: the queue's and the activation's eventfds.
            allow!(SYS_epoll_ctl),
            #[cfg(target_arch = "x86_64")]
            allow!(SYS_epoll_wait),
            allow!(SYS_epoll_pwait),
            // Disk I/O: virtio-blk seeks then reads/writes, flushes with fdatasync.
            allow!(SYS_lseek),
            allow!(SYS_pread64),
            allow!(SYS_pwrite64),
            allow!(SYS_preadv),
            allow!(SYS_pwritev),
            allow!(SYS_fsync),
            allow!(SYS_fdatasync),
            // The disk's rate limiter re-arms its timer.
            allow!(SYS_timerfd_settime),
        ]),
        // Waiting is futexes and clocks (common); firing is a shutdown of the socket.
        ThreadKind::Watchdog => list.push(allow!(SYS_shutdown)),
        // vhost-user requests with fds out (SCM_RIGHTS), replies in; nothing else: the
        // eventfds it sends were made (and dup'd) on the vCPU thread.
        ThreadKind::VhostUser => list.extend([allow!(SYS_sendmsg), allow!(SYS_recvmsg)]),
    }
    Ok(list)
}

thread_local! {
    /// The calling thread's filter, for the SIGSYS report. Const-initialised and without a
    /// destructor, so reading it from a signal handler allocates and locks nothing.
    static THREAD_KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Installs [`sigsys_handler`] once per process (signal dispositions are per process). Runs
/// before the calling thread's filter is applied, and later threads skip it, so the filters
/// need not allow `rt_sigaction`.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we then fill the fields we use. The handler is
        // an `extern "C"` fn with the SA_SIGINFO signature and only async-signal-safe calls.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = sigsys_handler as *const () as libc::sighandler_t;
            // RESETHAND: the handler runs once, then SIGSYS has its default action again (the
            // re-raise kills); NODEFER: the re-raise is delivered at once, inside the handler.
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
                result = Err(SeccompError::SignalHandler(std::io::Error::last_os_error()));
            }
        }
    });
    result
}

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// Reports the forbidden syscall on stderr, then dies by SIGSYS. Only async-signal-safe work:
/// formatting into a stack buffer, write(2), tgkill(2) (all allowed by every filter).
extern "C" fn sigsys_handler(
    signum: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    let mut msg = StackMsg::new();
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler. For SIGSYS with
    // si_code SYS_SECCOMP, the union after the three leading ints (at offset 16 on 64-bit
    // targets) holds `void *si_call_addr; int si_syscall; ...`, so si_syscall is at 24.
    let syscall = unsafe {
        (signum == libc::SIGSYS && !info.is_null() && (*info).si_code == SYS_SECCOMP)
            .then(|| info.cast::<u8>().add(24).cast::<libc::c_int>().read())
    };
    match syscall {
        Some(nr) => {
            msg.push(b"husk-vmm: seccomp: forbidden syscall ");
            msg.push_int(i64::from(nr));
            msg.push(b" (");
            msg.push(std::env::consts::ARCH.as_bytes());
            msg.push(b") on a ");
            let kind = THREAD_KIND.try_with(|k| k.get()).ok().flatten();
            msg.push(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
            msg.push(b" thread; stopping the VMM. Run with HUSK_SECCOMP=log to list every missing syscall, then allow it in vmm/src/seccomp.rs\n");
        }
        None => msg.push(b"husk-vmm: SIGSYS received; stopping\n"),
    }
    // SAFETY: write(2) from a live buffer, then tgkill(2) on ourselves; both async-signal-safe.
    // SA_RESETHAND restored the default action, so this SIGSYS terminates the process (with a
    // core dump, where enabled) and the parent sees "killed by SIGSYS". A jailed VMM is PID 1
    // of its namespace, which ignores signals it sends itself: it exits with the status its
    // helper turns back into SIGSYS (crate::cleanup::SIGSYS_EXIT).
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        if libc::syscall(libc::SYS_getpid) == 1 {
            libc::syscall(libc::SYS_exit_group, crate::cleanup::SIGSYS_EXIT);
        }
        libc::syscall(
            libc::SYS_tgkill,
            libc::syscall(libc::SYS_getpid),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// A fixed buffer to format into without allocating (allocation is not signal-safe).
struct StackMsg {
    buf: [u8; 256],
    len: usize,
}

impl StackMsg {
    fn new() -> StackMsg {
        StackMsg {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_int(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if v < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests;
