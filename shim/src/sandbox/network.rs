//! The sandbox's network plumbing on the host: network namespaces and taps in them.
//!
//! `setns` changes only the calling thread's namespace, and a tokio worker (or any pooled
//! thread) must never be left in a pod's. So all netns work runs on a fresh thread that
//! exits when done ([`in_netns`]). A tap opened there stays in that netns; its fd goes to the
//! VMM over the control API (`add_net` with `tap_fd`), so the VMM itself needs no netns.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use husk_vmm_api::tap::{self, IfReq};

use super::{Result, SandboxError};

/// Runs `f` on a thread of its own inside the network namespace at `netns` (the caller's
/// when `None`). The thread ends with `f`, so no thread is left in the other namespace.
pub fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = netns {
                enter_netns(ns)?;
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(SandboxError::Invalid("a netns thread panicked".into())))
    })
}

fn enter_netns(ns: &Path) -> Result<()> {
    let file = File::open(ns)
        .map_err(|e| SandboxError::io(format!("open the network namespace {}", ns.display()), e))?;
    // SAFETY: setns on an fd we hold open; it changes only this (dedicated) thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(SandboxError::io(
            format!("enter the network namespace {}", ns.display()),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SandboxError::Invalid(format!("{} contains a NUL byte", path.display())))
}

/// Creates a network namespace and pins it by bind-mounting it on `path` (a new file), as
/// `ip netns add` does; only a loopback, down.
pub fn create_netns(path: &Path) -> Result<()> {
    let target = cstring(path)?;
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| SandboxError::io(format!("create {}", path.display()), e))?;
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare takes flags by value; it moves only this (dedicated) thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let source = CString::new("/proc/thread-self/ns/net").expect("no NUL");
            // SAFETY: both paths are NUL-terminated strings alive for the call; a bind mount
            // reads no filesystem type or data.
            let ret = unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the netns thread panicked")))
    });
    made.map_err(|e| {
        let _ = std::fs::remove_file(path);
        SandboxError::io(
            format!("create the network namespace {}", path.display()),
            e,
        )
    })
}

/// Unpins and removes a namespace made by [`create_netns`]; a missing one is no error. Its
/// interfaces (taps included) go with it once nothing else holds it.
pub fn remove_netns(path: &Path) -> Result<()> {
    let target = cstring(path)?;
    // SAFETY: a NUL-terminated path alive for the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (already unmounted); ENOENT: gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(SandboxError::io(format!("unmount {}", path.display()), e));
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(SandboxError::io(format!("remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// A tap opened for the VMM.
#[derive(Debug)]
pub struct OpenedTap {
    pub fd: OwnedFd,
    pub name: String,
    /// Whether opening it created it (it then vanishes when its last fd closes).
    pub created: bool,
}

/// Opens (creating it if there is none) tap `name` in the network namespace `netns` (ours
/// when `None`), up, with the flags the VMM's virtio-net needs.
pub fn open_tap(netns: Option<&Path>, name: &str) -> Result<OpenedTap> {
    in_netns(netns, || {
        let existed = interface_index(name).is_some();
        let (file, name) =
            tap::open(name).map_err(|e| SandboxError::Invalid(format!("tap {name}: {e}")))?;
        set_up(&name)?;
        Ok(OpenedTap {
            fd: OwnedFd::from(file),
            name,
            created: !existed,
        })
    })
}

/// The interface's index in this thread's network namespace.
fn interface_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name alive for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Brings an interface of this thread's network namespace up.
fn set_up(name: &str) -> Result<()> {
    let err = |what: &str, e: io::Error| SandboxError::io(format!("{what} {name}"), e);
    // SAFETY: plain socket(2); the result is checked and owned at once. A socket belongs to
    // the namespace of the thread that makes it: this one.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket for", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name).map_err(|e| SandboxError::Invalid(e.to_string()))?;
    // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`, which `req` matches.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(err("get the flags of", io::Error::last_os_error()));
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above, for SIOCSIFFLAGS.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
        return Err(err("bring up", io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether interface `name` exists in the network namespace `netns`.
pub fn interface_exists(netns: Option<&Path>, name: &str) -> Result<bool> {
    in_netns(netns, || Ok(interface_index(name).is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn link_in(ns: &Path, name: &str) -> Option<String> {
        let o = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["ip", "-o", "link", "show", name])
            .output()
            .expect("nsenter (util-linux) and ip");
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// A tap made in a pod's netns from the host netns: it is there, up, and not here;
    /// closing its fd removes it, and removing the netns leaves no mount behind.
    #[test]
    fn tap_in_another_netns() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "needs root (netns, tap)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("pod-ns");
        create_netns(&ns).unwrap();
        assert!(
            std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .contains(ns.to_str().unwrap()),
            "the netns is pinned by a mount"
        );
        let tap = open_tap(Some(&ns), "husknet0").unwrap();
        assert!(tap.created);
        assert_eq!(tap.name, "husknet0");
        let link = link_in(&ns, "husknet0").expect("the tap is in the pod's netns");
        assert!(link.contains(",UP"), "{link}");
        assert!(
            !interface_exists(None, "husknet0").unwrap(),
            "and not in ours"
        );
        assert!(interface_exists(Some(&ns), "husknet0").unwrap());
        drop(tap);
        assert!(
            link_in(&ns, "husknet0").is_none(),
            "a tap we created goes with its last fd"
        );
        remove_netns(&ns).unwrap();
        assert!(!ns.exists());
        assert!(!std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(ns.to_str().unwrap()));
        remove_netns(&ns).unwrap();
    }

    #[test]
    fn this_thread_stays_in_its_netns() {
        let mine = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("ns");
        create_netns(&ns).unwrap();
        let theirs = in_netns(Some(&ns), || {
            Ok(std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        })
        .unwrap();
        assert_ne!(mine, theirs);
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            mine
        );
        remove_netns(&ns).unwrap();
    }
}
