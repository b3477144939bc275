//! Validation of ids and of paths received from the host.
//!
//! Ids end up in file names (bundle and state directories) and cgroup paths, so anything
//! that could name another directory (`/`, `..`) or surprise a shell is refused.

use std::path::{Component, Path, PathBuf};

use crate::error::{AgentError, Result};

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 64;

/// Checks a sandbox, container or exec id: 1..=64 of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if id.is_empty() || id.len() > MAX_ID_LEN || !ok_chars || id == "." || id == ".." {
        return Err(AgentError::InvalidArgument(format!(
            "invalid {kind} id {id:?}: use 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 _ . - \
             (no '/', not '.' or '..')"
        )));
    }
    Ok(())
}

/// Checks an exec id, where empty means "the container's init process".
pub fn validate_exec_id(exec_id: &str) -> Result<()> {
    if exec_id.is_empty() {
        return Ok(());
    }
    validate_id("exec", exec_id)
}

/// Resolves `rel` (a path relative to `root`) to a real path that stays inside `root`.
///
/// Refuses absolute paths and `..` components outright, then canonicalizes (following
/// symlinks) and checks the result is still under the canonical root, so a symlink inside
/// the share cannot lead out of it. The target must exist.
pub fn resolve_within(root: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    let rel_path = Path::new(rel);
    for c in rel_path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(AgentError::InvalidArgument(format!(
                    "{what} {rel:?} must be a path relative to its share, without '..'"
                )));
            }
        }
    }
    let croot = root.canonicalize().map_err(|e| {
        AgentError::NotFound(format!(
            "share directory {} is not there: {e}",
            root.display()
        ))
    })?;
    let target = croot.join(rel_path).canonicalize().map_err(|e| {
        AgentError::NotFound(format!(
            "{what} {rel:?} not found in {}: {e}",
            croot.display()
        ))
    })?;
    if !target.starts_with(&croot) {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {rel:?} resolves to {} outside its share {}: symlinks may not leave the share",
            target.display(),
            croot.display()
        )));
    }
    Ok(target)
}

/// Checks that an absolute `path` (after resolving symlinks) lies inside `root`.
pub fn check_inside(root: &Path, path: &Path, what: &str) -> Result<PathBuf> {
    let croot = root
        .canonicalize()
        .map_err(|e| AgentError::internal(format!("share root {}", root.display()), e))?;
    let target = path
        .canonicalize()
        .map_err(|e| AgentError::NotFound(format!("{what} {} not found: {e}", path.display())))?;
    if !target.starts_with(&croot) {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {} is outside the share root {}: only shared paths may be bind-mounted",
            path.display(),
            croot.display()
        )));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("container", "abc-1.2_x").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "../x", &"x".repeat(65)] {
            assert!(validate_id("container", bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_exec_id("").is_ok());
    }

    #[test]
    fn resolve() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("esc")).unwrap();
        assert!(resolve_within(d.path(), "a/b", "rootfs").is_ok());
        assert!(resolve_within(d.path(), "", "rootfs").is_ok());
        assert!(matches!(
            resolve_within(d.path(), "../x", "rootfs"),
            Err(AgentError::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve_within(d.path(), "/etc", "rootfs"),
            Err(AgentError::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve_within(d.path(), "esc", "rootfs"),
            Err(AgentError::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve_within(d.path(), "nope", "rootfs"),
            Err(AgentError::NotFound(_))
        ));
    }
}
