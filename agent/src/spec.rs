//! Turns the OCI spec the host sent into the one libcontainer runs: rootfs from the share,
//! cgroup under the sandbox's, namespaces joined to the sandbox's, mounts checked.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Mount, MountBuilder, Process,
    RootBuilder, Spec,
};

use crate::error::{AgentError, Result};
use crate::ids;
use husk_proto::agent as pb;

/// What the spec rewrite needs to know about the sandbox.
pub struct SandboxView<'a> {
    pub sandbox_id: &'a str,
    pub hostname: &'a str,
    /// The sandbox's resolv.conf, bound into containers that do not mount their own.
    pub resolv_conf: Option<&'a Path>,
    /// Network namespace to join; None = stay in the agent's (the guest's own).
    pub netns: Option<&'a Path>,
    /// Pid of the sandbox's first container's init, whose namespaces others join.
    pub first_init_pid: Option<i32>,
    /// Whether containers share the first container's PID namespace.
    pub shared_pid: bool,
    /// Root under which share tags are directories.
    pub share_root: &'a Path,
}

/// Parses `oci_spec_json`; InvalidArgument with serde's message on failure.
pub fn parse_spec(json: &[u8]) -> Result<Spec> {
    if json.is_empty() {
        return Err(AgentError::InvalidArgument(
            "oci_spec_json is empty: send the container's OCI runtime spec (config.json)".into(),
        ));
    }
    serde_json::from_slice(json).map_err(|e| {
        AgentError::InvalidArgument(format!(
            "oci_spec_json is not a valid OCI runtime spec: {e}"
        ))
    })
}

/// Parses an OCI process (for ExecProcess).
pub fn parse_process(json: &[u8]) -> Result<Process> {
    let p: Process = serde_json::from_slice(json).map_err(|e| {
        AgentError::InvalidArgument(format!("oci_process_json is not a valid OCI process: {e}"))
    })?;
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument(
            "oci_process_json has no args: give the command to run".into(),
        ));
    }
    Ok(p)
}

/// The cgroup path of a container: one per container under a per-sandbox parent.
pub fn cgroup_path(sandbox_id: &str, container_id: &str) -> PathBuf {
    PathBuf::from(format!("/husk/{sandbox_id}/{container_id}"))
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Filesystems a container may mount itself besides binds from a share: kernel pseudo
/// filesystems and memory-backed ones, none of which can reach the guest's own files.
/// Anything else (overlay with `lowerdir=/`, ext4 on a guest disk, virtiofs with another
/// tag) could expose what no share granted.
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

fn check_mount_type(destination: &str, typ: Option<&str>) -> Result<()> {
    match typ {
        Some(t) if PSEUDO_FILESYSTEMS.contains(&t) => Ok(()),
        Some(t) => Err(AgentError::InvalidArgument(format!(
            "mount on {destination}: type {t:?} is not allowed in a pod VM (bind mounts from a share, or one of {})",
            PSEUDO_FILESYSTEMS.join(", ")
        ))),
        None => Err(AgentError::InvalidArgument(format!(
            "mount on {destination} has no type and is not a bind mount"
        ))),
    }
}

fn check_destination(dest: &str) -> Result<()> {
    let p = Path::new(dest);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(AgentError::InvalidArgument(format!(
            "mount destination {dest:?} must be an absolute path without '..'"
        )));
    }
    Ok(())
}

/// Takes the `net.*` sysctls out of `spec` when the sandbox runs in the guest's own
/// network namespace (guest mode), for the agent to apply itself ([`apply_sysctls`]):
/// libcontainer takes that namespace for the host's and refuses them there, but in a VM
/// the guest's network is the pod's. Other sysctls stay for libcontainer (applied in the
/// container's IPC/UTS namespaces). In host mode nothing is taken.
pub fn take_net_sysctls(spec: &mut Spec, sb: &SandboxView<'_>) -> Vec<(String, String)> {
    if sb.netns.is_some() {
        return Vec::new();
    }
    let Some(sysctl) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.sysctl_mut().as_mut())
    else {
        return Vec::new();
    };
    let net: Vec<String> = sysctl
        .keys()
        .filter(|k| k.starts_with("net.") || k.starts_with("net/"))
        .cloned()
        .collect();
    let mut out: Vec<(String, String)> = net
        .into_iter()
        .filter_map(|k| sysctl.remove(&k).map(|v| (k, v)))
        .collect();
    out.sort();
    out
}

/// `/proc/sys` path of a sysctl named with dots (`net.ipv4.ip_forward`) or slashes; None
/// for a name that could leave `/proc/sys`.
pub fn sysctl_path(name: &str) -> Option<PathBuf> {
    let rel = if name.contains('/') {
        name.to_string()
    } else {
        name.replace('.', "/")
    };
    let ok = !rel.is_empty()
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    ok.then(|| Path::new("/proc/sys").join(rel))
}

/// Writes sysctls into `/proc/sys` of the agent's own namespaces (the guest's network).
pub fn apply_sysctls(list: &[(String, String)]) -> Result<()> {
    for (k, v) in list {
        let p = sysctl_path(k).ok_or_else(|| {
            AgentError::InvalidArgument(format!("sysctl {k:?}: not a valid name"))
        })?;
        std::fs::write(&p, v)
            .map_err(|e| AgentError::InvalidArgument(format!("sysctl {k}={v:?}: {e}")))?;
        tracing::info!(sysctl = %k, value = %v, "sysctl set in the guest's network namespace");
    }
    Ok(())
}

/// Rewrites `spec` for this sandbox. `rootfs` is the resolved rootfs directory.
pub fn prepare(
    spec: &mut Spec,
    container_id: &str,
    rootfs: &Path,
    extra_mounts: &[pb::Mount],
    sb: &SandboxView<'_>,
) -> Result<()> {
    let Some(process) = spec.process().clone() else {
        return Err(AgentError::InvalidArgument(
            "spec.process is missing: the container needs a process to run".into(),
        ));
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::InvalidArgument(
            "spec.process.args is empty: give the command to run".into(),
        ));
    }

    // Root: always the share directory we resolved; keep the readonly flag.
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    spec.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(readonly)
            .build()
            .map_err(|e| AgentError::internal("build root", e))?,
    ));

    // Mounts: bind sources must come from a share; then the extra mounts.
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in &mut mounts {
        let dest = m.destination().to_string_lossy().into_owned();
        check_destination(&dest)?;
        if !is_bind(m) {
            check_mount_type(&dest, m.typ().as_deref())?;
            continue;
        }
        let src = m.source().as_ref().ok_or_else(|| {
            AgentError::InvalidArgument(format!("bind mount on {dest} has no source"))
        })?;
        // Mount what was checked, not the path again: a symlink along it could be changed
        // to point outside the shares between the check and the mount.
        let resolved = ids::check_inside(sb.share_root, src, "bind mount source")?;
        m.set_source(Some(resolved));
    }
    for em in extra_mounts {
        mounts.push(extra_mount(em, sb.share_root)?);
    }
    if let Some(rc) = sb.resolv_conf {
        let has_own = mounts
            .iter()
            .any(|m| m.destination() == Path::new("/etc/resolv.conf"));
        if !has_own {
            mounts.push(
                MountBuilder::default()
                    .destination("/etc/resolv.conf")
                    .typ("bind")
                    .source(rc)
                    .options(vec![
                        "rbind".into(),
                        "ro".into(),
                        "nosuid".into(),
                        "nodev".into(),
                    ])
                    .build()
                    .map_err(|e| AgentError::internal("build resolv.conf mount", e))?,
            );
        }
    }
    spec.set_mounts(Some(mounts));

    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    linux.set_cgroups_path(Some(cgroup_path(sb.sandbox_id, container_id)));

    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    if !namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Mount)
    {
        return Err(AgentError::InvalidArgument(
            "spec.linux.namespaces has no mount namespace: containers must get their own".into(),
        ));
    }
    let mut set_hostname = true;
    for ns in namespaces.iter_mut() {
        let join_first = |t: &str| {
            sb.first_init_pid
                .map(|p| PathBuf::from(format!("/proc/{p}/ns/{t}")))
        };
        match ns.typ() {
            // Every container of the pod shares the sandbox's network.
            LinuxNamespaceType::Network => {
                ns.set_path(sb.netns.map(Path::to_path_buf));
            }
            // A pod shares IPC and UTS: join the first (pause) container's.
            LinuxNamespaceType::Ipc if ns.path().is_none() => {
                ns.set_path(join_first("ipc"));
            }
            LinuxNamespaceType::Uts if ns.path().is_none() => {
                if let Some(p) = join_first("uts") {
                    ns.set_path(Some(p));
                    set_hostname = false;
                }
            }
            LinuxNamespaceType::Pid if ns.path().is_none() && sb.shared_pid => {
                ns.set_path(join_first("pid"));
            }
            _ => {}
        }
    }
    match (
        sb.netns,
        namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Network),
    ) {
        // Host mode: never leave a container in the host's network namespace.
        (Some(p), false) => namespaces.push(ns(LinuxNamespaceType::Network, Some(p))?),
        // Guest mode: the guest's own namespace is the sandbox's; drop a request for a new one.
        (None, true) => namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network),
        _ => {}
    }
    let has_uts = namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Uts);
    linux.set_namespaces(Some(namespaces));

    if !set_hostname {
        // Joining the sandbox's UTS namespace: its hostname is already set.
        spec.set_hostname(None);
    } else if spec.hostname().is_none() && has_uts && !sb.hostname.is_empty() {
        spec.set_hostname(Some(sb.hostname.to_string()));
    }

    check_executable(spec, rootfs)?;
    tolerate_oom_score_adj(spec);
    Ok(())
}

/// PATH when the spec's env sets none (runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Refuses a spec whose program is not in the rootfs, with a message that says so; the
/// runtime would only report ENOENT from inside the container. Paths under a mount of the
/// spec (other than the rootfs) are given the benefit of the doubt.
fn check_executable(spec: &Spec, rootfs: &Path) -> Result<()> {
    match spec.process() {
        Some(p) => check_process_executable(p, spec, rootfs),
        None => Ok(()),
    }
}

/// Like [`check_executable`] for `process` run in the container of `spec` (for exec).
pub fn check_process_executable(process: &Process, spec: &Spec, rootfs: &Path) -> Result<()> {
    let Some(arg0) = process.args().as_ref().and_then(|a| a.first()) else {
        return Ok(());
    };
    let path_var = process
        .env()
        .as_ref()
        .and_then(|env| env.iter().find_map(|e| e.strip_prefix("PATH=")))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let candidates: Vec<PathBuf> = if arg0.contains('/') {
        vec![process.cwd().join(arg0)]
    } else {
        path_var
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| Path::new(d).join(arg0))
            .collect()
    };
    let mounted: Vec<PathBuf> = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| m.destination().clone())
        .filter(|d| d != Path::new("/"))
        .collect();
    for c in &candidates {
        if mounted.iter().any(|m| c.starts_with(m)) || exists_in_root(rootfs, c) {
            return Ok(());
        }
    }
    Err(AgentError::InvalidArgument(format!(
        "process.args[0] {arg0:?} is not in the container's rootfs{}: fix the command or the image",
        if arg0.contains('/') {
            String::new()
        } else {
            format!(" (searched PATH={path_var})")
        }
    )))
}

/// Whether `path` exists inside `root`, resolving symlinks as if `root` were `/`.
fn exists_in_root(root: &Path, path: &Path) -> bool {
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_os_string()),
            std::path::Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut cur = PathBuf::new(); // relative to root
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let Ok(meta) = std::fs::symlink_metadata(root.join(&next)) else {
            return false;
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return false;
            }
            let Ok(target) = std::fs::read_link(root.join(&next)) else {
                return false;
            };
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            for c in target.components().rev() {
                match c {
                    std::path::Component::Normal(n) => todo.push(n.to_os_string()),
                    std::path::Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            cur = next;
        }
    }
    true
}

fn ns(typ: LinuxNamespaceType, path: Option<&Path>) -> Result<LinuxNamespace> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p);
    }
    b.build()
        .map_err(|e| AgentError::internal("build namespace", e))
}

fn extra_mount(em: &pb::Mount, share_root: &Path) -> Result<Mount> {
    check_destination(&em.destination)?;
    let typ = if em.type_.is_empty() {
        "bind"
    } else {
        em.type_.as_str()
    };
    let bind = typ == "bind" || em.options.iter().any(|o| o == "bind" || o == "rbind");
    if !bind {
        check_mount_type(&em.destination, Some(typ))?;
    }
    let source = if bind {
        if em.share_tag.is_empty() {
            return Err(AgentError::InvalidArgument(format!(
                "bind mount on {} has no share_tag: bind sources must come from a share",
                em.destination
            )));
        }
        ids::validate_id("share tag", &em.share_tag)?;
        ids::resolve_within(
            &share_root.join(&em.share_tag),
            &em.source,
            "bind mount source",
        )?
    } else {
        PathBuf::from(if em.source.is_empty() {
            typ
        } else {
            em.source.as_str()
        })
    };
    MountBuilder::default()
        .destination(&em.destination)
        .typ(typ)
        .source(source)
        .options(em.options.clone())
        .build()
        .map_err(|e| AgentError::internal("build mount", e))
}

/// Without CAP_SYS_RESOURCE (as root on some hosts) lowering oom_score_adj fails with EPERM
/// and the whole container with it. Keep the container working: raise a negative request
/// to what we may set, and say so.
fn tolerate_oom_score_adj(spec: &mut Spec) {
    let Some(process) = spec.process_mut() else {
        return;
    };
    let Some(want) = process.oom_score_adj() else {
        return;
    };
    if want >= 0 || has_cap_sys_resource() {
        return;
    }
    let ours = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(0);
    if want < ours {
        tracing::warn!(
            want,
            set = ours,
            "no CAP_SYS_RESOURCE: cannot lower oom_score_adj; using the agent's"
        );
        process.set_oom_score_adj(Some(ours));
    }
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_mounts(mounts: serde_json::Value) -> Spec {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts,
        });
        parse_spec(json.to_string().as_bytes()).unwrap()
    }

    fn prepare_in(share_root: &Path, spec: &mut Spec) -> Result<()> {
        let rootfs = share_root.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/true"), "").unwrap();
        let view = SandboxView {
            sandbox_id: "sb",
            hostname: "",
            resolv_conf: None,
            netns: None,
            first_init_pid: None,
            shared_pid: false,
            share_root,
        };
        prepare(spec, "c1", &rootfs, &[], &view)
    }

    #[test]
    fn net_sysctls_are_taken_out_in_guest_mode_only() {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"sysctl": {
                "net.ipv4.ip_forward": "1",
                "net/core/somaxconn": "1024",
                "kernel.shm_rmid_forced": "1"
            }}
        });
        let mut view = SandboxView {
            sandbox_id: "sb",
            hostname: "",
            resolv_conf: None,
            netns: None,
            first_init_pid: None,
            shared_pid: false,
            share_root: Path::new("/"),
        };
        let mut spec = parse_spec(json.to_string().as_bytes()).unwrap();
        assert_eq!(
            take_net_sysctls(&mut spec, &view),
            [
                ("net.ipv4.ip_forward".to_string(), "1".to_string()),
                ("net/core/somaxconn".to_string(), "1024".to_string())
            ]
        );
        let left = spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(left.keys().collect::<Vec<_>>(), ["kernel.shm_rmid_forced"]);
        // Host mode: the container has a netns of its own; libcontainer applies them all.
        let netns = PathBuf::from("/var/run/netns/x");
        view.netns = Some(&netns);
        let mut spec = parse_spec(json.to_string().as_bytes()).unwrap();
        assert!(take_net_sysctls(&mut spec, &view).is_empty());
        assert_eq!(
            spec.linux()
                .as_ref()
                .unwrap()
                .sysctl()
                .as_ref()
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn sysctl_names_map_into_proc_sys_only() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward"))
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding"),
            Some(PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding"))
        );
        for bad in ["", "net/../../etc/passwd", "/net/x", "net..x", "net/./x"] {
            assert_eq!(sysctl_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn mounts_that_could_reach_guest_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for (typ, src, opts) in [
            ("overlay", "overlay", vec!["lowerdir=/"]),
            ("ext4", "/dev/vda", vec![]),
            ("virtiofs", "husk-embedded", vec![]),
        ] {
            let mut spec = spec_with_mounts(serde_json::json!([
                {"destination": "/x", "type": typ, "source": src, "options": opts}
            ]));
            let err = prepare_in(d.path(), &mut spec).unwrap_err().to_string();
            assert!(err.contains("not allowed"), "{typ}: {err}");
        }
        let mut ok = spec_with_mounts(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}
        ]));
        prepare_in(d.path(), &mut ok).unwrap();
    }

    #[test]
    fn a_bind_mounts_the_path_that_was_checked() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("tag");
        std::fs::create_dir_all(share.join("data")).unwrap();
        std::os::unix::fs::symlink("data", share.join("link")).unwrap();
        let mut spec = spec_with_mounts(serde_json::json!([
            {"destination": "/v", "type": "bind", "source": share.join("link"), "options": ["rbind"]}
        ]));
        prepare_in(d.path(), &mut spec).unwrap();
        let m = &spec.mounts().as_ref().unwrap()[0];
        assert_eq!(
            m.source().as_deref(),
            Some(share.join("data").canonicalize().unwrap().as_path())
        );
    }

    #[test]
    fn exists_in_root_resolves_symlinks_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("usr/bin/prog"), "").unwrap();
        std::os::unix::fs::symlink("/usr/bin", r.join("bin")).unwrap(); // absolute: inside root
        std::os::unix::fs::symlink("../../etc/passwd", r.join("usr/bin/esc")).unwrap();
        assert!(exists_in_root(r, std::path::Path::new("/bin/prog")));
        assert!(exists_in_root(r, std::path::Path::new("/usr/bin/prog")));
        assert!(!exists_in_root(r, std::path::Path::new("/bin/nope")));
        // ../../etc/passwd stays inside the root, where there is no etc/passwd.
        assert!(!exists_in_root(r, std::path::Path::new("/usr/bin/esc")));
    }
}
