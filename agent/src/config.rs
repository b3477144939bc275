//! How the agent runs: in a guest VM (PID 1) or as a process on a Linux host.

use std::path::PathBuf;

/// Where the agent runs; decides what it may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a pod VM: owns the whole machine, mounts virtio-fs shares, configures the
    /// guest's network namespace, sets the clock and hostname.
    Guest,
    /// An ordinary process on a Linux host (tests): shares are directories under the share
    /// root, the sandbox gets a network namespace of its own, the host's settings are left alone.
    Host,
}

/// The agent's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    /// State: libcontainer's root, bundles, the sandbox's files, helper work dirs.
    pub state_dir: PathBuf,
    /// Directory whose subdirectories, named by share tag, are the shares.
    pub share_root: PathBuf,
    /// The agent binary, run again as the runtime helper.
    pub exe: PathBuf,
    /// Set containers up without pivot_root (MS_MOVE + chroot): needed when `/` is the
    /// initramfs, where pivot_root fails.
    pub no_pivot: bool,
}

impl Config {
    /// Defaults for `mode`.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            state_dir: PathBuf::from("/run/husk-agent"),
            share_root: PathBuf::from("/run/husk/shares"),
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            no_pivot: false,
        }
    }

    /// libcontainer's state root.
    pub fn containers_dir(&self) -> PathBuf {
        self.state_dir.join("containers")
    }

    /// OCI bundles written for libcontainer.
    pub fn bundles_dir(&self) -> PathBuf {
        self.state_dir.join("bundles")
    }

    /// The sandbox's own files (resolv.conf, netns).
    pub fn sandbox_dir(&self) -> PathBuf {
        self.state_dir.join("sandbox")
    }

    /// Helper work directories and console sockets.
    pub fn tmp_dir(&self) -> PathBuf {
        self.state_dir.join("tmp")
    }
}
