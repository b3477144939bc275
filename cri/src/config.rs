//! huskd's configuration: the `[huskd]` section of `/etc/husk/husk.toml` (the shim reads the
//! rest of the same file). Every key has a default, documented here and in
//! `cri/huskd.toml.example`; an unknown key is an error naming it, so a typo never silently
//! falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file huskd reads when `--config` names none.
pub const DEFAULT_PATH: &str = "/etc/husk/husk.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// How kubelet and huskd place pod cgroups; RuntimeConfig reports it so kubelet can check
/// that both agree.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    #[default]
    Cgroupfs,
    Systemd,
}

/// The `[huskd]` section.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The CRI socket kubelet and crictl connect to.
    pub socket: PathBuf,
    /// Runtime state that does not survive a reboot (pod netns bookkeeping, CNI results,
    /// shim bundles).
    pub state_dir: PathBuf,
    /// Persistent data: the image store lives in `<data_dir>/images`.
    pub data_dir: PathBuf,
    /// RuntimeClass handlers huskd answers to; all of them run our shim.
    pub runtime_handlers: Vec<String>,
    /// The shim binary; empty: `containerd-shim-husk-v2` beside huskd, else on `PATH`.
    pub shim: PathBuf,
    pub cni: CniConfig,
    pub cgroup_driver: CgroupDriver,
    /// Per-registry pull policy; a registry not listed follows `default_registry_policy`.
    pub registries: Vec<Registry>,
    pub default_registry_policy: RegistryPolicy,
    /// Mirrors per registry, tried in order before it (containerd's `registry.mirrors`).
    pub mirrors: Vec<Mirror>,
    /// Where the streaming server (Exec/Attach/PortForward URLs) listens; port 0 takes a
    /// free port. kubelet connects to it, so it must be reachable from kubelet's host.
    pub stream_address: std::net::SocketAddr,
    /// Where the Prometheus endpoint (`GET /metrics`) listens; none: off.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The pod VM's initramfs (the file's top-level `initramfs` key, which the shim boots):
    /// the built-in image is imported from it.
    #[serde(skip)]
    pub initramfs: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// The first `*.conflist` (by name) here is the pod network.
    pub conf_dir: PathBuf,
    /// Where plugins are searched for, in order.
    pub bin_dirs: Vec<PathBuf>,
}

/// What PullImage may do with one registry.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RegistryPolicy {
    /// Pull over HTTPS.
    #[default]
    Allow,
    /// Refuse every pull from it.
    Reject,
    /// Pull, over plain HTTP (a local or test registry).
    AllowInsecure,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// `host[:port]` as it appears in image references (`docker.io` for Docker Hub).
    pub host: String,
    pub policy: RegistryPolicy,
}

/// Where pulls of one registry's images are tried first.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// `host[:port]` as it appears in image references (`docker.io` for Docker Hub).
    pub registry: String,
    /// Mirror hosts, each serving the same repositories under the same names; each follows
    /// its own entry in `registries` (plain HTTP only where that says so). They are asked
    /// without the request's credentials, which are for the registry itself.
    pub endpoints: Vec<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: "/run/husk/huskd.sock".into(),
            state_dir: "/run/husk/huskd".into(),
            data_dir: "/var/lib/husk".into(),
            runtime_handlers: vec!["kata".into(), "husk".into(), String::new()],
            shim: PathBuf::new(),
            cni: CniConfig::default(),
            cgroup_driver: CgroupDriver::Cgroupfs,
            registries: Vec::new(),
            default_registry_policy: RegistryPolicy::Allow,
            mirrors: Vec::new(),
            stream_address: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_address: None,
            initramfs: PathBuf::new(),
        }
    }
}

impl Default for CniConfig {
    fn default() -> CniConfig {
        CniConfig {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        }
    }
}

/// The whole file as huskd sees it: its own section, the shim's keys ignored.
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    huskd: Config,
    #[serde(default)]
    initramfs: PathBuf,
}

impl Config {
    /// Parses the text of a husk.toml; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let f: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Config {
            initramfs: f.initramfs,
            ..f.huskd
        })
    }

    /// Reads `path`; a missing file at the default path means all defaults, a missing file
    /// named explicitly is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (p, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&p) {
            Ok(text) => Config::parse(&text, &p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read { path: p, source }),
        }
    }

    /// The policy for a registry host.
    pub fn registry_policy(&self, host: &str) -> RegistryPolicy {
        self.registries
            .iter()
            .find(|r| r.host == host)
            .map(|r| r.policy)
            .unwrap_or(self.default_registry_policy)
    }

    /// The pod VM's initramfs as the shim resolves it: the configured file, else
    /// `husk-initramfs.cpio` in `$HUSK_GUEST_DIR`, else in `../guest` from huskd's own
    /// directory (a build tree's `target/guest`), else in `/usr/share/husk/guest`.
    pub fn guest_initramfs(&self) -> PathBuf {
        if !self.initramfs.as_os_str().is_empty() {
            return self.initramfs.clone();
        }
        let dir = std::env::var_os("HUSK_GUEST_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                let exe = std::env::current_exe().ok()?;
                Some(exe.parent()?.parent()?.join("guest"))
            })
            .unwrap_or_else(|| PathBuf::from("/usr/share/husk/guest"));
        dir.join("husk-initramfs.cpio")
    }

    /// The image store's root.
    pub fn image_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::parse("vmm = \"/x\"\n", Path::new("t")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.socket, Path::new("/run/husk/huskd.sock"));
        assert_eq!(c.runtime_handlers, ["kata", "husk", ""]);
        assert_eq!(c.cni.bin_dirs[1], Path::new("/usr/lib/cni"));
        assert_eq!(c.cgroup_driver, CgroupDriver::Cgroupfs);
        assert_eq!(c.stream_address.to_string(), "127.0.0.1:0");
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        let text = include_str!("../huskd.toml.example");
        let c = Config::parse(text, Path::new("example")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[huskd]\nsokcet = \"/x\"\n", Path::new("/etc/h.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sokcet") && e.contains("/etc/h.toml"), "{e}");
    }

    #[test]
    fn registry_policies() {
        let c = Config::parse(
            "[huskd]\ndefault_registry_policy = \"reject\"\n\
             [[huskd.registries]]\nhost = \"127.0.0.1:5000\"\npolicy = \"allow-insecure\"\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            c.registry_policy("127.0.0.1:5000"),
            RegistryPolicy::AllowInsecure
        );
        assert_eq!(c.registry_policy("docker.io"), RegistryPolicy::Reject);
    }
}
