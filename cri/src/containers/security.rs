//! The I/O side of a container's security context, before its spec is built: the user
//! from the image's `/etc/passwd` and `/etc/group` (read from its unpacked layers, never
//! leaving them) and a `Localhost` seccomp profile from the host. Everything wrong here is
//! the config's fault: InvalidArgument.

use std::path::PathBuf;

use tracing::debug;

use crate::container_spec::{ContainerConfig, ImageConfig, Resolved, SpecError};
use crate::layer_files;
use crate::security_context::{Seccomp, SecurityError};
use crate::users::{self, UserDb};

/// Largest Localhost profile read (moby's default profile is about 20 KiB).
const MAX_PROFILE: u64 = 1 << 20;

/// Resolves `cfg`'s security context for a pod that is privileged or not.
pub(super) fn resolve(
    cfg: &ContainerConfig,
    img: &ImageConfig,
    lowers: &[PathBuf],
    pod_privileged: bool,
) -> Result<Resolved, SpecError> {
    let sec = &cfg.security;
    if sec.privileged && !pod_privileged {
        return Err(SecurityError::PrivilegedPodNeeded.into());
    }
    let userstr = match sec.user_string()? {
        Some(u) => u,
        None => img
            .user
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "0".into()),
    };
    let db = user_db(lowers)?;
    let supplemental = sec
        .supplemental_groups
        .iter()
        .map(|g| users::id("supplemental group", *g))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(u) = sec.run_as_user {
        users::id("run_as_user", u)?;
    }
    if let Some(g) = sec.run_as_group {
        users::id("run_as_group", g)?;
    }
    let user = db.resolve(&userstr, !sec.strict_groups, &supplemental)?;
    debug!(user = %userstr, uid = user.uid, gid = user.gid, groups = ?user.additional_gids, "container user");
    let localhost = match &sec.seccomp {
        Seccomp::Localhost(path) if !sec.privileged => Some(read_profile(path)?),
        _ => None,
    };
    let caps = sec.capabilities()?;
    let seccomp = sec.seccomp(&caps, localhost.as_deref())?;
    Ok(Resolved { user, seccomp })
}

fn user_db(lowers: &[PathBuf]) -> Result<UserDb, SpecError> {
    let read = |p: &str| -> Result<String, SpecError> {
        let bytes = layer_files::read(lowers, p)
            .map_err(|e| SpecError::ImageConfig(format!("the image's {p}: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned())
    };
    Ok(UserDb::parse(&read("/etc/passwd")?, &read("/etc/group")?))
}

fn read_profile(path: &str) -> Result<Vec<u8>, SecurityError> {
    use std::io::Read;
    let err = |e: std::io::Error| SecurityError::Seccomp(format!("read profile {path}: {e}"));
    let f = std::fs::File::open(path).map_err(err)?;
    let mut buf = Vec::new();
    f.take(MAX_PROFILE + 1).read_to_end(&mut buf).map_err(err)?;
    if buf.len() as u64 > MAX_PROFILE {
        return Err(SecurityError::Seccomp(format!(
            "profile {path} is larger than {MAX_PROFILE} bytes"
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security_context::SecurityContext;

    fn image() -> (tempfile::TempDir, Vec<PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let l = d.path().join("l0");
        std::fs::create_dir_all(l.join("etc")).unwrap();
        std::fs::write(
            l.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            l.join("etc/group"),
            "root:x:0:\nwheel:x:10:user\nuser:x:1000:\n",
        )
        .unwrap();
        (d, vec![l])
    }

    fn cfg(sec: SecurityContext) -> ContainerConfig {
        ContainerConfig {
            security: sec,
            ..Default::default()
        }
    }

    #[test]
    fn users_come_from_the_cri_then_the_image() {
        let (_d, l) = image();
        let img = ImageConfig {
            user: Some("user".into()),
            ..Default::default()
        };
        let r = resolve(&cfg(SecurityContext::default()), &img, &l, false).unwrap();
        assert_eq!(
            (r.user.uid, r.user.gid, r.user.additional_gids),
            (1000, 1000, vec![1000, 10])
        );
        let sec = SecurityContext {
            run_as_username: "root".into(),
            supplemental_groups: vec![44],
            ..Default::default()
        };
        let r = resolve(&cfg(sec), &img, &l, false).unwrap();
        assert_eq!((r.user.uid, r.user.additional_gids), (0, vec![0, 44]));
        let r = resolve(
            &cfg(SecurityContext::default()),
            &ImageConfig::default(),
            &l,
            false,
        );
        assert_eq!(r.unwrap().user.uid, 0);
        let sec = SecurityContext {
            run_as_username: "ghost".into(),
            ..Default::default()
        };
        assert!(matches!(
            resolve(&cfg(sec), &img, &l, false),
            Err(SpecError::User(_))
        ));
    }

    #[test]
    fn privileged_needs_a_privileged_pod_and_profiles_are_read() {
        let (d, l) = image();
        let img = ImageConfig::default();
        let sec = SecurityContext {
            privileged: true,
            ..Default::default()
        };
        assert!(matches!(
            resolve(&cfg(sec.clone()), &img, &l, false),
            Err(SpecError::Security(SecurityError::PrivilegedPodNeeded))
        ));
        assert!(resolve(&cfg(sec), &img, &l, true)
            .unwrap()
            .seccomp
            .is_none());

        let p = d.path().join("p.json");
        std::fs::write(&p, r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        let sec = SecurityContext {
            seccomp: Seccomp::Localhost(p.display().to_string()),
            ..Default::default()
        };
        let r = resolve(&cfg(sec), &img, &l, false).unwrap();
        assert_eq!(r.seccomp.unwrap()["defaultAction"], "SCMP_ACT_ALLOW");
        let sec = SecurityContext {
            seccomp: Seccomp::Localhost("/no/such/profile.json".into()),
            ..Default::default()
        };
        assert!(matches!(
            resolve(&cfg(sec), &img, &l, false),
            Err(SpecError::Security(SecurityError::Seccomp(_)))
        ));
    }
}
