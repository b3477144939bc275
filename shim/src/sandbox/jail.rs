//! The jail every pod VMM runs in (`husk-vmm --jail`, see the VMM's `jail` module): its
//! directory in the sandbox directory, and an unprivileged uid and gid of its own.
//!
//! Ids come from a range no distribution hands out (`UID_BASE` .. `+ UID_COUNT`), one per live
//! VMM on the node, so one VMM cannot signal, trace or reach the files of another even
//! where seccomp would let it. Each id in use is a lock file `<run root>/jail-ids/<uid>`,
//! created with `O_EXCL` (so two sandboxes never get the same one, even from two processes)
//! and recorded in the sandbox's state first, so a cleanup after a crash frees it too.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Result, SandboxError};

/// First uid (and gid) of a jailed VMM.
pub const UID_BASE: u32 = 200_000_000;
/// How many VMMs can be jailed at once on one node.
pub const UID_COUNT: u32 = 65_536;

/// The jail's directory under a sandbox directory: the VMM's `/`, holding only the sockets
/// it listens on (its vsock socket).
pub fn dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("jail")
}

fn ids_dir(run_root: &Path) -> PathBuf {
    run_root.join("jail-ids")
}

/// Takes a free id for sandbox `id`: the probe starts at a hash of the id so concurrent
/// sandboxes rarely race for the same file. Returns the id and its lock file.
pub fn allocate(run_root: &Path, id: &str) -> Result<(u32, PathBuf)> {
    let dir = ids_dir(run_root);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| SandboxError::io(format!("create {}", dir.display()), e))?;
    let start = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % UID_COUNT;
    for i in 0..UID_COUNT {
        let uid = UID_BASE + (start + i) % UID_COUNT;
        let lock = dir.join(uid.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock)
        {
            Ok(_) => return Ok((uid, lock)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(SandboxError::io(format!("create {}", lock.display()), e)),
        }
    }
    Err(SandboxError::Invalid(format!(
        "all {UID_COUNT} jail ids from {UID_BASE} are in use (lock files in {}); stale ones belong to sandboxes that were never cleaned up",
        dir.display()
    )))
}

/// Frees an id taken by [`allocate`]; an id already free is not an error.
pub fn release(lock: &Path) -> Result<()> {
    match fs::remove_file(lock) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SandboxError::io(format!("remove {}", lock.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_until_released_and_in_range() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, lock_a) = allocate(tmp.path(), "pod").unwrap();
        // The same sandbox id hashes to the same start: the second must probe past it.
        let (b, lock_b) = allocate(tmp.path(), "pod").unwrap();
        assert_ne!(a, b);
        for uid in [a, b] {
            assert!((UID_BASE..UID_BASE + UID_COUNT).contains(&uid));
        }
        release(&lock_a).unwrap();
        release(&lock_a).unwrap();
        let (c, _) = allocate(tmp.path(), "pod").unwrap();
        assert_eq!(c, a, "a released id is taken again");
        assert!(lock_b.exists());
    }
}
