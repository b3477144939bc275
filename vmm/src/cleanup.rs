//! Removes the VMM's socket files even when the VMM is killed with SIGKILL.
//!
//! A forked helper blocks on a pipe whose write end only the VMM holds. When the VMM
//! dies, however it dies, the read returns EOF and the helper unlinks the files (those
//! that are still the very files the VMM created, by inode) and exits. Between fork and
//! exit the helper only calls async-signal-safe functions, and it closes every other fd it
//! inherited (sockets, the console), so it keeps nothing of the VMM's alive.
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cannot create the cleanup pipe: {0}")]
    Pipe(std::io::Error),
    #[error("cannot fork the cleanup helper: {0}")]
    Fork(std::io::Error),
}

/// Held by the VMM for its whole life; dropping it (or dying) triggers the cleanup.
pub struct CleanupGuard {
    _write_end: OwnedFd,
    pub helper_pid: libc::pid_t,
}

struct Target {
    path: CString,
    dev: u64,
    ino: u64,
}

pub fn spawn(paths: &[PathBuf]) -> Result<CleanupGuard, CleanupError> {
    let targets: Vec<Target> = paths
        .iter()
        .filter_map(|p| {
            let m = std::fs::symlink_metadata(p).ok()?;
            Some(Target {
                path: CString::new(p.as_os_str().as_bytes()).ok()?,
                dev: m.dev(),
                ino: m.ino(),
            })
        })
        .collect();
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CleanupError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only uses async-signal-safe calls (close, read, lstat, unlink,
    // _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(CleanupError::Fork(std::io::Error::last_os_error())),
        0 => {
            // SAFETY: see above; this branch never returns.
            unsafe {
                // Keep nothing but the pipe: an inherited listener or stream would keep
                // the VMM's sockets answering after it died.
                let keep = read_end.as_raw_fd() as libc::c_uint;
                if keep > 0 {
                    libc::syscall(libc::SYS_close_range, 0, keep - 1, 0);
                }
                libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0);
                let mut b = 0u8;
                while libc::read(read_end.as_raw_fd(), (&mut b as *mut u8).cast(), 1) != 0 {
                    if *libc::__errno_location() != libc::EINTR {
                        break;
                    }
                }
                for t in &targets {
                    let mut st: libc::stat = std::mem::zeroed();
                    if libc::lstat(t.path.as_ptr(), &mut st) == 0
                        && st.st_dev == t.dev
                        && st.st_ino == t.ino
                    {
                        libc::unlink(t.path.as_ptr());
                    }
                }
                libc::_exit(0)
            }
        }
        pid => Ok(CleanupGuard {
            _write_end: write_end,
            helper_pid: pid,
        }),
    }
}

impl CleanupGuard {
    /// Closes the pipe and waits for the helper, for an orderly exit.
    pub fn finish(self) {
        let pid = self.helper_pid;
        drop(self);
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
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
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let g = spawn(&[a.clone(), b.clone(), dir.join("missing")]).unwrap();
        // b is replaced by another file: the helper must leave the new one alone.
        std::fs::remove_file(&b).unwrap();
        std::fs::write(dir.join("pad"), "x").unwrap();
        std::fs::write(&b, "new").unwrap();
        g.finish();
        assert!(!a.exists());
        assert!(b.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
