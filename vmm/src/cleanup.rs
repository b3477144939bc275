//! Removes the VMM's socket files even when the VMM is killed with SIGKILL.
//!
//! A helper is forked at process start, before guest memory exists: a fork after guest
//! memory is allocated would make its pages copy-on-write, split its transparent huge pages
//! and keep megabytes of it shared with the helper. The VMM tells the helper which files to
//! remove through a pipe whose write end only the VMM holds; when the VMM dies, however it
//! dies, the read returns EOF and the helper unlinks the files (those that are still the very
//! files the VMM created, by inode) and exits. Between fork and exit the helper only calls
//! async-signal-safe functions on memory it owns, and it closes every other fd it inherited,
//! so it keeps nothing of the VMM's alive.
//!
//! A jailed VMM runs as PID 1 of a PID namespace of its own ([`spawn_in_new_pid_namespace`]):
//! there the roles swap. The process the parent started stays outside as the helper, and its
//! forked child, the first process of the new namespace, goes on as the VMM. When the VMM
//! ends the helper removes the files, then leaves with the VMM's exit status (or dies by its
//! signal), so whoever started `husk-vmm` sees the VMM's end as before; and if the helper is
//! killed, the kernel kills the VMM (`PR_SET_PDEATHSIG`).
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What the helper can hold: records beyond it are dropped (and the VMM is told so).
const HELPER_BUF: usize = 32 * 1024;
/// A record on the pipe: dev (8 bytes LE), ino (8 bytes LE), the path, a NUL.
const RECORD_HEADER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cannot create the cleanup pipe: {0}")]
    Pipe(std::io::Error),
    #[error("cannot fork the cleanup helper: {0}")]
    Fork(std::io::Error),
    #[error("cannot hand {path} to the cleanup helper: {source}")]
    Watch {
        path: String,
        source: std::io::Error,
    },
    #[error("the cleanup helper cannot hold {0}: its {HELPER_BUF}-byte list is full")]
    Full(String),
    #[error("cannot create a PID namespace for the VMM: {0}")]
    PidNamespace(std::io::Error),
}

/// Held by the VMM for its whole life; dropping it (or dying) triggers the cleanup.
pub struct CleanupGuard {
    write_end: OwnedFd,
    /// The helper, when it is our child (not when it is our parent, in a PID namespace).
    pub helper_pid: Option<libc::pid_t>,
    sent: usize,
}

/// Forks the helper. Call it before guest memory is allocated (see the module docs).
pub fn spawn() -> Result<CleanupGuard, CleanupError> {
    let (read_end, write_end) = pipe()?;
    // SAFETY: the child only uses async-signal-safe calls (close_range, read, lstat, unlink,
    // _exit) on its own stack buffer; it never returns into Rust code of the parent.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(CleanupError::Fork(std::io::Error::last_os_error())),
        // SAFETY: see above; `helper_main` never returns.
        0 => unsafe { helper_main(read_end.as_raw_fd(), None) },
        pid => Ok(CleanupGuard {
            write_end,
            helper_pid: Some(pid),
            sent: 0,
        }),
    }
}

/// The helper's pipe: (read end, write end), both close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), CleanupError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CleanupError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Exit status a VMM that is PID 1 uses for "killed by SIGSYS": the kernel does not deliver
/// a signal a namespace's init sends itself, so the seccomp report exits with it instead and
/// the helper turns it back into death by SIGSYS.
pub const SIGSYS_EXIT: i32 = 128 + libc::SIGSYS;

/// Moves the VMM into a new PID namespace as its PID 1; the calling process stays outside as
/// the cleanup helper (see the module docs). Returns in the VMM only. Call it first thing,
/// while the process has one thread, and before guest memory exists.
pub fn spawn_in_new_pid_namespace() -> Result<CleanupGuard, CleanupError> {
    let (read_end, write_end) = pipe()?;
    // Opened before the fork, on ourselves: the child's way to see whether we still live once
    // its death signal is armed (a parent that died before that would leave it running).
    // SAFETY: pidfd_open on our own pid; the result is checked and owned.
    let parent = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if parent < 0 {
        return Err(CleanupError::Fork(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let parent = unsafe { OwnedFd::from_raw_fd(parent as libc::c_int) };
    // SAFETY: unshare only changes where our future children go.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(CleanupError::PidNamespace(std::io::Error::last_os_error()));
    }
    // SAFETY: the process is single-threaded (the caller's contract); the parent only runs
    // async-signal-safe code from here (`helper_main`) and never returns.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(CleanupError::Fork(std::io::Error::last_os_error())),
        0 => {
            // SAFETY: prctl with an integer argument; poll on a live pollfd.
            let orphaned = unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                let mut pfd = libc::pollfd {
                    fd: parent.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                libc::poll(&mut pfd, 1, 0) != 0
            };
            if orphaned {
                // SAFETY: leaving at once; nothing of ours needs flushing yet.
                unsafe { libc::_exit(1) };
            }
            drop((read_end, parent));
            Ok(CleanupGuard {
                write_end,
                helper_pid: None,
                sent: 0,
            })
        }
        child => {
            drop((write_end, parent));
            // SAFETY: see above; `helper_main` never returns.
            unsafe { helper_main(read_end.as_raw_fd(), Some(child)) }
        }
    }
}

impl CleanupGuard {
    /// Adds files for the helper to remove when the VMM ends. Paths that do not exist are
    /// ignored: there is nothing of ours to remove there.
    pub fn watch(&mut self, paths: &[impl AsRef<Path>]) -> Result<(), CleanupError> {
        for p in paths {
            let p = p.as_ref();
            let Ok(m) = std::fs::symlink_metadata(p) else {
                continue;
            };
            let bytes = p.as_os_str().as_bytes();
            let mut rec = Vec::with_capacity(RECORD_HEADER + bytes.len() + 1);
            rec.extend_from_slice(&m.dev().to_le_bytes());
            rec.extend_from_slice(&m.ino().to_le_bytes());
            rec.extend_from_slice(bytes);
            rec.push(0);
            if bytes.contains(&0) || self.sent + rec.len() > HELPER_BUF {
                return Err(CleanupError::Full(p.display().to_string()));
            }
            write_all(self.write_end.as_raw_fd(), &rec).map_err(|source| CleanupError::Watch {
                path: p.display().to_string(),
                source,
            })?;
            self.sent += rec.len();
        }
        Ok(())
    }

    /// Closes the pipe and waits for the helper (when it is our child), for an orderly exit.
    pub fn finish(self) {
        let pid = self.helper_pid;
        drop(self);
        if let Some(pid) = pid {
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
    }
}

fn write_all(fd: libc::c_int, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// The helper: collects records until EOF, then removes what they name. With `vmm` (the
/// helper is the VMM's parent), it then leaves as the VMM did.
///
/// # Safety
/// Only to be called right after `fork`, in a process that then only runs this.
unsafe fn helper_main(read_fd: libc::c_int, vmm: Option<libc::pid_t>) -> ! {
    // Keep nothing but the pipe: an inherited listener or stream would keep the VMM's
    // sockets answering after it died.
    let keep = read_fd as libc::c_uint;
    if keep > 0 {
        libc::syscall(libc::SYS_close_range, 0, keep - 1, 0);
    }
    libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0);
    let mut buf = [0u8; HELPER_BUF];
    let mut len = 0;
    loop {
        let room = &mut buf[len..];
        if room.is_empty() {
            // The VMM never sends more than fits; drain without storing until EOF.
            let mut sink = [0u8; 64];
            let n = libc::read(read_fd, sink.as_mut_ptr().cast(), sink.len());
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
            continue;
        }
        let n = libc::read(read_fd, room.as_mut_ptr().cast(), room.len());
        if n == 0 {
            break;
        }
        if n < 0 {
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        len += n as usize;
    }
    let mut rest = &buf[..len];
    while let Some((dev, ino, path, next)) = parse_record(rest) {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::lstat(path.as_ptr().cast(), &mut st) == 0 && st.st_dev == dev && st.st_ino == ino {
            libc::unlink(path.as_ptr().cast());
        }
        rest = next;
    }
    match vmm {
        Some(pid) => exit_as(pid),
        None => libc::_exit(0),
    }
}

/// Waits for `pid` and ends this process the way it ended: same exit code, or death by the
/// same signal (with [`SIGSYS_EXIT`] read as SIGSYS).
///
/// # Safety
/// As for `helper_main`: async-signal-safe calls only.
unsafe fn exit_as(pid: libc::pid_t) -> ! {
    let mut status = 0;
    while libc::waitpid(pid, &mut status, 0) < 0 {
        if *libc::__errno_location() != libc::EINTR {
            libc::_exit(1);
        }
    }
    let signal = if libc::WIFSIGNALED(status) {
        libc::WTERMSIG(status)
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == SIGSYS_EXIT {
        libc::SIGSYS
    } else {
        libc::_exit(libc::WEXITSTATUS(status))
    };
    libc::signal(signal, libc::SIG_DFL);
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigaddset(&mut set, signal);
    libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    libc::kill(libc::getpid(), signal);
    libc::_exit(128 + signal)
}

/// One record: (dev, ino, the path with its NUL, what follows). None at the end or on a
/// torn record. Allocation-free, so it is safe in the forked helper.
fn parse_record(b: &[u8]) -> Option<(u64, u64, &[u8], &[u8])> {
    let header = b.get(..RECORD_HEADER)?;
    let dev = u64::from_le_bytes(header[..8].try_into().ok()?);
    let ino = u64::from_le_bytes(header[8..].try_into().ok()?);
    let body = &b[RECORD_HEADER..];
    let nul = body.iter().position(|&c| c == 0)?;
    Some((dev, ino, &body[..=nul], &body[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_removes_only_the_original_files() {
        let dir = std::env::temp_dir().join(format!("husk-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.sock");
        let b = dir.join("b.sock");
        // The helper exists before the files do, as in the VMM.
        let mut g = spawn().unwrap();
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        g.watch(&[a.clone(), b.clone(), dir.join("missing")])
            .unwrap();
        // b is replaced by another file: the helper must leave the new one alone.
        std::fs::remove_file(&b).unwrap();
        std::fs::write(dir.join("pad"), "x").unwrap();
        std::fs::write(&b, "new").unwrap();
        g.finish();
        assert!(!a.exists());
        assert!(b.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_list_is_an_error_not_a_truncation() {
        let dir = std::env::temp_dir().join(format!("husk-cleanup-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let long = dir.join("x".repeat(200));
        std::fs::write(&long, "").unwrap();
        let mut g = spawn().unwrap();
        let many: Vec<_> = std::iter::repeat_n(long.clone(), HELPER_BUF / 200 + 1).collect();
        assert!(matches!(g.watch(&many), Err(CleanupError::Full(_))));
        g.finish();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn torn_records_end_the_parse() {
        let mut rec = Vec::new();
        rec.extend_from_slice(&1u64.to_le_bytes());
        rec.extend_from_slice(&2u64.to_le_bytes());
        rec.extend_from_slice(b"/a\0");
        let (dev, ino, path, rest) = parse_record(&rec).unwrap();
        assert_eq!((dev, ino, path, rest.len()), (1, 2, &b"/a\0"[..], 0));
        assert!(parse_record(&rec[..10]).is_none());
        assert!(parse_record(&rec[..rec.len() - 1]).is_none());
    }
}
