//! The OCI runtime spec `husk run` gives its container: what `runc spec` writes, plus a
//! tmpfs `/tmp` (the embedded images are read-only) and the container's cgroup at
//! `/sys/fs/cgroup`, as containerd's CRI plugin mounts it. No hostname: the pod's applies.

use serde_json::{json, Value};

/// Capabilities of a default container (runc's defaults).
const DEFAULT_CAPS: &[&str] = &["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// A default spec running `args` as root in `/`, with `env` added to the default `PATH`
/// and `TERM`, and a pty when `terminal`.
pub fn default_spec(args: &[String], env: &[String], terminal: bool) -> Value {
    let mut envs = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "TERM=xterm".to_string(),
    ];
    envs.extend(env.iter().cloned());
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": envs,
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_args_env_and_terminal() {
        let s = default_spec(
            &["sh".into(), "-c".into(), "true".into()],
            &["A=1".into()],
            true,
        );
        assert_eq!(s["process"]["args"], json!(["sh", "-c", "true"]));
        assert_eq!(s["process"]["terminal"], json!(true));
        let env = s["process"]["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e == "A=1"));
        assert!(env.iter().any(|e| e.as_str().unwrap().starts_with("PATH=")));
        // The agent parses specs with oci-spec: this one must pass.
        let spec: oci_spec::runtime::Spec = serde_json::from_value(s).unwrap();
        assert_eq!(
            spec.hostname().as_deref(),
            None,
            "containers take the pod's hostname"
        );
    }
}
