//! An app container's OCI runtime spec and rootfs mount, built the way containerd 1.6's CRI
//! plugin builds them for a VM runtime (`reference/containerd-shim-v2.md` 15-16): the
//! process from the container config over the image config's defaults (Docker's rules for
//! entrypoint/cmd), containerd's default mounts, capabilities and masked paths, the pod's
//! netns by path, and the `io.kubernetes.cri.*` annotations that make our shim put the
//! container in the pod's VM. Pure functions: no I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::security_context::{SecurityContext, SecurityError};
use crate::users::{ProcessUser, UserError};

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command: the container config has no command or args and the image no entrypoint or cmd")]
    NoCommand,
    #[error("user: {0}")]
    User(#[from] UserError),
    #[error("security context: {0}")]
    Security(#[from] SecurityError),
    #[error("image config: {0}")]
    ImageConfig(String),
}

/// What huskd needs of a CRI ContainerConfig.
#[derive(Clone, Debug, Default, serde::Serialize, Deserialize)]
pub struct ContainerConfig {
    pub name: String,
    pub attempt: u32,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub envs: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub log_path: String,
    pub mounts: Vec<BindMount>,
    /// The security context (records of an older huskd have none: its defaults).
    #[serde(default)]
    pub security: SecurityContext,
    /// The container keeps a stdin open for attached clients (`stdin_once`: until the first
    /// one detaches); `tty`: it runs on a terminal. Absent from records of older huskds.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    #[serde(default)]
    pub tty: bool,
    /// The container's resource limits at creation, as OCI `linux.resources` (kubelet's
    /// memory and CPU limits; null: none).
    #[serde(default)]
    pub resources: serde_json::Value,
}

/// A host path bind-mounted into the container.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct BindMount {
    pub host_path: String,
    pub container_path: String,
    pub readonly: bool,
}

/// The run defaults of an image config (`config` of the OCI image config).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

impl ImageConfig {
    /// From an OCI/Docker image config blob.
    pub fn parse(blob: &[u8]) -> Result<ImageConfig, SpecError> {
        #[derive(Deserialize)]
        struct Outer {
            #[serde(default)]
            config: Option<ImageConfig>,
        }
        let o: Outer =
            serde_json::from_slice(blob).map_err(|e| SpecError::ImageConfig(e.to_string()))?;
        Ok(o.config.unwrap_or_default())
    }
}

/// The pod a container joins.
#[derive(Clone, Debug)]
pub struct PodView<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub hostname: &'a str,
    pub netns: &'a Path,
    /// The pod's files bind-mounted into each container: (destination, host file).
    pub etc_files: &'a [(&'a str, &'a Path)],
}

/// argv per Docker's rules: the config's command replaces the image's entrypoint (and its
/// cmd); the config's args replace the image's cmd.
pub fn argv(c: &ContainerConfig, img: &ImageConfig) -> Result<Vec<String>, SpecError> {
    let mut argv = if c.command.is_empty() {
        img.entrypoint.clone().unwrap_or_default()
    } else {
        c.command.clone()
    };
    if !c.args.is_empty() {
        argv.extend(c.args.iter().cloned());
    } else if c.command.is_empty() {
        argv.extend(img.cmd.clone().unwrap_or_default());
    }
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(argv)
}

/// The image's env, then the config's, a later value of a name replacing an earlier one in
/// place; PATH defaulted when neither sets it.
pub fn env(c: &ContainerConfig, img: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match out.iter_mut().find(|(n, _)| n == k) {
        Some(e) => e.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    if !hostname.is_empty() {
        set("HOSTNAME", hostname);
    }
    for e in img.env.iter().flatten() {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        set(k, v);
    }
    for (k, v) in &c.envs {
        set(k, v);
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        let (k, v) = DEFAULT_PATH.split_once('=').expect("PATH=...");
        out.insert(0, (k.into(), v.into()));
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// What the security context resolved to with the image's files (see
/// `containers/security.rs`): the process user and the seccomp profile.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub user: ProcessUser,
    pub seccomp: Option<Value>,
}

/// The OCI `process` of the container (ExecSync reuses it with other args).
pub fn process(
    c: &ContainerConfig,
    img: &ImageConfig,
    hostname: &str,
    res: &Resolved,
) -> Result<Value, SpecError> {
    let cwd = [
        c.working_dir.as_str(),
        img.working_dir.as_deref().unwrap_or(""),
    ]
    .into_iter()
    .find(|d| !d.is_empty())
    .unwrap_or("/")
    .to_string();
    let caps = c.security.capabilities()?;
    let mut p = json!({
        "terminal": false,
        "user": {
            "uid": res.user.uid, "gid": res.user.gid,
            "additionalGids": res.user.additional_gids,
        },
        "args": argv(c, img)?,
        "env": env(c, img, hostname),
        "cwd": cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps
        },
    });
    // Only when set: an explicit `false` makes the runtime (libcontainer) load seccomp
    // after dropping capabilities, where the kernel refuses it without no_new_privs.
    if c.security.no_new_privs {
        p["noNewPrivileges"] = true.into();
    }
    Ok(p)
}

/// containerd's default mounts of a container (the sandbox's too): without a `/dev` tmpfs
/// the runtime has no `/dev/null` to give a process without stdio.
pub fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

/// The container's config.json.
pub fn container_spec(
    c: &ContainerConfig,
    img: &ImageConfig,
    image_name: &str,
    pod: &PodView,
    res: &Resolved,
) -> Result<Value, SpecError> {
    let mut ann = c.annotations.clone();
    for (k, v) in [
        ("container-type", "container"),
        ("sandbox-id", pod.id),
        ("sandbox-name", pod.name),
        ("sandbox-namespace", pod.namespace),
        ("sandbox-uid", pod.uid),
        ("container-name", c.name.as_str()),
        ("image-name", image_name),
    ] {
        ann.insert(format!("io.kubernetes.cri.{k}"), v.to_string());
    }
    let sec = &c.security;
    let mut mounts = default_mounts();
    if sec.privileged {
        // containerd's privileged containers get a writable /sys and cgroupfs (inside the
        // guest).
        for m in mounts.iter_mut() {
            if m["destination"] == "/sys" || m["destination"] == "/sys/fs/cgroup" {
                for o in m["options"].as_array_mut().into_iter().flatten() {
                    if o == "ro" {
                        *o = "rw".into();
                    }
                }
            }
        }
    }
    for m in &c.mounts {
        mounts.push(json!({
            "destination": m.container_path, "type": "bind", "source": m.host_path,
            "options": ["rbind", "rprivate", if m.readonly { "ro" } else { "rw" }]
        }));
    }
    // The pod's resolv.conf and hostname, unless the config mounts its own there (as
    // containerd does); writable unless the rootfs is read-only.
    for (dest, src) in pod.etc_files {
        if src.exists() && !c.mounts.iter().any(|m| m.container_path == *dest) {
            mounts.push(json!({
                "destination": dest, "type": "bind", "source": src,
                "options": ["rbind", "rprivate", if sec.readonly_rootfs { "ro" } else { "rw" }]
            }));
        }
    }
    let (masked, readonly) = sec.paths()?;
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": process(c, img, pod.hostname, res)?,
        "root": {"path": "rootfs", "readonly": sec.readonly_rootfs},
        "mounts": mounts,
        "annotations": ann,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": pod.netns}
            ],
            "maskedPaths": masked,
            "readonlyPaths": readonly
        }
    });
    if let Some(profile) = &res.seccomp {
        spec["linux"]["seccomp"] = profile.clone();
    }
    // The guest's cgroups are v2: as containerd does there, a cgroup namespace (unless
    // privileged) shows the container its own cgroup at /sys/fs/cgroup.
    if !sec.privileged {
        if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
            ns.push(json!({"type": "cgroup"}));
        }
    }
    if c.resources.as_object().is_some_and(|r| !r.is_empty()) {
        spec["linux"]["resources"] = c.resources.clone();
    }
    // The pod's hostname, as containerd sets it (the agent drops it where the container
    // joins the sandbox's UTS namespace, which already has it).
    if !pod.hostname.is_empty() {
        spec["hostname"] = pod.hostname.into();
    }
    Ok(spec)
}

/// A rootfs mount as the shim's task Create takes it (`containerd.types.Mount`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The overlay of an image's layers (`lowers`, bottom layer first) under the container's
/// own upper and work dirs, in containerd's overlayfs snapshotter's form (overlayfs wants
/// the top layer first in `lowerdir`).
pub fn overlay_mount(lowers: &[PathBuf], upper: &Path, work: &Path) -> RootfsMount {
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    RootfsMount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            "index=off".into(),
            format!("workdir={}", work.display()),
            format!("upperdir={}", upper.display()),
            format!("lowerdir={}", lowerdir.join(":")),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(entry: &[&str], cmd: &[&str]) -> ImageConfig {
        let v = |a: &[&str]| (!a.is_empty()).then(|| a.iter().map(|s| s.to_string()).collect());
        ImageConfig {
            entrypoint: v(entry),
            cmd: v(cmd),
            ..Default::default()
        }
    }

    fn cfg(command: &[&str], args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            name: "c".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn argv_follows_dockers_entrypoint_and_cmd_rules() {
        let i = img(&["/ep"], &["dflt"]);
        assert_eq!(argv(&cfg(&[], &[]), &i).unwrap(), ["/ep", "dflt"]);
        assert_eq!(argv(&cfg(&[], &["a"]), &i).unwrap(), ["/ep", "a"]);
        assert_eq!(argv(&cfg(&["sh"], &[]), &i).unwrap(), ["sh"]);
        assert_eq!(
            argv(&cfg(&["sh"], &["-c", "x"]), &i).unwrap(),
            ["sh", "-c", "x"]
        );
        assert_eq!(argv(&cfg(&[], &["x"]), &img(&[], &["y"])).unwrap(), ["x"]);
        assert_eq!(
            argv(&cfg(&[], &[]), &img(&[], &[])),
            Err(SpecError::NoCommand)
        );
    }

    #[test]
    fn env_layers_config_over_image_and_defaults_path() {
        let i = ImageConfig {
            env: Some(vec!["A=1".into(), "PATH=/bin".into()]),
            ..Default::default()
        };
        let mut c = cfg(&["x"], &[]);
        c.envs = vec![("A".into(), "2".into()), ("B".into(), "3".into())];
        assert_eq!(env(&c, &i, "h"), ["HOSTNAME=h", "A=2", "PATH=/bin", "B=3"]);
        assert_eq!(env(&c, &ImageConfig::default(), "")[0], DEFAULT_PATH);
    }

    fn root() -> Resolved {
        Resolved {
            user: ProcessUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![0],
                name: Some("root".into()),
            },
            seccomp: None,
        }
    }

    fn pod(netns: &Path) -> PodView<'_> {
        PodView {
            id: "pod1",
            name: "p",
            namespace: "default",
            uid: "u",
            hostname: "host",
            netns,
            etc_files: &[],
        }
    }

    #[test]
    fn resources_at_creation_become_the_specs_linux_resources() {
        let netns = PathBuf::from("/n");
        let mut c = cfg(&["sh"], &[]);
        let i = ImageConfig::default();
        let s = container_spec(&c, &i, "b", &pod(&netns), &root()).unwrap();
        assert!(s["linux"].get("resources").is_none());
        c.resources = json!({"memory": {"limit": 16777216}, "cpu": {"shares": 512}});
        let s = container_spec(&c, &i, "b", &pod(&netns), &root()).unwrap();
        assert_eq!(s["linux"]["resources"], c.resources);
    }

    #[test]
    fn the_security_context_shapes_the_spec() {
        let netns = PathBuf::from("/n");
        let mut c = cfg(&["sh"], &[]);
        let i = ImageConfig::default();
        let s = container_spec(&c, &i, "b", &pod(&netns), &root()).unwrap();
        assert_eq!(
            s["process"]["user"],
            json!({"uid": 0, "gid": 0, "additionalGids": [0]})
        );
        assert!(s["process"].get("noNewPrivileges").is_none());
        assert!(s["linux"].get("seccomp").is_none());
        assert_eq!(s["linux"]["maskedPaths"].as_array().unwrap().len(), 10);
        assert_eq!(s["root"]["readonly"], false);

        c.security.readonly_rootfs = true;
        c.security.no_new_privs = true;
        c.security.drop_capabilities = vec!["CHOWN".into()];
        c.security.masked_paths = vec!["/proc/version".into()];
        let res = Resolved {
            user: ProcessUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![1000, 10],
                name: Some("user".into()),
            },
            seccomp: Some(json!({"defaultAction": "SCMP_ACT_ALLOW"})),
        };
        let s = container_spec(&c, &i, "b", &pod(&netns), &res).unwrap();
        assert_eq!(
            s["process"]["user"],
            json!({"uid": 1000, "gid": 1000, "additionalGids": [1000, 10]})
        );
        assert_eq!(s["process"]["noNewPrivileges"], true);
        assert_eq!(s["root"]["readonly"], true);
        let caps = &s["process"]["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            assert!(!caps[set].as_array().unwrap().contains(&json!("CAP_CHOWN")));
            assert!(caps[set].as_array().unwrap().contains(&json!("CAP_KILL")));
        }
        assert_eq!(s["linux"]["maskedPaths"], json!(["/proc/version"]));
        assert_eq!(s["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");

        // Privileged: every capability, nothing masked, /sys writable.
        c.security.privileged = true;
        let s = container_spec(&c, &i, "b", &pod(&netns), &root()).unwrap();
        assert_eq!(
            s["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            crate::security_context::ALL_CAPS.len()
        );
        assert_eq!(s["linux"]["maskedPaths"], json!([]));
        assert_eq!(s["linux"]["readonlyPaths"], json!([]));
        let sys = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(sys["options"].as_array().unwrap().contains(&json!("rw")));
        let cgroupfs = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys/fs/cgroup")
            .unwrap();
        assert!(cgroupfs["options"]
            .as_array()
            .unwrap()
            .contains(&json!("rw")));
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(!ns.contains(&json!({"type": "cgroup"})), "{ns:?}");
    }

    #[test]
    fn the_spec_joins_the_pod_with_cri_annotations() {
        let netns = PathBuf::from("/var/run/netns/husk-x");
        let pod = PodView {
            id: "pod1",
            name: "p",
            namespace: "default",
            uid: "u",
            hostname: "host",
            netns: &netns,
            etc_files: &[],
        };
        let mut c = cfg(&["sh"], &["-c", "echo hi"]);
        c.working_dir = "/tmp".into();
        c.annotations.insert("mine".into(), "1".into());
        c.mounts.push(BindMount {
            host_path: "/h".into(),
            container_path: "/c".into(),
            readonly: true,
        });
        let i = ImageConfig::parse(br#"{"config":{"WorkingDir":"/w","Env":["X=y"]}}"#).unwrap();
        let s = container_spec(&c, &i, "busybox:1", &pod, &root()).unwrap();
        let a = &s["annotations"];
        assert_eq!(a["io.kubernetes.cri.container-type"], "container");
        assert_eq!(a["io.kubernetes.cri.sandbox-id"], "pod1");
        assert_eq!(a["io.kubernetes.cri.image-name"], "busybox:1");
        assert_eq!(a["mine"], "1");
        assert_eq!(s["process"]["args"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(s["process"]["cwd"], "/tmp");
        assert!(s["process"]["env"]
            .as_array()
            .unwrap()
            .contains(&json!("X=y")));
        assert_eq!(s["root"]["path"], "rootfs");
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "network", "path": "/var/run/netns/husk-x"})));
        assert!(ns.contains(&json!({"type": "cgroup"})), "{ns:?}");
        let m = s["mounts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(m["source"], "/h");
        assert_eq!(m["options"], json!(["rbind", "rprivate", "ro"]));
        assert_eq!(s["hostname"], "host");
        // The image's WorkingDir when the config has none.
        c.working_dir.clear();
        let s = container_spec(&c, &i, "busybox:1", &pod, &root()).unwrap();
        assert_eq!(s["process"]["cwd"], "/w");
    }

    #[test]
    fn the_overlay_lists_the_top_layer_first() {
        let m = overlay_mount(
            &["/l/bottom".into(), "/l/top".into()],
            Path::new("/c/upper"),
            Path::new("/c/work"),
        );
        assert_eq!(m.kind, "overlay");
        assert_eq!(
            m.options,
            [
                "index=off",
                "workdir=/c/work",
                "upperdir=/c/upper",
                "lowerdir=/l/top:/l/bottom"
            ]
        );
    }
}
