//! Turning the OCI specs containerd writes for a host runtime into what the pod's VM can
//! run: sizing the VM from the sandbox annotations, and rewriting a container's spec so
//! that nothing in it names a host path the guest cannot see.
//!
//! What the rewrite does (containerd 1.6's CRI specs, `reference/containerd-shim-v2.md` 16):
//! - namespace `path`s (the CNI netns, `/proc/<pid>/ns/*` of the sandbox task) are dropped:
//!   inside the VM every container gets the guest's own network, new namespaces otherwise;
//! - `/dev/shm` becomes a guest tmpfs (CRI binds the sandbox's host shm);
//! - other bind mounts of host files and directories (hosts, hostname, resolv.conf,
//!   hostPath, emptyDir) are returned as [`HostBind`]s, to be bind-mounted into the pod's
//!   shared directory and mounted from the share in the guest;
//! - `root.path` is left alone: the agent takes the rootfs from the request, not the spec.

use serde_json::{json, Value};

use super::config::VmSection;

/// CRI's sandbox sizing annotations (containerd 1.6, set when kubelet sends pod resources).
const ANN_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const ANN_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const ANN_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The VM's size for a sandbox spec: its limits (if any) plus the configured overhead,
/// else the defaults; capped by the configured maxima.
pub fn vm_size(spec: &Value, vm: &VmSection) -> (u8, u32) {
    let ann = &spec["annotations"];
    let num = |k: &str| {
        ann[k]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    let mem = match num(ANN_MEMORY) {
        Some(bytes) => (bytes.div_ceil(1 << 20) as u32).saturating_add(vm.memory_overhead_mib),
        None => vm.default_memory_mib,
    };
    let cpus = match (num(ANN_CPU_QUOTA), num(ANN_CPU_PERIOD)) {
        (Some(q), Some(p)) => (q as f64 / p as f64 + vm.cpu_overhead).ceil().max(1.0) as u32,
        _ => vm.default_vcpus as u32,
    };
    (
        cpus.min(vm.max_vcpus as u32) as u8,
        mem.clamp(64, vm.max_memory_mib),
    )
}

/// The network namespace the sandbox spec names (the one CNI configured), if any.
pub fn netns_path(spec: &Value) -> Option<std::path::PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|ns| ns["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(Into::into)
}

/// A host path the container bind-mounts, to be exposed through the pod's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBind {
    pub source: String,
    pub destination: String,
    pub options: Vec<String>,
}

/// Rewrites `spec` for the guest (see the module doc); returns the host binds it removed.
pub fn for_guest(spec: &mut Value) -> Vec<HostBind> {
    if let Some(nss) = spec["linux"]["namespaces"].as_array_mut() {
        for ns in nss.iter_mut() {
            if let Some(o) = ns.as_object_mut() {
                o.remove("path");
            }
        }
    }
    let mut binds = Vec::new();
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        let mut kept = Vec::new();
        for m in mounts.drain(..) {
            let dest = m["destination"].as_str().unwrap_or("").to_string();
            let options: Vec<String> = m["options"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|o| o.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let is_bind = m["type"].as_str() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            if dest == "/dev/shm" && is_bind {
                kept.push(
                    json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
                );
            } else if is_bind && m["source"].as_str().is_some_and(|s| s.starts_with('/')) {
                binds.push(HostBind {
                    source: m["source"].as_str().unwrap_or("").into(),
                    destination: dest,
                    options,
                });
            } else {
                kept.push(m);
            }
        }
        *mounts = kept;
    }
    binds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_annotations_with_overhead_or_defaults() {
        let vm = VmSection::default();
        assert_eq!(
            vm_size(&json!({}), &vm),
            (vm.default_vcpus, vm.default_memory_mib)
        );
        let spec = json!({"annotations": {
            "io.kubernetes.cri.sandbox-memory": "268435456",
            "io.kubernetes.cri.sandbox-cpu-quota": "150000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000"}});
        assert_eq!(vm_size(&spec, &vm), (2, 256 + vm.memory_overhead_mib));
        let huge = json!({"annotations": {"io.kubernetes.cri.sandbox-memory": "999999999999999"}});
        assert_eq!(vm_size(&huge, &vm).1, vm.max_memory_mib);
    }

    #[test]
    fn rewrites_host_paths_out_of_a_cri_spec() {
        let mut spec = json!({
            "linux": {"namespaces": [
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "mount"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts",
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm",
                 "options": ["rbind", "ro"]}]
        });
        assert_eq!(
            netns_path(&spec).as_deref(),
            Some(std::path::Path::new("/var/run/netns/cni-1"))
        );
        let binds = for_guest(&mut spec);
        assert_eq!(
            netns_path(&spec),
            None,
            "the guest's spec names no host netns"
        );
        assert!(spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.get("path").is_none()));
        assert_eq!(binds.len(), 1);
        assert_eq!(binds[0].source, "/var/lib/x/hosts");
        assert_eq!(binds[0].destination, "/etc/hosts");
        let mounts = spec["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1]["type"], "tmpfs");
        assert_eq!(mounts[1]["destination"], "/dev/shm");
    }
}
