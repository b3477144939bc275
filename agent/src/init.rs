//! PID 1 duties in the guest: the pseudo filesystems, cgroup2 with its controllers, /run.
//! Orphans are reaped by [`crate::reaper`], which owns waitpid(-1).

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Init failures.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        source: nix::Error,
    },
}

struct M {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// Mounts what a Linux system needs, skipping what is already mounted (a kernel with
/// devtmpfs automount, or a second call).
pub fn mount_pseudo_filesystems() -> Result<(), InitError> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let table = [
        M {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        M {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        M {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        M {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        M {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        M {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        M {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
    ];
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut new_devpts = false;
    for m in table {
        let already = mounted
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(m.target));
        if already {
            continue;
        }
        new_devpts |= m.fstype == "devpts";
        let _ = std::fs::create_dir_all(m.target);
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
            InitError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }
        })?;
    }
    if new_devpts {
        // /dev/ptmx must be the devpts instance we just mounted, for container ptys. Only
        // then: a /dev we did not set up (a test namespace on a host) is not ours to change.
        let _ = std::fs::remove_file("/dev/ptmx");
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
    Ok(())
}

/// Offers the images embedded in the initramfs as the share [`husk_proto::EMBEDDED_SHARE_TAG`]
/// (a read-only bind mount under the share root), so containers can use them as their rootfs
/// without any virtio-fs device. A guest image without embedded images is not an error.
pub fn mount_embedded_images(share_root: &Path) -> Result<(), InitError> {
    let src = Path::new(husk_proto::EMBEDDED_IMAGES_DIR);
    if !src.is_dir() {
        return Ok(());
    }
    let target = share_root.join(husk_proto::EMBEDDED_SHARE_TAG);
    let _ = std::fs::create_dir_all(&target);
    let err = |source| InitError::Mount {
        fstype: "bind",
        target: husk_proto::EMBEDDED_SHARE_TAG,
        source,
    };
    mount(
        Some(src),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)?;
    // Read-only: every container of every pod starts from the same pristine image (the
    // container's own writes go to the tmpfs mounts its spec asks for).
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(err)
}

/// Delegates every available controller to child cgroups, so per-container limits work.
pub fn enable_cgroup_controllers(root: &Path) {
    let Ok(avail) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
        return;
    };
    for c in avail.split_whitespace() {
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!(controller = c, "enable cgroup controller: {e}");
        }
    }
}

/// Makes this process a child subreaper (host mode): container processes whose parent (the
/// runtime helper) exits are re-parented to us, so we can collect their exit status.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes fds 0-2 the console when the kernel started us without them (an initramfs without
/// /dev/console): otherwise the first files we open would become "stdout".
pub fn ensure_console() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let missing = (0..3).any(|fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err());
    if !missing {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let raw = console.as_raw_fd();
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            // SAFETY: dup2 onto a closed low fd; `raw` is open for the duration of the call.
            unsafe { libc::dup2(raw, fd) };
        }
    }
    if raw > 2 {
        drop(console);
    } else {
        // The console itself landed on 0-2: keep it open.
        let _ = console.into_raw_fd();
    }
}

/// The I/O port and value of husk-vmm's boot timer (vmm/src/devices/legacy/boot_timer.rs):
/// the VMM logs the time from its start to this write as the boot time.
pub const BOOT_MARKER_PORT: u16 = 0x3f0;
/// See [`BOOT_MARKER_PORT`].
pub const BOOT_MARKER_VALUE: u8 = 123;

/// Tells the VMM the agent is ready (the boot marker). Harmless under other VMMs: an
/// unclaimed port write is ignored.
#[cfg(target_arch = "x86_64")]
pub fn write_boot_marker() -> std::io::Result<()> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap for one port.
    if unsafe { libc::ioperm(BOOT_MARKER_PORT.into(), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes one byte to the boot-timer port we were just granted; touches no memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") BOOT_MARKER_VALUE, options(nomem, nostack, preserves_flags));
    }
    Ok(())
}

/// No boot marker port on other architectures.
#[cfg(not(target_arch = "x86_64"))]
pub fn write_boot_marker() -> std::io::Result<()> {
    Ok(())
}

/// Whether `/` is the initramfs ("rootfs"), from which pivot_root(2) is impossible (EINVAL):
/// containers must then be set up with MS_MOVE + chroot instead (runc's --no-pivot).
pub fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| mountinfo_root_is_rootfs(&m))
        .unwrap_or(false)
}

/// Parses mountinfo: the last mount on "/" is the visible root; is it the rootfs?
fn mountinfo_root_is_rootfs(mountinfo: &str) -> bool {
    let root = mountinfo
        .lines()
        .rev()
        .find(|l| l.split_whitespace().nth(4) == Some("/"));
    let Some(line) = root else { return false };
    let Some((_, after)) = line.split_once(" - ") else {
        return false;
    };
    let mut f = after.split_whitespace();
    let (fstype, source) = (f.next(), f.next());
    fstype == Some("rootfs") || source == Some("rootfs")
}

#[cfg(test)]
mod tests {
    use super::mountinfo_root_is_rootfs;

    #[test]
    fn detects_initramfs_root() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=60428k\n\
                         18 1 0:17 / /proc rw,nosuid - proc proc rw\n";
        assert!(mountinfo_root_is_rootfs(initramfs));
        let disk = "1 1 0:2 / / rw - rootfs rootfs rw\n\
                    25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";
        assert!(!mountinfo_root_is_rootfs(disk));
        assert!(!mountinfo_root_is_rootfs(""));
    }
}
