//! `husk check --node`: what the Kubernetes container-runtime docs ask of a node, beside
//! KVM: the `overlay` and `br_netfilter` modules, `net.bridge.bridge-nf-call-iptables` and
//! `net.ipv4.ip_forward` at 1, a CNI network config, and huskd's CRI socket accepting
//! connections. Each finding says how to fix it.

use std::path::{Path, PathBuf};

/// One requirement and what this node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub what: &'static str,
    /// None: met. Some: what is wrong and how to fix it.
    pub problem: Option<String>,
}

/// Where the checks look: the real node's paths, or a test's.
pub struct NodePaths {
    /// `/proc` (filesystems, sys/).
    pub proc: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub huskd_socket: PathBuf,
}

impl Default for NodePaths {
    fn default() -> NodePaths {
        NodePaths {
            proc: "/proc".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            huskd_socket: "/run/husk/huskd.sock".into(),
        }
    }
}

const MODULES_FIX: &str = "and list it in /etc/modules-load.d/k8s.conf to load it at boot";
const SYSCTL_FIX: &str = "and put the line in /etc/sysctl.d/k8s.conf to keep it";

fn sysctl_is_one(proc: &Path, name: &str) -> Result<(), String> {
    let path = proc.join("sys").join(name.replace('.', "/"));
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(v) => Err(format!(
            "{name} is {}; run `sysctl -w {name}=1` {SYSCTL_FIX}",
            v.trim()
        )),
        Err(e) => Err(format!("{name}: cannot read {}: {e}", path.display())),
    }
}

/// Every requirement, in the docs' order.
pub fn check_node(p: &NodePaths) -> Vec<Finding> {
    let filesystems = std::fs::read_to_string(p.proc.join("filesystems")).unwrap_or_default();
    let overlay = filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"));
    let bridge_nf = p.proc.join("sys/net/bridge").is_dir();
    let cni_configs: Vec<String> = std::fs::read_dir(&p.cni_conf_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    [".conflist", ".conf", ".json"]
                        .iter()
                        .any(|s| n.ends_with(s))
                })
                .collect()
        })
        .unwrap_or_default();
    let socket = &p.huskd_socket;
    vec![
        Finding {
            what: "the overlay module",
            problem: (!overlay)
                .then(|| format!("overlay is not loaded; run `modprobe overlay` {MODULES_FIX}")),
        },
        Finding {
            what: "the br_netfilter module",
            problem: (!bridge_nf).then(|| {
                format!("br_netfilter is not loaded; run `modprobe br_netfilter` {MODULES_FIX}")
            }),
        },
        Finding {
            what: "net.bridge.bridge-nf-call-iptables = 1",
            // Without br_netfilter the key does not exist: that finding already says so.
            problem: if bridge_nf {
                sysctl_is_one(&p.proc, "net.bridge.bridge-nf-call-iptables").err()
            } else {
                Some("needs br_netfilter (above)".into())
            },
        },
        Finding {
            what: "net.ipv4.ip_forward = 1",
            problem: sysctl_is_one(&p.proc, "net.ipv4.ip_forward").err(),
        },
        Finding {
            what: "a CNI network config",
            problem: cni_configs.is_empty().then(|| {
                format!(
                    "no *.conflist, *.conf or *.json in {}: install your pod network's CNI \
                     config there (huskd reads [huskd.cni] conf_dir)",
                    p.cni_conf_dir.display()
                )
            }),
        },
        Finding {
            what: "huskd's CRI socket",
            problem: std::os::unix::net::UnixStream::connect(socket)
                .err()
                .map(|e| {
                    format!(
                        "{} does not accept connections ({e}); start huskd \
                         (`systemctl enable --now huskd`, unit in cri/huskd.service)",
                        socket.display()
                    )
                }),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &Path, good: bool) -> NodePaths {
        let proc = dir.join("proc");
        std::fs::create_dir_all(proc.join("sys/net/ipv4")).unwrap();
        let fs = if good {
            "nodev\tproc\nnodev\toverlay\n"
        } else {
            "nodev\tproc\n"
        };
        std::fs::write(proc.join("filesystems"), fs).unwrap();
        std::fs::write(
            proc.join("sys/net/ipv4/ip_forward"),
            if good { "1\n" } else { "0\n" },
        )
        .unwrap();
        if good {
            std::fs::create_dir_all(proc.join("sys/net/bridge")).unwrap();
            std::fs::write(proc.join("sys/net/bridge/bridge-nf-call-iptables"), "1\n").unwrap();
        }
        let cni = dir.join("net.d");
        std::fs::create_dir_all(&cni).unwrap();
        if good {
            std::fs::write(cni.join("10-pods.conflist"), "{}").unwrap();
        }
        NodePaths {
            proc,
            cni_conf_dir: cni,
            huskd_socket: dir.join("huskd.sock"),
        }
    }

    #[test]
    fn a_ready_node_meets_every_requirement() {
        let dir = tempfile::tempdir().unwrap();
        let p = node(dir.path(), true);
        let _listener = std::os::unix::net::UnixListener::bind(&p.huskd_socket).unwrap();
        let found = check_node(&p);
        assert_eq!(found.len(), 6);
        assert!(found.iter().all(|f| f.problem.is_none()), "{found:#?}");
    }

    #[test]
    fn each_missing_requirement_says_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let found = check_node(&node(dir.path(), false));
        let problem = |what: &str| {
            found
                .iter()
                .find(|f| f.what == what)
                .and_then(|f| f.problem.clone())
                .unwrap_or_else(|| panic!("{what} should fail: {found:#?}"))
        };
        assert!(problem("the overlay module").contains("modprobe overlay"));
        assert!(problem("the br_netfilter module").contains("modprobe br_netfilter"));
        assert!(problem("net.bridge.bridge-nf-call-iptables = 1").contains("br_netfilter"));
        assert!(problem("net.ipv4.ip_forward = 1").contains("sysctl -w net.ipv4.ip_forward=1"));
        assert!(problem("a CNI network config").contains("net.d"));
        assert!(problem("huskd's CRI socket").contains("start huskd"));
    }
}
