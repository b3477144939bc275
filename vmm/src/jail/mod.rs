//! The jail (`husk-vmm --jail DIR --uid U --gid G`, as root), Firecracker's jailer done by the
//! VMM itself: the VMM ends up in its own mount, IPC and UTS namespaces (and, from process
//! start, its own PID namespace: `crate::cleanup::spawn_in_new_pid_namespace`) with DIR as
//! `/`, under resource limits, as an unprivileged user that cannot become root again.
//!
//! The caller opens everything the VMM needs *before* [`enter`] (kernel, initramfs, disks,
//! sockets, `/dev/kvm`, `/dev/net/tun`, `/dev/urandom`, virtiofsd's vhost-user socket): inside,
//! the VMM reaches the host only through those fds, so DIR holds nothing but the sockets the
//! VMM listens on. Keep no directory fd open across `enter`: an `openat` relative to it would
//! reach outside the jail.
//!
//! Steps:
//! 1. checks: running as root, target uid/gid not 0, no thread but this one and the helpers
//!    the caller names (a new root and mount namespace apply to the calling thread only, so
//!    each helper is moved in explicitly, step 5);
//! 2. create DIR if missing (0755, root-owned, so the jailed user cannot write to it);
//! 3. `unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)`, a neutral host name, and every
//!    mount made private, so nothing we do propagates back to the host and nothing the host
//!    mounts later shows up inside;
//! 4. bind-mount DIR onto itself (`pivot_root` needs a mount point), `chdir` into it, and
//!    `pivot_root(".", ".")` then detach the old root stacked on top: the host's tree is then
//!    gone from this namespace, not just out of reach. If `pivot_root` is refused with
//!    `EINVAL` (the host's root is the initial ramfs, as on some minimal systems), we fall back
//!    to `chroot`, with a warning: the old tree stays mounted, but an unprivileged process
//!    without `CAP_SYS_CHROOT` cannot climb out of a chroot;
//! 5. each helper thread joins: `setns` into the new mount namespace, then `chroot` to the
//!    jail's root ([`JoinJail`]);
//! 6. resource limits ([`ResourceLimits`]), and SIGXFSZ ignored so a write past the size
//!    limit fails with `EFBIG` instead of killing the VMM;
//! 7. `PR_SET_NO_NEW_PRIVS` (no set-uid or file-capability gains; seccomp needs it too);
//! 8. `setgroups([])`, `setresgid(G)`, `setresuid(U)` (glibc applies them to every thread):
//!    all capabilities go with uid 0;
//! 9. verify: ids are what we asked, no capabilities are left, `setuid(0)` and `setgid(0)`
//!    fail. Any surprise is an error: the VMM must not run half-jailed.

mod limits;
pub mod selftest;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

pub use limits::ResourceLimits;

/// Where and as whom the VMM is jailed.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub limits: ResourceLimits,
}

/// A thread started before the jail (virtio-fs's watchdog) that must be inside it too. It is
/// asked while it still runs as root: `mount_ns` is the jail's mount namespace and `root` an
/// fd on the jail's `/`, both valid until `join` returns.
pub trait JoinJail {
    fn join(&self, mount_ns: BorrowedFd<'_>, root: BorrowedFd<'_>) -> Result<(), String>;
}

/// Moves the calling thread into the jail `enter` made (see [`JoinJail`]): its own fs
/// context (threads share one), the mount namespace, then a chroot to the jail's root, which
/// also covers the `chroot` fallback where the namespace's root is not the jail.
pub fn join_from_thread(mount_ns: BorrowedFd<'_>, root: BorrowedFd<'_>) -> io::Result<()> {
    let ok = |ret: libc::c_int| {
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls on fds the caller keeps open for the call, and a static path.
    unsafe {
        ok(libc::unshare(libc::CLONE_FS))?;
        ok(libc::setns(mount_ns.as_raw_fd(), libc::CLONE_NEWNS))?;
        ok(libc::fchdir(root.as_raw_fd()))?;
        ok(libc::chroot(c".".as_ptr()))?;
        ok(libc::chdir(c"/".as_ptr()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root, but the VMM runs as uid {0}: start it as root, or without --jail")]
    NotRoot(u32),
    #[error(
        "refusing to jail as uid {uid} gid {gid}: pass an unprivileged --uid and --gid (not 0)"
    )]
    RootTarget { uid: u32, gid: u32 },
    #[error("the jail must be entered while the VMM has only its main thread and {helpers} known helper thread(s), but it has {threads} threads")]
    MultiThreaded { threads: usize, helpers: usize },
    #[error("cannot create the jail directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("jail directory {0} contains a NUL byte")]
    BadPath(PathBuf),
    #[error("jail: {step} failed: {source}")]
    Syscall {
        step: &'static str,
        source: io::Error,
    },
    #[error("jail: a helper thread cannot join the jail: {0}")]
    Helper(String),
    #[error("jail: privileges were not dropped: {0}; refusing to run")]
    StillPrivileged(String),
}

/// Creates the jail directory if missing (0755, so the jailed user cannot write to it) and
/// returns its canonical path: bind-mounting a path through a symlink would surprise whoever
/// reads mounts, and paths inside the jail are computed from it.
pub fn prepare_dir(dir: &Path) -> Result<PathBuf, JailError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .and_then(|()| dir.canonicalize())
        .map_err(|source| JailError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Host name inside the jail's UTS namespace: the host's own name is none of the VMM's business.
const JAIL_HOSTNAME: &[u8] = b"husk-vmm";

/// Confines the calling process to `spec.dir` as `spec.uid`/`spec.gid`, taking `helpers`
/// along (see the module docs for the steps).
pub fn enter(spec: &JailSpec, helpers: &[&dyn JoinJail]) -> Result<(), JailError> {
    let (dir, uid, gid) = (spec.dir.as_path(), spec.uid, spec.gid);
    // SAFETY: geteuid cannot fail and has no side effects.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if uid == 0 || gid == 0 {
        return Err(JailError::RootTarget { uid, gid });
    }
    match thread_count() {
        Some(n) if n == 1 + helpers.len() => {}
        Some(threads) => {
            return Err(JailError::MultiThreaded {
                threads,
                helpers: helpers.len(),
            })
        }
        None => warn!(
            "jail: /proc/self/task is unreadable; cannot check that the VMM has no unknown thread"
        ),
    }

    let dir = prepare_dir(dir)?;
    let c_dir =
        CString::new(dir.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(dir.clone()))?;

    // SAFETY (this block and the ones below): plain syscalls whose pointer arguments are
    // NUL-terminated strings alive for the call, or null where the kernel allows it; every
    // result is checked.
    check(
        "unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)",
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) },
    )?;
    check("sethostname", unsafe {
        libc::sethostname(JAIL_HOSTNAME.as_ptr().cast(), JAIL_HOSTNAME.len())
    })?;
    // Opened now, while /proc is reachable: the helpers join this namespace after the pivot.
    let mount_ns = open_path(c"/proc/thread-self/ns/mnt", "open the new mount namespace")?;
    check("making mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    check("bind-mounting the jail directory onto itself", unsafe {
        libc::mount(
            c_dir.as_ptr(),
            c_dir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })?;
    check("chdir into the jail", unsafe {
        libc::chdir(c_dir.as_ptr())
    })?;

    // SAFETY: as above.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    let how = if pivoted == 0 {
        // The old root now sits on top of the new one at "."; detach it (lazily: the VMM's open
        // fds keep what they point at alive).
        check("detaching the old root", unsafe {
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        })?;
        "pivot_root"
    } else {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Syscall {
                step: "pivot_root",
                source: err,
            });
        }
        warn!("jail: pivot_root refused ({err}), falling back to chroot");
        check("chroot", unsafe { libc::chroot(c".".as_ptr()) })?;
        "chroot"
    };
    check("chdir to the new root", unsafe {
        libc::chdir(c"/".as_ptr())
    })?;
    let root = open_path(c"/", "open the jail's root")?;
    for helper in helpers {
        helper
            .join(mount_ns.as_fd(), root.as_fd())
            .map_err(JailError::Helper)?;
    }
    drop((mount_ns, root));
    spec.limits.apply()?;

    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // The uid goes last: leaving uid 0 takes the capabilities (CAP_SETGID) the other two need.
    check("setgroups([])", unsafe {
        libc::setgroups(0, std::ptr::null())
    })?;
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;

    verify_dropped(uid, gid)?;
    // The credential change cleared the parent-death signal: a jailed VMM whose helper is
    // killed must still die with it (crate::cleanup).
    check("PR_SET_PDEATHSIG", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    info!(
        "jail: entered {} ({how}) as uid {uid} gid {gid}",
        dir.display()
    );
    Ok(())
}

/// A read-only fd on `path` (`setns` refuses `O_PATH` handles on namespaces).
fn open_path(path: &std::ffi::CStr, step: &'static str) -> Result<OwnedFd, JailError> {
    // SAFETY: a NUL-terminated path alive for the call; the result is checked and owned.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(JailError::Syscall {
            step,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(step: &'static str, ret: libc::c_int) -> Result<(), JailError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(JailError::Syscall {
            step,
            source: io::Error::last_os_error(),
        })
    }
}

/// Threads of this process, or `None` without /proc.
fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

/// Checks that nothing of root is left and that it cannot come back.
fn verify_dropped(uid: u32, gid: u32) -> Result<(), JailError> {
    let fail = |what: String| Err(JailError::StillPrivileged(what));
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three ids into the given locals.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (uid, uid, uid) {
        return fail(format!("uids are {r}/{e}/{s}, expected {uid}"));
    }
    // SAFETY: as above.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (gid, gid, gid) {
        return fail(format!("gids are {r}/{e}/{s}, expected {gid}"));
    }
    // SAFETY: a null list with size 0 only asks for the count.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return fail(format!("{groups} supplementary groups are left"));
    }
    let (effective, permitted) = capabilities().map_err(|source| JailError::Syscall {
        step: "capget",
        source,
    })?;
    if effective != 0 || permitted != 0 {
        return fail(format!(
            "capabilities left: effective {effective:#x}, permitted {permitted:#x}"
        ));
    }
    // SAFETY: these are exactly the calls that must fail now; if one succeeds we report it.
    if unsafe { libc::setuid(0) } == 0 {
        return fail("setuid(0) succeeded".into());
    }
    // SAFETY: as above.
    if unsafe { libc::setgid(0) } == 0 {
        return fail("setgid(0) succeeded".into());
    }
    Ok(())
}

/// The calling thread's effective and permitted capability sets (all 64 bits).
fn capabilities() -> io::Result<(u64, u64)> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: version 3 of capget writes two `Data` structs, which `data` holds.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

#[cfg(test)]
mod tests;
