//! The shim's configuration: one TOML file, `/etc/husk/husk.toml` unless the runtime
//! options' `ConfigPath` or `$HUSK_CONFIG` names another. Every key is optional and has the
//! default documented in `shim/husk.toml.example`; an unknown key is an error that names it,
//! so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Where the config is when nothing says otherwise.
pub const DEFAULT_PATH: &str = "/etc/husk/husk.toml";
/// The environment variable naming the config (below the runtime options' `ConfigPath`).
pub const ENV_VAR: &str = "HUSK_CONFIG";

/// The whole file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `husk-vmm`; empty: next to the shim binary, else on `PATH`.
    pub vmm: PathBuf,
    /// The guest kernel (an uncompressed ELF vmlinux); empty: `vmlinux` in the guest dir.
    pub kernel: PathBuf,
    /// The pod VM's initramfs; empty: `husk-initramfs.cpio` in the guest dir.
    pub initramfs: PathBuf,
    /// Appended to the guest kernel command line.
    pub kernel_params: String,
    /// virtiofsd; empty: `$HUSK_VIRTIOFSD`, the setup cache, or `PATH`.
    pub virtiofsd: PathBuf,
    pub vm: VmSection,
    pub timeouts: Timeouts,
    pub debug: Debug,
    /// huskd's section of the same file (`cri/huskd.toml.example`); huskd checks it, the
    /// shim leaves it alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub huskd: Option<toml::Table>,
}

/// Sizing of a pod VM.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VmSection {
    /// vCPUs of a pod with no CPU limit in its sandbox annotations.
    pub default_vcpus: u8,
    /// Guest memory (MiB) of a pod with no memory limit in its sandbox annotations.
    pub default_memory_mib: u32,
    /// Added to a pod's memory limit: the guest kernel, the agent and page cache.
    pub memory_overhead_mib: u32,
    /// Added to a pod's CPU limit (in vCPUs, rounded up with it).
    pub cpu_overhead: f64,
    /// Upper bounds, whatever the pod asks.
    pub max_vcpus: u8,
    pub max_memory_mib: u32,
    /// Jail each VMM (own uid, namespaces, a directory as `/`, limits); `husk check` says
    /// whether this host can. Off only for debugging.
    pub jail: bool,
}

/// How long things may take.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From VMM start to the guest kernel handing over to the agent, in seconds.
    pub vm_boot_secs: u64,
    /// From VMM start to the agent answering on vsock, in seconds (includes the boot).
    pub agent_connect_secs: u64,
    /// One agent call (other than waits, which have none), in seconds.
    pub agent_call_secs: u64,
    /// VM teardown before the VMM is killed, in seconds.
    pub shutdown_secs: u64,
}

/// Debugging aids.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Debug {
    /// Write the guest console to `<VM run dir>/console.log` (otherwise discarded).
    pub console: bool,
    /// The shim's log level (`error` .. `trace`); containerd's `-debug` raises it to debug.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vmm: PathBuf::new(),
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            kernel_params: String::new(),
            virtiofsd: PathBuf::new(),
            vm: VmSection::default(),
            timeouts: Timeouts::default(),
            debug: Debug {
                console: false,
                log_level: "info".into(),
            },
            huskd: None,
        }
    }
}

impl Default for VmSection {
    fn default() -> Self {
        VmSection {
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            cpu_overhead: 0.0,
            max_vcpus: 16,
            max_memory_mib: 16384,
            jail: true,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            vm_boot_secs: 60,
            agent_connect_secs: 120,
            agent_call_secs: 30,
            shutdown_secs: 5,
        }
    }
}

impl Timeouts {
    pub fn agent_connect(&self) -> Duration {
        Duration::from_secs(self.agent_connect_secs)
    }
    pub fn agent_call(&self) -> Duration {
        Duration::from_secs(self.agent_call_secs)
    }
    pub fn shutdown(&self) -> Duration {
        Duration::from_secs(self.shutdown_secs)
    }
}

impl Config {
    /// Parses a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let c: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.to_path_buf(),
            // toml's message names the unknown key and lists the expected ones.
            message: e.to_string(),
        })?;
        c.validate(origin)?;
        Ok(c)
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Config {
                path: origin.to_path_buf(),
                message: m,
            })
        };
        if self.vm.default_vcpus == 0 || self.vm.default_vcpus > self.vm.max_vcpus {
            return bad(format!(
                "vm.default_vcpus = {} must be 1..=vm.max_vcpus ({})",
                self.vm.default_vcpus, self.vm.max_vcpus
            ));
        }
        if self.vm.default_memory_mib < 64 || self.vm.default_memory_mib > self.vm.max_memory_mib {
            return bad(format!(
                "vm.default_memory_mib = {} must be 64..=vm.max_memory_mib ({})",
                self.vm.default_memory_mib, self.vm.max_memory_mib
            ));
        }
        if !(0.0..=64.0).contains(&self.vm.cpu_overhead) {
            return bad(format!(
                "vm.cpu_overhead = {} must be 0..=64",
                self.vm.cpu_overhead
            ));
        }
        Ok(())
    }

    /// Which file to read: the runtime options' `ConfigPath`, else `$HUSK_CONFIG`, else
    /// [`DEFAULT_PATH`]. The bool says whether it was named explicitly (then it must exist).
    pub fn locate(config_path: Option<&str>) -> (PathBuf, bool) {
        if let Some(p) = config_path.filter(|p| !p.is_empty()) {
            return (PathBuf::from(p), true);
        }
        if let Some(p) = std::env::var_os(ENV_VAR).filter(|p| !p.is_empty()) {
            return (PathBuf::from(p), true);
        }
        (PathBuf::from(DEFAULT_PATH), false)
    }

    /// Loads the config [`Config::locate`] finds. A missing default file means all
    /// defaults; a missing file that was named is an error.
    pub fn load(config_path: Option<&str>) -> Result<Config> {
        let (path, named) = Config::locate(config_path);
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(Config::default()),
            Err(e) => Err(Error::Config {
                path,
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/husk.toml.example"))
            .expect("shim/husk.toml.example")
    }

    /// The shipped example, uncommented, is exactly the defaults: it documents them all.
    #[test]
    fn example_lists_every_default() {
        let uncommented: String = example()
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.contains(" = ") || r.starts_with('['))
            })
            .map(|l| l.map(|s| format!("{s}\n")).unwrap_or_default())
            .collect();
        let parsed = Config::parse(&uncommented, Path::new("example")).unwrap();
        assert_eq!(parsed, Config::default());
        // Every field of the defaults appears in the example.
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let example: toml::Value = toml::from_str(&uncommented).unwrap();
        assert_eq!(defaults, example, "the example must list every key");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = Config::parse("[vm]\ndefault_vcpu = 2\n", Path::new("/etc/husk/husk.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_vcpu"), "{e}");
        assert!(e.contains("/etc/husk/husk.toml"), "{e}");
        let e = Config::parse("kernal = \"/k\"\n", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernal"), "{e}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::parse(
            "kernel = \"/k\"\n[vm]\ndefault_memory_mib = 512\n[debug]\nconsole = true\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.vm.default_memory_mib, 512);
        assert_eq!(c.vm.default_vcpus, 1);
        assert!(c.debug.console);
        assert_eq!(c.timeouts, Timeouts::default());
    }

    #[test]
    fn huskds_section_is_left_to_huskd() {
        let c = Config::parse(
            "vmm = \"/v\"\n[huskd]\nsocket = \"/s\"\n[huskd.cni]\nconf_dir = \"/c\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.vmm, Path::new("/v"));
        assert!(c.huskd.is_some());
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(Config::parse("[vm]\ndefault_vcpus = 0\n", Path::new("x")).is_err());
        assert!(Config::parse("[vm]\ndefault_memory_mib = 1\n", Path::new("x")).is_err());
        assert!(Config::parse("[timeouts]\nvm_boot_secs = \"x\"\n", Path::new("x")).is_err());
    }

    #[test]
    fn named_missing_file_is_an_error_default_missing_is_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(Config::load(Some(missing.to_str().unwrap())).is_err());
        let ok = dir.path().join("husk.toml");
        std::fs::write(&ok, "[debug]\nlog_level = \"debug\"\n").unwrap();
        let c = Config::load(Some(ok.to_str().unwrap())).unwrap();
        assert_eq!(c.debug.log_level, "debug");
    }
}
