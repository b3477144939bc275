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
}

/// Held by the VMM for its whole life; dropping it (or dying) triggers the cleanup.
pub struct CleanupGuard {
    write_end: OwnedFd,
    pub helper_pid: libc::pid_t,
    sent: usize,
}

/// Forks the helper. Call it before guest memory is allocated (see the module docs).
pub fn spawn() -> Result<CleanupGuard, CleanupError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CleanupError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only uses async-signal-safe calls (close_range, read, lstat, unlink,
    // _exit) on its own stack buffer; it never returns into Rust code of the parent.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(CleanupError::Fork(std::io::Error::last_os_error())),
        // SAFETY: see above; `helper_main` never returns.
        0 => unsafe { helper_main(read_end.as_raw_fd()) },
        pid => Ok(CleanupGuard {
            write_end,
            helper_pid: pid,
            sent: 0,
        }),
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

    /// Closes the pipe and waits for the helper, for an orderly exit.
    pub fn finish(self) {
        let pid = self.helper_pid;
        drop(self);
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
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

/// The helper: collects records until EOF, then removes what they name.
///
/// # Safety
/// Only to be called in the child right after `fork`.
unsafe fn helper_main(read_fd: libc::c_int) -> ! {
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
    libc::_exit(0)
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
