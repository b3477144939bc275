//! The optional jail (`husk-vmm --jail DIR --uid U --gid G`, as root): the VMM ends up in its
//! own mount namespace with DIR as `/`, as an unprivileged user that cannot become root again.
//!
//! The caller opens everything the VMM needs *before* [`enter`] (kernel, initramfs, disks,
//! sockets, `/dev/kvm`, `/dev/net/tun`, `/dev/urandom`): inside, the VMM reaches the host only
//! through those fds, so DIR can stay empty. Keep no directory fd open across `enter`: an
//! `openat` relative to it would reach outside the jail.
//!
//! Steps (like Firecracker's jailer, without the cgroups, devices and exec):
//! 1. checks: running as root, target uid/gid not 0, a single thread (the new root and mount
//!    namespace apply to the calling thread only, so other threads would stay outside);
//! 2. create DIR if missing (0755, root-owned, so the jailed user cannot write to it);
//! 3. `unshare(CLONE_NEWNS)`, and make every mount private, so nothing we do propagates back
//!    to the host and nothing the host mounts later shows up inside;
//! 4. bind-mount DIR onto itself (`pivot_root` needs a mount point), `chdir` into it, and
//!    `pivot_root(".", ".")` then detach the old root stacked on top: the host's tree is then
//!    gone from this namespace, not just out of reach. If `pivot_root` is refused with
//!    `EINVAL` (the host's root is the initial ramfs, as on some minimal systems), we fall back
//!    to `chroot`, with a warning: the old tree stays mounted, but an unprivileged process
//!    without `CAP_SYS_CHROOT` cannot climb out of a chroot;
//! 5. `PR_SET_NO_NEW_PRIVS` (no set-uid or file-capability gains; seccomp needs it too);
//! 6. `setgroups([])`, `setresgid(G)`, `setresuid(U)`: all capabilities go with uid 0;
//! 7. verify: ids are what we asked, no capabilities are left, `setuid(0)` and `setgid(0)`
//!    fail. Any surprise is an error: the VMM must not run half-jailed.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root, but the VMM runs as uid {0}: start it as root, or without --jail")]
    NotRoot(u32),
    #[error(
        "refusing to jail as uid {uid} gid {gid}: pass an unprivileged --uid and --gid (not 0)"
    )]
    RootTarget { uid: u32, gid: u32 },
    #[error("the jail must be entered while the VMM has one thread, but it has {0}: enter it before starting threads")]
    MultiThreaded(usize),
    #[error("cannot create the jail directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("jail directory {0} contains a NUL byte")]
    BadPath(PathBuf),
    #[error("jail: {step} failed: {source}")]
    Syscall {
        step: &'static str,
        source: io::Error,
    },
    #[error("jail: privileges were not dropped: {0}; refusing to run")]
    StillPrivileged(String),
}

/// Confines the calling process to `dir` as `uid`/`gid` (see the module docs for the steps).
pub fn enter(dir: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: geteuid cannot fail and has no side effects.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if uid == 0 || gid == 0 {
        return Err(JailError::RootTarget { uid, gid });
    }
    match thread_count() {
        Some(1) => {}
        Some(n) => return Err(JailError::MultiThreaded(n)),
        None => warn!(
            "jail: /proc/self/task is unreadable; cannot check that the VMM is single-threaded"
        ),
    }

    // canonicalize: bind-mounting a path through a symlink would surprise whoever reads mounts.
    let dir = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .and_then(|()| dir.canonicalize())
        .map_err(|source| JailError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    let c_dir =
        CString::new(dir.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(dir.clone()))?;

    // SAFETY (this block and the ones below): plain syscalls whose pointer arguments are
    // NUL-terminated strings alive for the call, or null where the kernel allows it; every
    // result is checked.
    check("unshare(CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_NEWNS)
    })?;
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
    info!(
        "jail: entered {} ({how}) as uid {uid} gid {gid}",
        dir.display()
    );
    Ok(())
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
mod tests {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::{Command, Output};

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    const CHILD_ENV: &str = "HUSK_JAIL_TEST_DIR";
    const NOBODY: u32 = 65534;

    fn is_root() -> bool {
        // SAFETY: no side effects.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs the ignored test `name` alone in a fresh copy of this test binary, with the jail
    /// directory in its environment (the child tests do nothing without it).
    fn run_child(name: &str, dir: &Path) -> Output {
        let full = format!("jail::tests::{name}");
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                &full,
                "--exact",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, dir)
            .output()
            .unwrap();
        eprintln!(
            "child {name}: {:?}\n--- stdout\n{}--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed: {:?}", out.status);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("{full} ... ok")), "{stdout}");
        out
    }

    /// Runs `f` in a forked process and returns its verdict. The test harness runs each test
    /// on its own thread, and `enter` rightly refuses a multi-threaded process; the fork has
    /// only the forking thread. Called only in a re-executed child running this one test, so no
    /// other thread holds a lock the fork could inherit.
    fn in_fork(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fork in a process whose other thread (the harness) is blocked waiting for us.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            drop(read_end);
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err("panicked".into()));
            let msg = match &verdict {
                Ok(()) => String::new(),
                Err(e) => e.clone(),
            };
            // SAFETY: write from a live buffer, then leave without running the harness's
            // exit path (atexit handlers, buffered output) a second time.
            unsafe {
                libc::write(write_end.as_raw_fd(), msg.as_ptr().cast(), msg.len());
                libc::_exit(i32::from(verdict.is_err()));
            }
        }
        drop(write_end);
        let mut msg = String::new();
        std::fs::File::from(read_end)
            .read_to_string(&mut msg)
            .unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(())
        } else {
            Err(format!("jailed child failed (status {status:#x}): {msg}"))
        }
    }

    fn entries(dir: &str) -> Result<Vec<String>, String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| format!("read_dir({dir}): {e}"))?
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// What must hold inside the jail.
    fn confined(expected_root: &[&str]) -> Result<(), String> {
        // SAFETY: id getters have no side effects.
        let ids = unsafe {
            (
                libc::getuid(),
                libc::geteuid(),
                libc::getgid(),
                libc::getegid(),
            )
        };
        if ids != (NOBODY, NOBODY, NOBODY, NOBODY) {
            return Err(format!("ids are {ids:?}"));
        }
        let root = entries("/")?;
        if root != expected_root {
            return Err(format!("/ holds {root:?}, expected {expected_root:?}"));
        }
        // ".." of the root is the root: no way up.
        if entries("/..")? != root {
            return Err("/.. differs from /".into());
        }
        // SAFETY: must fail; no side effects if it does.
        if unsafe { libc::setuid(0) } == 0 {
            return Err("setuid(0) succeeded".into());
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
            return Err(format!("setuid(0): {}", io::Error::last_os_error()));
        }
        // SAFETY: reads a flag.
        if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
            return Err("no_new_privs is not set".into());
        }
        match std::fs::write("/planted", "x") {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
            other => return Err(format!("writing to the jail root: {other:?}")),
        }
        if std::env::current_dir().map_err(|e| e.to_string())? != Path::new("/") {
            return Err("cwd is not /".into());
        }
        Ok(())
    }

    #[test]
    #[ignore = "runs in a child process, from jailed_process_is_confined"]
    fn child_enter_jail() {
        let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
            return;
        };
        in_fork(|| {
            enter(&dir.join("existing"), NOBODY, NOBODY).map_err(|e| e.to_string())?;
            confined(&["marker", "sub"])
        })
        .unwrap();
        in_fork(|| {
            enter(&dir.join("missing/jail"), NOBODY, NOBODY).map_err(|e| e.to_string())?;
            confined(&[])
        })
        .unwrap();
    }

    #[test]
    fn jailed_process_is_confined() {
        // Never a silent pass: a jail is only entered as root.
        assert!(
            is_root(),
            "entering a jail needs root: run as root, or deselect with --skip jailed_process_is_confined"
        );
        let tmp = TempDir::new_with_prefix("/tmp/husk-jail-").unwrap();
        let existing = tmp.as_path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        std::fs::write(existing.join("marker"), "x").unwrap();
        std::fs::create_dir(existing.join("sub")).unwrap();

        run_child("child_enter_jail", tmp.as_path());

        // The missing directory was created, and the jails' mounts stayed in their namespaces.
        assert!(tmp.as_path().join("missing/jail").is_dir());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(tmp.as_path().to_str().unwrap()),
            "{mounts}"
        );
    }

    #[test]
    fn refuses_root_target_and_threads() {
        let tmp = TempDir::new_with_prefix("/tmp/husk-jail-").unwrap();
        let dir = tmp.as_path().join("never");
        if is_root() {
            assert!(matches!(
                enter(&dir, 0, NOBODY),
                Err(JailError::RootTarget { .. })
            ));
            assert!(matches!(
                enter(&dir, NOBODY, 0),
                Err(JailError::RootTarget { .. })
            ));
            // The harness runs tests on their own threads, so this process has several.
            let err = enter(&dir, NOBODY, NOBODY).unwrap_err();
            assert!(matches!(err, JailError::MultiThreaded(n) if n > 1), "{err}");
        } else {
            assert!(matches!(
                enter(&dir, NOBODY, NOBODY),
                Err(JailError::NotRoot(_))
            ));
        }
        // Refused before touching anything.
        assert!(!dir.exists());
    }
}
