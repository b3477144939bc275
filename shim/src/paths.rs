//! Where the host side finds its pieces: the VMM binary, the guest images, its run directory.
//!
//! Each has an environment override; otherwise the layout of a build tree is assumed
//! (`target/<profile>/husk` next to `husk-vmm`, guest images in `target/guest`).

use std::path::{Path, PathBuf};

use crate::{Result, SandboxError};

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `husk-vmm`: `$HUSK_VMM`, else next to this executable, else on `PATH`.
pub fn husk_vmm() -> Result<PathBuf> {
    if let Some(p) = env_path("HUSK_VMM") {
        return Ok(p);
    }
    let candidates = exe_dir().map(|d| d.join("husk-vmm")).into_iter().chain(
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.join("husk-vmm")),
    );
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(SandboxError::Missing {
        what: "husk-vmm".into(),
        hint: "build it (cargo build --workspace --bins), put it next to husk, or set HUSK_VMM"
            .into(),
    })
}

/// The directory with `vmlinux` and `husk-initramfs.cpio`: `$HUSK_GUEST_DIR`, else
/// `../guest` from this executable (`target/guest` for a build tree).
pub fn guest_dir() -> PathBuf {
    env_path("HUSK_GUEST_DIR").unwrap_or_else(|| {
        exe_dir()
            .and_then(|d| d.parent().map(|p| p.join("guest")))
            .unwrap_or_else(|| PathBuf::from("/usr/share/husk/guest"))
    })
}

/// A guest image file in [`guest_dir`], which must exist.
pub fn guest_file(name: &str) -> Result<PathBuf> {
    let p = guest_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(SandboxError::Missing {
            what: format!("the guest image {}", p.display()),
            hint: "build it with guest-image/build, or point HUSK_GUEST_DIR at it".into(),
        })
    }
}

/// husk's run root: sandbox directories (state, sockets, logs) go under `sandbox/` in it.
/// `$HUSK_RUN_DIR`, else `/run/husk`.
pub fn run_root() -> PathBuf {
    env_path("HUSK_RUN_DIR").unwrap_or_else(|| PathBuf::from("/run/husk"))
}
