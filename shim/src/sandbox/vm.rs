//! One sandbox's microVM, as processes on the host: `husk-vmm` driven through its control
//! API, and one `virtiofsd` per shared directory.
//!
//! Everything a VM owns lives in the sandbox directory (API socket, vsock socket, virtiofsd
//! sockets, console and VMM logs). The processes are [`ChildProcess`]es: killed when the
//! [`Vm`] is dropped, and with our process if it dies. Each is recorded in the sandbox's
//! state as soon as it exists, so a cleanup from another process finds it too.
//!
//! Launching blocks (it waits for sockets and speaks the blocking API client): the sandbox
//! runs it on a blocking thread, never on an async one.

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_vmm_api::{
    self as api, FsConfig, MacAddr, MachineConfig, NetConfig, Request, SerialConfig, VmmExitStatus,
    VsockConfig,
};

use super::network;
use super::process::ChildProcess;
use super::state::{ProcessRecord, StateFile, TapRecord};
use super::{Result, SandboxError};
use crate::paths;

/// The guest's vsock CID; any value ≥ 3 works, the VM has its own vsock device.
pub const GUEST_CID: u64 = 3;

/// A host directory exported to the guest over virtio-fs.
#[derive(Clone, Debug)]
pub struct ShareSpec {
    /// virtio-fs tag; the agent mounts it under its share root by this name.
    pub tag: String,
    pub dir: PathBuf,
    pub readonly: bool,
}

/// A virtio-net NIC on a tap, which we open (in `netns`, if given) and hand to the VMM as an
/// fd: the VMM stays in our network namespace while the tap lives in the pod's.
#[derive(Clone, Debug)]
pub struct NetSpec {
    pub tap_name: String,
    pub netns: Option<PathBuf>,
    pub mac: Option<MacAddr>,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Appended to the VMM's default command line.
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub shares: Vec<ShareSpec>,
    pub nets: Vec<NetSpec>,
    /// Guest console on the VMM's stdout (inherited from us as stderr) instead of a log file.
    pub console_to_stderr: bool,
    /// The VMM binary; `None` looks it up ([`paths::husk_vmm`]).
    pub vmm_bin: Option<PathBuf>,
    /// Run the VMM jailed (the default): its own uid, namespaces (the pod's network one),
    /// a directory as `/`, resource limits, a scrubbed environment ([`super::jail`]).
    pub jail: bool,
    /// More `husk-vmm` arguments (debugging and tests).
    pub vmm_args: Vec<String>,
}

impl VmSpec {
    /// The default pod VM: our kernel and the agent initramfs from [`paths::guest_dir`].
    pub fn pod_default() -> Result<VmSpec> {
        Ok(VmSpec::pod(
            paths::guest_file("vmlinux")?,
            paths::guest_file("husk-initramfs.cpio")?,
        ))
    }

    /// A pod VM booting `kernel` with the agent initramfs `initramfs`.
    pub fn pod(kernel: PathBuf, initramfs: PathBuf) -> VmSpec {
        VmSpec {
            kernel,
            initramfs,
            cmdline: "quiet".into(),
            mem_mib: 256,
            vcpus: 1,
            shares: Vec::new(),
            nets: Vec::new(),
            console_to_stderr: false,
            vmm_bin: None,
            jail: true,
            vmm_args: Vec::new(),
        }
    }
}

/// How long the VMM gets to bind its API socket, and virtiofsd its vhost-user socket: they
/// take milliseconds, but a node starting many pods at once (or a nested lab under load) can
/// be seconds late, and a false timeout costs a whole pod start.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a launch looks for a socket (while also watching the process's exit).
const SOCKET_POLL: Duration = Duration::from_millis(10);
/// How long a shut-down VMM gets to exit before SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A launched microVM. Dropping it kills the VMM and virtiofsd.
pub struct Vm {
    dir: PathBuf,
    vmm: Option<ChildProcess>,
    virtiofsd: Vec<ChildProcess>,
    api_sock: PathBuf,
    vsock_uds: PathBuf,
}

impl Vm {
    /// Starts virtiofsd for each share and the VMM in the sandbox directory, configures the
    /// VM through the control API and boots it. Returns once the vCPUs run; the agent comes
    /// up later. Blocks.
    pub fn launch(spec: &VmSpec, state: &mut StateFile) -> Result<Vm> {
        husk_vmm_api::check::check_host().map_err(|e| SandboxError::NoKvm(e.to_string()))?;
        if spec.jail {
            husk_vmm_api::jail_check::check_jail().map_err(SandboxError::Jail)?;
        }
        let dir = state.dir().to_path_buf();
        // A jailed VMM reaches its vsock socket's `_<port>` siblings only inside its jail.
        let vsock_dir = if spec.jail {
            super::jail::dir(&dir)
        } else {
            dir.clone()
        };
        let mut vm = Vm {
            api_sock: dir.join("api.sock"),
            vsock_uds: vsock_dir.join("vsock.sock"),
            dir,
            vmm: None,
            virtiofsd: Vec::new(),
        };
        // On error, `vm` is dropped here and takes down whatever was started.
        vm.start(spec, state)?;
        Ok(vm)
    }

    fn start(&mut self, spec: &VmSpec, state: &mut StateFile) -> Result<()> {
        let mut fs_devices = Vec::new();
        for share in &spec.shares {
            let sock = self.start_virtiofsd(share, state)?;
            fs_devices.push(FsConfig {
                socket_path: sock,
                tag: share.tag.clone(),
            });
        }
        let bin = match &spec.vmm_bin {
            Some(b) => b.clone(),
            None => paths::husk_vmm()?,
        };
        self.start_vmm(bin, spec, state)?;
        let serial = if spec.console_to_stderr {
            SerialConfig::Stdout
        } else {
            SerialConfig::File(self.dir.join("console.log"))
        };
        self.request(
            "configure",
            &Request::Configure(MachineConfig {
                kernel: spec.kernel.clone(),
                initramfs: Some(spec.initramfs.clone()),
                cmdline: Some(spec.cmdline.clone()),
                mem_mib: spec.mem_mib,
                vcpus: spec.vcpus,
                serial,
            }),
        )?;
        for fs_dev in fs_devices {
            self.request("add_fs", &Request::AddFs(fs_dev))?;
        }
        for net in &spec.nets {
            self.add_net(net, state)?;
        }
        self.request(
            "add_vsock",
            &Request::AddVsock(VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: self.vsock_uds.clone(),
            }),
        )?;
        self.request("start", &Request::Start)?;
        tracing::debug!(dir = %self.dir.display(), "microVM started");
        Ok(())
    }

    /// Opens the tap (in its netns) and passes its fd with `add_net`. Our copy of the fd is
    /// closed on return: from then on the VMM holds the tap.
    fn add_net(&self, net: &NetSpec, state: &mut StateFile) -> Result<()> {
        let tap = network::open_tap(net.netns.as_deref(), &net.tap_name)?;
        state.update(|s| {
            s.taps.push(TapRecord {
                name: tap.name.clone(),
                netns: net.netns.clone(),
                created: tap.created,
            })
        })?;
        let req = Request::AddNet(NetConfig {
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            tap_name: None,
            tap_fd: Some(0),
            mac: net.mac,
        });
        api::request(&self.api_sock, &req, &[tap.fd.as_fd()])
            .and_then(|r| r.into_result())
            .map_err(|source| self.request_failed("add_net", source))?;
        Ok(())
    }

    fn start_virtiofsd(&mut self, share: &ShareSpec, state: &mut StateFile) -> Result<PathBuf> {
        super::validate_id(&share.tag)?;
        if !share.dir.is_dir() {
            return Err(SandboxError::Invalid(format!(
                "shared directory {} is not a directory",
                share.dir.display()
            )));
        }
        let bin = husk_vmm_api::virtiofsd_path().ok_or_else(|| SandboxError::Missing {
            what: "virtiofsd".into(),
            hint: "run scripts/setup, or set HUSK_VIRTIOFSD".into(),
        })?;
        let sock = self.dir.join(format!("fs-{}.sock", share.tag));
        let log_name = format!("virtiofsd-{}.log", share.tag);
        let mut cmd = Command::new(&bin);
        cmd.arg("--socket-path")
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&share.dir)
            // chroot into the share: a compromised virtiofsd sees nothing else of the host.
            .args([
                "--sandbox",
                "chroot",
                "--cache",
                "never",
                "--log-level",
                "warn",
            ]);
        if share.readonly {
            cmd.arg("--readonly");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file(&log_name)?);
        let child = self.spawn("virtiofsd", bin, cmd, state)?;
        self.virtiofsd.push(child);
        let child = self.virtiofsd.last().expect("just pushed");
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !sock.exists() {
            // Waiting on the pidfd is our pause between looks at the socket.
            if let Some(st) = child.wait_timeout(SOCKET_POLL) {
                return Err(SandboxError::Exited {
                    what: "virtiofsd",
                    status: st.to_string(),
                    detail: self.log_tail(&log_name),
                });
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Timeout {
                    what: "virtiofsd",
                    timeout: SOCKET_TIMEOUT,
                    detail: self.log_tail(&log_name),
                });
            }
        }
        Ok(sock)
    }

    fn start_vmm(&mut self, bin: PathBuf, spec: &VmSpec, state: &mut StateFile) -> Result<()> {
        let mut cmd = Command::new(&bin);
        cmd.arg("--api-sock").arg(&self.api_sock);
        cmd.stdin(Stdio::null());
        if spec.console_to_stderr {
            cmd.stdout(std::io::stderr());
        } else {
            cmd.stdout(Stdio::null());
        }
        cmd.stderr(self.log_file("vmm.log")?);
        if spec.jail {
            self.jail_vmm(&mut cmd, spec, state)?;
        }
        cmd.args(&spec.vmm_args);
        if std::env::var_os("HUSK_LOG").is_none() {
            cmd.env("HUSK_LOG", "warn");
        }
        self.vmm = Some(self.spawn("husk-vmm", bin, cmd, state)?);
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        loop {
            if let Some(e) = self.vmm_exit() {
                return Err(e);
            }
            if self.api_sock.exists()
                && api::request_with_timeout(
                    &self.api_sock,
                    &Request::Status,
                    &[],
                    Duration::from_secs(1),
                )
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Timeout {
                    what: "the VMM's API socket",
                    timeout: SOCKET_TIMEOUT,
                    detail: self.log_tail("vmm.log"),
                });
            }
            if let Some(vmm) = &self.vmm {
                vmm.wait_timeout(SOCKET_POLL);
            }
        }
    }

    /// Makes `cmd` start a jailed VMM: an id of its own (recorded before it is used), its jail
    /// directory, the pod's network namespace, and nothing of our environment but the VMM's
    /// own switches.
    fn jail_vmm(&self, cmd: &mut Command, spec: &VmSpec, state: &mut StateFile) -> Result<()> {
        let run_root = state
            .dir()
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| SandboxError::Invalid("the sandbox directory has no run root".into()))?
            .to_path_buf();
        let id = state.state().id.clone();
        let (uid, lock) = super::jail::allocate(&run_root, &id)?;
        state.update(|s| s.jail_id = Some(lock))?;
        cmd.arg("--jail")
            .arg(super::jail::dir(&self.dir))
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(uid.to_string());
        cmd.env_clear();
        for var in ["HUSK_LOG", "HUSK_SECCOMP", "RUST_BACKTRACE"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let netns = spec
            .nets
            .iter()
            .find_map(|n| n.netns.clone())
            .or_else(|| state.state().netns.as_ref().map(|n| n.path.clone()));
        if let Some(ns) = netns {
            let file = fs::File::open(&ns)
                .map_err(|e| SandboxError::io(format!("open the pod netns {}", ns.display()), e))?;
            // SAFETY: setns between fork and exec, on an fd the closure owns (it lives as long
            // as `cmd`); async-signal-safe, allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Ok(())
    }

    /// Spawns a child and records it in the state before anything can go wrong with it.
    fn spawn(
        &self,
        what: &'static str,
        bin: PathBuf,
        cmd: Command,
        state: &mut StateFile,
    ) -> Result<ChildProcess> {
        let child = ChildProcess::spawn(what, cmd).map_err(|source| SandboxError::Spawn {
            what,
            path: bin,
            source,
        })?;
        state.update(|s| {
            s.processes.push(ProcessRecord {
                name: what.into(),
                process: child.process_ref(),
            })
        })?;
        Ok(child)
    }

    fn log_file(&self, name: &str) -> Result<fs::File> {
        let p = self.dir.join(name);
        fs::File::create(&p).map_err(|e| SandboxError::io(format!("create {}", p.display()), e))
    }

    /// The last lines of a log in the sandbox directory, as an error message suffix.
    pub fn log_tail(&self, name: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join(name)) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        if tail.trim().is_empty() {
            String::new()
        } else {
            format!("; last lines of {name}:\n{tail}")
        }
    }

    fn request(&self, op: &'static str, req: &Request) -> Result<serde_json::Value> {
        api::request(&self.api_sock, req, &[])
            .and_then(|r| r.into_result())
            .map_err(|source| self.request_failed(op, source))
    }

    /// A request that failed because the VMM died under it (a seccomp kill, a crash) is
    /// reported as the VMM's death, with its log, which says why; anything else as the
    /// VMM's answer.
    fn request_failed(&self, op: &'static str, source: api::ApiError) -> SandboxError {
        // An answer, even a refusal, means the VMM lives: only a lost connection is worth
        // a moment's wait for its exit status.
        if matches!(source, api::ApiError::Refused(_)) {
            return SandboxError::Vmm { op, source };
        }
        let exited = self
            .vmm
            .as_ref()
            .and_then(|v| v.wait_timeout(Duration::from_millis(500)));
        match exited {
            Some(status) => self.exit_error(status),
            None => SandboxError::Vmm { op, source },
        }
    }

    fn exit_error(&self, status: std::process::ExitStatus) -> SandboxError {
        let mut detail = self.log_tail("vmm.log");
        detail.push_str(&self.log_tail("console.log"));
        SandboxError::VmmExited {
            status: VmmExitStatus::from_exit_status(status),
            detail,
        }
    }

    /// If the VMM process has ended: an error saying how, with its log. Does not block.
    pub fn vmm_exit(&self) -> Option<SandboxError> {
        let status = self.vmm.as_ref()?.try_status()?;
        Some(self.exit_error(status))
    }

    /// Resolves when the VMM exits, with an error saying how. Does not block the runtime.
    pub async fn vmm_exited(&self) -> SandboxError {
        let Some(vmm) = &self.vmm else {
            return SandboxError::Invalid("the VM has no VMM process".into());
        };
        match vmm.wait().await {
            Ok(status) => self.exit_error(status),
            Err(e) => SandboxError::io("wait for husk-vmm", e),
        }
    }

    /// The host side of the VM's hybrid vsock (`CONNECT <port>` to reach a guest port).
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    /// The VMM's pid, while we hold it.
    pub fn vmm_pid(&self) -> Option<i32> {
        self.vmm.as_ref().map(ChildProcess::pid)
    }

    /// The VMM's `status` answer.
    pub fn status(&self) -> Result<api::VmStatus> {
        api::request(&self.api_sock, &Request::Status, &[])
            .and_then(|r| r.parse_result())
            .map_err(|source| SandboxError::Vmm {
                op: "status",
                source,
            })
    }

    /// Stops the VM and waits for every process. Blocks.
    pub fn shutdown(mut self) {
        self.teardown(true);
    }

    fn teardown(&mut self, graceful: bool) {
        if let Some(vmm) = self.vmm.take() {
            let running = vmm.try_status().is_none();
            if graceful && running {
                let _ = api::request_with_timeout(
                    &self.api_sock,
                    &Request::Shutdown,
                    &[],
                    Duration::from_secs(2),
                );
            }
            vmm.stop(if graceful && running {
                EXIT_TIMEOUT
            } else {
                Duration::ZERO
            });
        }
        for child in self.virtiofsd.drain(..) {
            // virtiofsd exits when the VMM hangs up; if not, it is told to.
            child.stop(Duration::from_millis(500));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.teardown(false);
    }
}
