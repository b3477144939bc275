//! The pod's shared directory on the host (exported to the guest by virtio-fs): each
//! container's rootfs and host binds mounted into it, and its removal.

use std::path::{Path, PathBuf};

use husk_proto::agent as pb;

use super::SHARE_TAG;
use crate::containerd::error::{Error, Result};
use crate::containerd::pod_spec;
use crate::containerd::runtime::ContainerRequest;

fn mount(
    source: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        fstype,
        nix::mount::MsFlags::from_bits_truncate(flags),
        data,
    )
    .map_err(|e| {
        Error::io(
            format!("mount {} on {}", source.display(), target.display()),
            e.into(),
        )
    })
}

pub(super) fn unmount_all(points: &[PathBuf]) {
    for p in points.iter().rev() {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmount {}: {e}", p.display());
        }
    }
}

/// Makes `container`'s rootfs and host binds visible in the share; returns the mount points
/// made (for unmounting) and the agent mounts for the binds.
pub(super) fn share_container(
    share: &Path,
    req: &ContainerRequest,
    binds: &[pod_spec::HostBind],
) -> Result<(Vec<PathBuf>, Vec<pb::Mount>)> {
    let mut points = Vec::new();
    let result = (|| {
        let rootfs = req.bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| Error::io("create the bundle rootfs", e))?;
        for m in &req.rootfs {
            if m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
                mount(
                    Path::new(&m.source),
                    &rootfs,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                )?;
            } else {
                let data = m.options.join(",");
                mount(Path::new(&m.source), &rootfs, Some(&m.kind), 0, Some(&data))?;
            }
            points.push(rootfs.clone());
        }
        let dir = share.join(&req.id);
        let target = dir.join("rootfs");
        std::fs::create_dir_all(&target)
            .map_err(|e| Error::io("create the shared rootfs dir", e))?;
        mount(&rootfs, &target, None, libc::MS_BIND | libc::MS_REC, None)?;
        points.push(target);
        let mut mounts = Vec::new();
        for (i, b) in binds.iter().enumerate() {
            let src = Path::new(&b.source);
            let t = dir.join(format!("m{i}"));
            if src.is_dir() {
                std::fs::create_dir_all(&t)
            } else {
                std::fs::write(&t, b"")
            }
            .map_err(|e| Error::io(format!("create {}", t.display()), e))?;
            mount(src, &t, None, libc::MS_BIND | libc::MS_REC, None)?;
            points.push(t);
            let mut pm = pb::Mount::new();
            pm.destination = b.destination.clone();
            pm.type_ = "bind".into();
            pm.source = format!("{}/m{i}", req.id);
            pm.options = b.options.clone();
            pm.share_tag = SHARE_TAG.into();
            mounts.push(pm);
        }
        Ok(mounts)
    })();
    match result {
        Ok(mounts) => Ok((points, mounts)),
        Err(e) => {
            unmount_all(&points);
            Err(e)
        }
    }
}

/// Removes the pod's shared directory, unless something is still mounted under it: a
/// recursive removal would then delete the mounted host files themselves.
pub(in crate::containerd) fn remove_share(share: &Path) {
    let prefix = format!("{}/", share.display());
    let busy = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| m.starts_with(&prefix));
    if busy {
        tracing::warn!(
            "{} still has mounts under it; left in place",
            share.display()
        );
    } else if let Err(e) = std::fs::remove_dir_all(share) {
        tracing::warn!("remove {}: {e}", share.display());
    }
}
