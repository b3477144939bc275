//! Named network namespaces under `/var/run/netns` (as `ip netns` and containerd make them):
//! a thread unshares a fresh net namespace and bind-mounts it onto a file, so the namespace
//! outlives the thread and huskd, and CNI plugins and the shim find it by path.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/var/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("create netns {path}: {message}")]
    Create { path: PathBuf, message: String },
    #[error("remove netns {path}: {message}")]
    Remove { path: PathBuf, message: String },
}

/// A named network namespace (the bind-mounted file); recorded as its path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    /// Creates `<dir>/<name>`; on any failure nothing is left.
    pub fn create(dir: &Path, name: &str) -> Result<Netns, NetnsError> {
        let path = dir.join(name);
        let err = |message: String| NetnsError::Create {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create {}: {e}", dir.display())))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err(format!("create the mount point: {e}")))?;
        let target = path.clone();
        // setns/unshare act on the calling thread only: a thread of its own, which ends
        // after the bind mount and takes the new namespace with it (the mount keeps it).
        let r = std::thread::spawn(move || -> Result<(), String> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind mount: {e}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the netns thread panicked".into()));
        if let Err(m) = r {
            let _ = std::fs::remove_file(&path);
            return Err(err(m));
        }
        Ok(Netns { path })
    }

    /// The namespace at an existing path (e.g. recorded before a restart).
    pub fn from_path(path: PathBuf) -> Netns {
        Netns { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and removes the file; a namespace already gone is not an error.
    pub fn remove(&self) -> Result<(), NetnsError> {
        let err = |message: String| NetnsError::Remove {
            path: self.path.clone(),
            message,
        };
        match umount2(&self.path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(err(format!("unmount: {e}"))),
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(format!("remove: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_is_a_separate_namespace_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Netns::create(dir.path(), "t1").unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        assert_ne!(inode(ns.path()), inode(Path::new("/proc/self/ns/net")));
        // Creating the same name twice fails and leaves the first intact.
        assert!(Netns::create(dir.path(), "t1").is_err());
        assert_ne!(inode(ns.path()), inode(Path::new("/proc/self/ns/net")));
        ns.remove().unwrap();
        assert!(!ns.path().exists());
        ns.remove().unwrap();
    }
}
