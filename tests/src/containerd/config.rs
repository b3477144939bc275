//! The configuration of a test containerd: everything under its own directory, so it shares
//! nothing with a system containerd or another test's, and a CNI network of its own.

use std::path::{Path, PathBuf};

use super::images::PAUSE;

/// The runtime handlers every test containerd has.
pub const HANDLER_RUNC: &str = "runc";
pub const HANDLER_HUSK: &str = "husk";
pub const HANDLER_KATA: &str = "kata";
/// Our shim with a config whose VMM does not exist: Create fails inside the shim on any
/// host (no KVM here; no VMM binary where there is KVM).
pub const HANDLER_HUSK_NO_VMM: &str = "husk-novmm";
/// Our shim with a config that has an unknown key: `start` fails naming it.
pub const HANDLER_HUSK_BAD_CONFIG: &str = "husk-badconfig";

/// The shim config of each test-only handler, beside the main one.
pub fn extra_configs(shim_config: &Path) -> [(&'static str, PathBuf, &'static str); 2] {
    let dir = shim_config.parent().unwrap_or(Path::new("/"));
    [
        (
            HANDLER_HUSK_NO_VMM,
            dir.join("husk-novmm.toml"),
            "vmm = \"/nonexistent/husk-vmm\"\n",
        ),
        (
            HANDLER_HUSK_BAD_CONFIG,
            dir.join("husk-badconfig.toml"),
            "[vm]\nno_such_key = 1\n",
        ),
    ]
}

/// The snapshotter. overlayfs works here (the root filesystem is ext4, which can hold an
/// overlay's upper directory, and the kernel has `overlay`); a host whose temp directory is
/// itself an overlay would need `native`.
pub const SNAPSHOTTER: &str = "overlayfs";

/// Paths of one test containerd, all under `dir`.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_data_dir: PathBuf,
    pub runc_root: PathBuf,
    pub log: PathBuf,
    pub pod_logs: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            root: dir.join("root"),
            state: dir.join("state"),
            socket: dir.join("containerd.sock"),
            config: dir.join("config.toml"),
            cni_conf_dir: dir.join("cni/net.d"),
            cni_data_dir: dir.join("cni/data"),
            runc_root: dir.join("runc"),
            log: dir.join("containerd.log"),
            pod_logs: dir.join("pods"),
        }
    }

    /// containerd's ttrpc socket, which shims publish events to.
    pub fn ttrpc_socket(&self) -> PathBuf {
        let mut s = self.socket.clone().into_os_string();
        s.push(".ttrpc");
        PathBuf::from(s)
    }
}

/// The test network: a bridge and a /24 on this host, unique to one containerd.
#[derive(Clone, Debug)]
pub struct Network {
    pub bridge: String,
    pub subnet: String,
}

/// What the `husk` and `kata` handlers run.
#[derive(Clone, Debug)]
pub struct ShimSetup {
    /// `containerd-shim-husk-v2`; its directory goes first on containerd's PATH.
    pub binary: PathBuf,
    /// The husk.toml the shim gets as `ConfigPath` in its runtime options.
    pub config: PathBuf,
}

fn handler(name: &str, runtime_type: &str, body: &str) -> String {
    format!(
        r#"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes."{name}"]
      runtime_type = "{runtime_type}"
{body}"#
    )
}

/// containerd's config.toml (version 2, as containerd 1.6 reads it).
pub fn containerd_toml(l: &Layout, shim: &ShimSetup) -> String {
    let mut runtimes = handler(
        HANDLER_RUNC,
        "io.containerd.runc.v2",
        &format!(
            r#"      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # This host's cgroups are hybrid v1 and no systemd runs them: cgroupfs.
        SystemdCgroup = false
        # runc's state of this containerd only (the default is shared /run/containerd/runc).
        Root = "{}"
"#,
            l.runc_root.display()
        ),
    );
    let mut handlers = vec![
        (HANDLER_HUSK, shim.config.clone()),
        (HANDLER_KATA, shim.config.clone()),
    ];
    for (name, path, _) in extra_configs(&shim.config) {
        handlers.push((name, path));
    }
    for (name, config) in handlers {
        runtimes.push_str(&handler(
            name,
            "io.containerd.husk.v2",
            &format!(
                r#"      # No runtime_path: containerd 1.6.20's CRI did not use it (binary not installed); it finds
      # containerd-shim-husk-v2 on its PATH, which the harness puts the build tree on.
      # The VM is the boundary: the host's devices are not the guest's to see.
      privileged_without_host_devices = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes."{name}".options]
        ConfigPath = "{cfg}"
"#,
                cfg = config.display()
            ),
        ));
    }
    format!(
        r#"# Written by husk-tests (tests/src/containerd/config.rs) for one test containerd.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below containerd's.
  restrict_oom_score_adj = true
  # No AppArmor in this kernel, and no SELinux.
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "{runc}"
{runtimes}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
    max_conf_num = 1
"#,
        root = l.root.display(),
        state = l.state.display(),
        sock = l.socket.display(),
        ttrpc = l.ttrpc_socket().display(),
        dir = l.dir.display(),
        pause = PAUSE,
        snapshotter = SNAPSHOTTER,
        runc = HANDLER_RUNC,
        cni = l.cni_conf_dir.display(),
    )
}

/// The CNI conflist: a bridge with host-local addresses on the test subnet, then portmap.
/// (containerd 1.6's CRI adds `loopback` itself.) No IP masquerade: nothing leaves the host,
/// and it would leave iptables rules to clean up.
pub fn cni_conflist(l: &Layout, net: &Network) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("husk-test-{}", net.bridge),
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": l.cni_data_dir
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }))
    .expect("encode the CNI conflist")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_map_to_the_husk_runtime_and_runc() {
        let l = Layout::new(Path::new("/tmp/x"));
        let shim = ShimSetup {
            binary: "/b/containerd-shim-husk-v2".into(),
            config: "/c/husk.toml".into(),
        };
        let t = containerd_toml(&l, &shim);
        let v: toml::Value = toml::from_str(&t).expect("valid TOML");
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        let rts = &cri["containerd"]["runtimes"];
        for h in ["husk", "kata"] {
            assert_eq!(
                rts[h]["runtime_type"].as_str(),
                Some("io.containerd.husk.v2")
            );
            assert_eq!(
                rts[h]["options"]["ConfigPath"].as_str(),
                Some("/c/husk.toml")
            );
        }
        assert_eq!(
            rts["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(false)
        );
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(cri["sandbox_image"].as_str(), Some(PAUSE));
        assert_eq!(
            v["ttrpc"]["address"].as_str(),
            Some("/tmp/x/containerd.sock.ttrpc")
        );
    }
}
