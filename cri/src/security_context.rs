//! A container's CRI security context in OCI terms, as containerd 1.6's CRI plugin applies
//! it (`pkg/cri/server/container_create_linux.go`): capabilities from containerd's default
//! set with CRI's add/drop (`ALL` first, so `add: [ALL], drop: [CHOWN]` is all but one),
//! masked and read-only paths (the defaults unless the context lists its own), no_new_privs,
//! seccomp (`RuntimeDefault` = [`crate::seccomp_default`], `Unconfined`, `Localhost` = a
//! profile file on the host), and `privileged`: every capability, nothing masked or
//! read-only, no seccomp, `/sys` writable. In a pod VM that is everything *inside the
//! guest*: the guest kernel is the container's, the host's devices and namespaces are never
//! reachable. The user (names from the image's passwd) is resolved by [`crate::users`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every capability of the guest kernel (6.12), for privileged and `add: [ALL]`.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's default capability set for a non-privileged container.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// containerd's default masked paths.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// containerd's default read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The seccomp profile asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seccomp {
    /// No filter (containerd 1.6's default when the CRI names none).
    #[default]
    Unconfined,
    /// huskd's default profile.
    RuntimeDefault,
    /// A profile file (OCI `linux.seccomp` JSON) at this absolute host path.
    Localhost(String),
}

/// What huskd keeps of CRI's `LinuxContainerSecurityContext`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_username: String,
    pub supplemental_groups: Vec<i64>,
    /// CRI's supplemental groups policy Strict: the image's /etc/group is not consulted.
    pub strict_groups: bool,
    pub readonly_rootfs: bool,
    pub privileged: bool,
    /// CRI's capability names (`CHOWN`, `ALL`) added to and dropped from the defaults.
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub no_new_privs: bool,
    /// Non-empty: replaces the default masked paths.
    pub masked_paths: Vec<String>,
    /// Non-empty: replaces the default read-only paths.
    pub readonly_paths: Vec<String>,
    pub seccomp: Seccomp,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecurityError {
    #[error("unknown capability {0:?} (names are as in capabilities(7), with or without CAP_)")]
    UnknownCapability(String),
    #[error(
        "a privileged container needs a privileged pod (its sandbox config's security context)"
    )]
    PrivilegedPodNeeded,
    #[error("{what} path {path:?} must be absolute without '..'")]
    BadPath { what: &'static str, path: String },
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("run_as_group without run_as_user or run_as_username")]
    GroupWithoutUser,
}

impl SecurityContext {
    /// The user string for [`crate::users`], as containerd's `generateUserString`: the
    /// username over the uid, `:gid` when a group is set; None = the image's `User`.
    pub fn user_string(&self) -> Result<Option<String>, SecurityError> {
        let user = if !self.run_as_username.is_empty() {
            Some(self.run_as_username.clone())
        } else {
            self.run_as_user.map(|u| u.to_string())
        };
        match (user, self.run_as_group) {
            (None, Some(_)) => Err(SecurityError::GroupWithoutUser),
            (None, None) => Ok(None),
            (Some(u), None) => Ok(Some(u)),
            (Some(u), Some(g)) => Ok(Some(format!("{u}:{g}"))),
        }
    }

    /// The OCI capability set (bounding = effective = permitted, as containerd 1.6).
    pub fn capabilities(&self) -> Result<Vec<String>, SecurityError> {
        if self.privileged {
            return Ok(ALL_CAPS.iter().map(|s| s.to_string()).collect());
        }
        let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
        let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
        if self.add_capabilities.iter().any(is_all) {
            caps = ALL_CAPS.iter().map(|s| s.to_string()).collect();
        }
        if self.drop_capabilities.iter().any(is_all) {
            caps.clear();
        }
        for c in self.add_capabilities.iter().filter(|c| !is_all(c)) {
            let c = cap_name(c)?;
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
        for c in self.drop_capabilities.iter().filter(|c| !is_all(c)) {
            let c = cap_name(c)?;
            caps.retain(|x| *x != c);
        }
        Ok(caps)
    }

    /// `linux.maskedPaths` and `linux.readonlyPaths`.
    pub fn paths(&self) -> Result<(Vec<String>, Vec<String>), SecurityError> {
        if self.privileged {
            return Ok((Vec::new(), Vec::new()));
        }
        let pick = |own: &[String], dflt: &[&str], what| -> Result<Vec<String>, SecurityError> {
            if own.is_empty() {
                return Ok(dflt.iter().map(|s| s.to_string()).collect());
            }
            for p in own {
                check_path(what, p)?;
            }
            Ok(own.to_vec())
        };
        Ok((
            pick(&self.masked_paths, MASKED_PATHS, "masked")?,
            pick(&self.readonly_paths, READONLY_PATHS, "readonly")?,
        ))
    }

    /// `linux.seccomp` for a container with bounding set `caps`; `localhost` is the
    /// content of the Localhost profile (read by the caller).
    pub fn seccomp(
        &self,
        caps: &[String],
        localhost: Option<&[u8]>,
    ) -> Result<Option<Value>, SecurityError> {
        if self.privileged {
            return Ok(None);
        }
        match &self.seccomp {
            Seccomp::Unconfined => Ok(None),
            Seccomp::RuntimeDefault => Ok(Some(crate::seccomp_default::profile(caps))),
            Seccomp::Localhost(path) => {
                let bytes = localhost.ok_or_else(|| {
                    SecurityError::Seccomp(format!("profile {path} was not read"))
                })?;
                parse_profile(path, bytes).map(Some)
            }
        }
    }
}

/// A CRI capability name as OCI's `CAP_*`, checked against the kernel's.
fn cap_name(c: &str) -> Result<String, SecurityError> {
    let up = c.to_ascii_uppercase();
    let full = if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    };
    if ALL_CAPS.contains(&full.as_str()) {
        Ok(full)
    } else {
        Err(SecurityError::UnknownCapability(c.into()))
    }
}

fn check_path(what: &'static str, p: &str) -> Result<(), SecurityError> {
    let path = std::path::Path::new(p);
    let bad = !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    if bad {
        return Err(SecurityError::BadPath {
            what,
            path: p.into(),
        });
    }
    Ok(())
}

/// The seccomp field of CRI (or, when absent, the deprecated `seccomp_profile_path`) as a
/// [`Seccomp`]; `profile_type` is CRI's enum (0 RuntimeDefault, 1 Unconfined, 2 Localhost).
pub fn seccomp_from_cri(
    field: Option<(i32, &str)>,
    deprecated_path: &str,
) -> Result<Seccomp, SecurityError> {
    let localhost = |r: &str| -> Result<Seccomp, SecurityError> {
        let r = r.strip_prefix("localhost/").unwrap_or(r);
        if !r.starts_with('/') {
            return Err(SecurityError::Seccomp(format!(
                "Localhost profile {r:?} must be an absolute path on the node"
            )));
        }
        Ok(Seccomp::Localhost(r.into()))
    };
    match field {
        Some((t, r)) => {
            if t != 2 && !r.is_empty() {
                return Err(SecurityError::Seccomp(
                    "localhost_ref may only be set with profile type Localhost".into(),
                ));
            }
            match t {
                0 => Ok(Seccomp::RuntimeDefault),
                1 => Ok(Seccomp::Unconfined),
                2 => localhost(r),
                t => Err(SecurityError::Seccomp(format!("unknown profile type {t}"))),
            }
        }
        None => match deprecated_path {
            "" | "unconfined" => Ok(Seccomp::Unconfined),
            "runtime/default" | "docker/default" => Ok(Seccomp::RuntimeDefault),
            p if p.starts_with("localhost/") => localhost(p),
            p => Err(SecurityError::Seccomp(format!("unknown profile {p:?}"))),
        },
    }
}

/// A Localhost profile: an OCI `linux.seccomp` object with a `defaultAction`.
fn parse_profile(path: &str, bytes: &[u8]) -> Result<Value, SecurityError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| SecurityError::Seccomp(format!("profile {path} is not JSON: {e}")))?;
    let ok = v.as_object().is_some_and(|o| {
        o.get("defaultAction").is_some_and(Value::is_string)
            && o.get("syscalls").is_none_or(Value::is_array)
    });
    if !ok {
        return Err(SecurityError::Seccomp(format!(
            "profile {path} is not an OCI seccomp profile (an object with defaultAction and syscalls)"
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc() -> SecurityContext {
        SecurityContext::default()
    }

    #[test]
    fn capabilities_add_and_drop_with_all_first() {
        let mut s = sc();
        assert_eq!(s.capabilities().unwrap().len(), DEFAULT_CAPS.len());
        s.drop_capabilities = vec!["chown".into()];
        s.add_capabilities = vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()];
        let c = s.capabilities().unwrap();
        assert!(!c.contains(&"CAP_CHOWN".into()));
        assert!(c.contains(&"CAP_NET_ADMIN".into()) && c.contains(&"CAP_SYS_TIME".into()));
        s.add_capabilities = vec!["ALL".into()];
        s.drop_capabilities = vec!["CHOWN".into()];
        assert_eq!(s.capabilities().unwrap().len(), ALL_CAPS.len() - 1);
        s.add_capabilities = vec!["KILL".into()];
        s.drop_capabilities = vec!["all".into()];
        assert_eq!(s.capabilities().unwrap(), ["CAP_KILL"]);
        s.add_capabilities = vec!["NOPE".into()];
        assert_eq!(
            s.capabilities(),
            Err(SecurityError::UnknownCapability("NOPE".into()))
        );
        s.privileged = true;
        assert_eq!(s.capabilities().unwrap().len(), ALL_CAPS.len());
    }

    #[test]
    fn paths_default_override_and_vanish_when_privileged() {
        let mut s = sc();
        let (m, r) = s.paths().unwrap();
        assert_eq!(
            (m.len(), r.len()),
            (MASKED_PATHS.len(), READONLY_PATHS.len())
        );
        s.masked_paths = vec!["/proc/x".into()];
        assert_eq!(s.paths().unwrap().0, ["/proc/x"]);
        s.readonly_paths = vec!["/proc/../etc".into()];
        assert!(matches!(s.paths(), Err(SecurityError::BadPath { .. })));
        s.readonly_paths = vec!["rel".into()];
        assert!(matches!(s.paths(), Err(SecurityError::BadPath { .. })));
        s.privileged = true;
        assert_eq!(s.paths().unwrap(), (vec![], vec![]));
    }

    #[test]
    fn user_strings_follow_containerd() {
        let mut s = sc();
        assert_eq!(s.user_string(), Ok(None));
        s.run_as_group = Some(5);
        assert_eq!(s.user_string(), Err(SecurityError::GroupWithoutUser));
        s.run_as_user = Some(1000);
        assert_eq!(s.user_string(), Ok(Some("1000:5".into())));
        s.run_as_username = "user".into();
        assert_eq!(s.user_string(), Ok(Some("user:5".into())));
        s.run_as_group = None;
        assert_eq!(s.user_string(), Ok(Some("user".into())));
    }

    #[test]
    fn seccomp_choices_from_cri() {
        assert_eq!(seccomp_from_cri(None, ""), Ok(Seccomp::Unconfined));
        assert_eq!(
            seccomp_from_cri(None, "runtime/default"),
            Ok(Seccomp::RuntimeDefault)
        );
        assert_eq!(
            seccomp_from_cri(None, "localhost//p.json"),
            Ok(Seccomp::Localhost("/p.json".into()))
        );
        assert_eq!(
            seccomp_from_cri(Some((0, "")), ""),
            Ok(Seccomp::RuntimeDefault)
        );
        assert_eq!(seccomp_from_cri(Some((1, "")), ""), Ok(Seccomp::Unconfined));
        assert_eq!(
            seccomp_from_cri(Some((2, "/etc/p.json")), ""),
            Ok(Seccomp::Localhost("/etc/p.json".into()))
        );
        for bad in [Some((2, "rel.json")), Some((0, "/x")), Some((9, ""))] {
            assert!(seccomp_from_cri(bad, "").is_err(), "{bad:?}");
        }
        assert!(seccomp_from_cri(None, "bogus").is_err());
    }

    #[test]
    fn seccomp_profiles_per_choice() {
        let caps: Vec<String> = vec!["CAP_CHOWN".into()];
        let mut s = sc();
        assert_eq!(s.seccomp(&caps, None), Ok(None));
        s.seccomp = Seccomp::RuntimeDefault;
        assert!(s.seccomp(&caps, None).unwrap().is_some());
        s.seccomp = Seccomp::Localhost("/p".into());
        let p = br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#;
        assert_eq!(
            s.seccomp(&caps, Some(p)).unwrap().unwrap()["defaultAction"],
            "SCMP_ACT_ALLOW"
        );
        assert!(s.seccomp(&caps, Some(b"{nope")).is_err());
        assert!(s.seccomp(&caps, Some(b"[]")).is_err());
        s.privileged = true;
        assert_eq!(s.seccomp(&caps, Some(p)), Ok(None));
    }
}
