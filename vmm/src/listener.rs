//! Unix listeners that appear at their path only once they accept.
//!
//! `bind(2)` creates the path before `listen(2)` makes the socket accept, and a client that
//! finds the path in between gets ECONNREFUSED: a shim polling for the API socket failed on it
//! in CI, and our own stale-socket check reads the same refusal as "nobody home" and would
//! replace a VMM that is just starting. So the socket is bound and listening under a private
//! name first, then renamed to its path, refusing to replace anything that appeared there.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The longest path `sockaddr_un` holds, without its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// Binds a listening socket at `path` with mode 0600.
///
/// The mode is set through the umask at creation: a chmod afterwards leaves a window, and fails
/// on some filesystems (9p). The umask is per process, so this must run before the VMM starts
/// threads that create files; the VMM binds while it is being configured, single-threaded.
pub fn bind_published(path: &Path) -> io::Result<UnixListener> {
    let private = private_name(path);
    let Some(private) = private.filter(|p| p.as_os_str().len() <= SUN_PATH_MAX) else {
        // No room for a longer private name: bind in place, with the old window.
        return bind_owner_only(path);
    };
    // A previous process with our pid may have died between its bind and its rename.
    let _ = std::fs::remove_file(&private);
    let listener = bind_owner_only(&private)?;
    match rename_noreplace(&private, path) {
        Ok(()) => Ok(listener),
        Err(e) => {
            let _ = std::fs::remove_file(&private);
            Err(e)
        }
    }
}

fn private_name(path: &Path) -> Option<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = path.parent()?;
    Some(dir.join(format!(".{}.{n}", std::process::id())))
}

fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    // Two binds at once (test threads) would otherwise save each other's narrowed mask as
    // the one to restore, and leave it for good.
    static UMASK: Mutex<()> = Mutex::new(());
    let _swap = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask only swaps the process's file mode mask.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    bound
}

/// Renames `from` to `to` unless `to` exists. Filesystems without RENAME_NOREPLACE (9p answers
/// EINVAL) get a check then a rename: only a racing process of the same user could slip in.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-listener-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_path_accepts_as_soon_as_it_exists_and_nothing_else_is_left() {
        let d = tmpdir("publish");
        let path = d.join("api.sock");
        let listener = bind_published(&path).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn an_existing_path_is_never_replaced() {
        let d = tmpdir("noreplace");
        let path = d.join("api.sock");
        std::fs::write(&path, "not ours").unwrap();
        let e = bind_published(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not ours");
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "private name left"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
