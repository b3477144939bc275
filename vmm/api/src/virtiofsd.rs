//! Where the virtio-fs back end is: the VMM's `add_fs` talks vhost-user to a virtiofsd that
//! its parent (or a test) starts.

use std::path::{Path, PathBuf};

/// The virtiofsd binary: `$HUSK_VIRTIOFSD`, else the one `scripts/setup` builds into
/// `$HUSK_CACHE/virtiofsd/bin` (default `/var/cache/husk`), else on `PATH`.
pub fn virtiofsd_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HUSK_VIRTIOFSD").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Some(path);
        }
        tracing::warn!(
            "HUSK_VIRTIOFSD={} is not an executable file; looking elsewhere",
            path.display()
        );
    }
    let cache = std::env::var_os("HUSK_CACHE")
        .filter(|c| !c.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/husk"), PathBuf::from);
    let cached = cache.join("virtiofsd/bin/virtiofsd");
    if is_executable(&cached) {
        return Some(cached);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("virtiofsd"))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
