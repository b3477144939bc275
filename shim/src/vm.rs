//! One pod sandbox's microVM, as processes on the host: `husk-vmm` driven through its control
//! API, and one `virtiofsd` per shared directory.
//!
//! Everything a VM owns lives in its run directory (`<run root>/vm/<id>`: API socket, vsock
//! socket, virtiofsd sockets, console and VMM logs). [`Vm`] tears all of it down when dropped,
//! and the child processes die with their parent (`PR_SET_PDEATHSIG`), so neither an error
//! nor a killed `husk` leaves a VMM running. A run directory whose owner died is swept by the
//! next launch.

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::api::{self, FsConfig, MacAddr, NetConfig, Request, SerialConfig, VmConfig, VsockConfig};

use crate::{paths, Result, ShimError};

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

/// A virtio-net NIC on an existing tap, which the VMM opens by name (so the tap must be in
/// the VMM's network namespace).
#[derive(Clone, Debug)]
pub struct NetSpec {
    pub tap_name: String,
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
        }
    }
}

/// How long the VMM gets to bind its API socket, and virtiofsd its vhost-user socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shut-down VMM gets to exit before SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A launched microVM. Dropping it kills the VMM and virtiofsd and removes the run directory.
pub struct Vm {
    id: String,
    dir: PathBuf,
    vmm: Option<Child>,
    virtiofsd: Vec<Child>,
    api_sock: PathBuf,
    vsock_uds: PathBuf,
}

impl Vm {
    /// Starts virtiofsd for each share and the VMM, configures the VM through the control
    /// API and boots it. Returns once the vCPUs run; the agent comes up later.
    pub fn launch(id: &str, spec: &VmSpec) -> Result<Vm> {
        validate_id(id)?;
        vmm::check::check_host().map_err(|e| ShimError::NoKvm(e.to_string()))?;
        let root = paths::run_root().join("vm");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| ShimError::io(format!("create {}", root.display()), e))?;
        sweep_stale(&root);
        let dir = root.join(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ShimError::io(format!("create the VM directory {}", dir.display()), e))?;
        let mut vm = Vm {
            id: id.to_string(),
            api_sock: dir.join("api.sock"),
            vsock_uds: dir.join("vsock.sock"),
            dir,
            vmm: None,
            virtiofsd: Vec::new(),
        };
        fs::write(vm.dir.join("owner"), std::process::id().to_string())
            .map_err(|e| ShimError::io("write the VM directory's owner file", e))?;
        // On error, `vm` is dropped here and takes down whatever was started.
        vm.start(spec)?;
        Ok(vm)
    }

    fn start(&mut self, spec: &VmSpec) -> Result<()> {
        let mut fs_devices = Vec::new();
        for share in &spec.shares {
            let sock = self.start_virtiofsd(share)?;
            fs_devices.push(FsConfig {
                socket_path: sock,
                tag: share.tag.clone(),
            });
        }
        let bin = match &spec.vmm_bin {
            Some(b) => b.clone(),
            None => paths::husk_vmm()?,
        };
        self.start_vmm(bin, spec.console_to_stderr)?;
        let serial = if spec.console_to_stderr {
            SerialConfig::Stdout
        } else {
            SerialConfig::File(self.dir.join("console.log"))
        };
        self.request(
            "configure",
            &Request::Configure(VmConfig {
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
            self.request(
                "add_net",
                &Request::AddNet(NetConfig {
                    tap_name: Some(net.tap_name.clone()),
                    tap_fd: None,
                    mac: net.mac,
                }),
            )?;
        }
        self.request(
            "add_vsock",
            &Request::AddVsock(VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: self.vsock_uds.clone(),
            }),
        )?;
        self.request("start", &Request::Start)?;
        tracing::debug!(id = %self.id, "microVM started");
        Ok(())
    }

    fn start_virtiofsd(&mut self, share: &ShareSpec) -> Result<PathBuf> {
        validate_id(&share.tag)?;
        if !share.dir.is_dir() {
            return Err(ShimError::Invalid(format!(
                "shared directory {} is not a directory",
                share.dir.display()
            )));
        }
        let bin = vmm::devices::virtio::fs::virtiofsd_path().ok_or_else(|| ShimError::Missing {
            what: "virtiofsd".into(),
            hint: "run scripts/setup, or set HUSK_VIRTIOFSD".into(),
        })?;
        let sock = self.dir.join(format!("fs-{}.sock", share.tag));
        let log = self.log_file(&format!("virtiofsd-{}.log", share.tag))?;
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
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| ShimError::Spawn {
            what: "virtiofsd",
            path: bin,
            source,
        })?;
        self.virtiofsd.push(child);
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !sock.exists() {
            let idx = self.virtiofsd.len() - 1;
            if let Ok(Some(st)) = self.virtiofsd[idx].try_wait() {
                return Err(ShimError::Exited {
                    what: "virtiofsd",
                    status: st.to_string(),
                    detail: self.log_tail(&format!("virtiofsd-{}.log", share.tag)),
                });
            }
            if Instant::now() > deadline {
                return Err(ShimError::Timeout {
                    what: "virtiofsd",
                    timeout: SOCKET_TIMEOUT,
                    detail: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(sock)
    }

    fn start_vmm(&mut self, bin: PathBuf, console_to_stderr: bool) -> Result<()> {
        let mut cmd = Command::new(&bin);
        cmd.arg("--api-sock").arg(&self.api_sock);
        cmd.stdin(Stdio::null());
        if console_to_stderr {
            cmd.stdout(std::io::stderr());
        } else {
            cmd.stdout(Stdio::null());
        }
        cmd.stderr(self.log_file("vmm.log")?);
        if std::env::var_os("HUSK_LOG").is_none() {
            cmd.env("HUSK_LOG", "warn");
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| ShimError::Spawn {
            what: "husk-vmm",
            path: bin,
            source,
        })?;
        self.vmm = Some(child);
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
                return Err(ShimError::Timeout {
                    what: "the VMM's API socket",
                    timeout: SOCKET_TIMEOUT,
                    detail: self.log_tail("vmm.log"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_file(&self, name: &str) -> Result<fs::File> {
        let p = self.dir.join(name);
        fs::File::create(&p).map_err(|e| ShimError::io(format!("create {}", p.display()), e))
    }

    /// The last lines of a log in the run directory, as an error message suffix.
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
        let resp = api::request(&self.api_sock, req, &[])
            .and_then(|r| r.into_result())
            .map_err(|source| ShimError::Vmm { op, source })?;
        Ok(resp)
    }

    /// If the VMM process has ended: an error saying how, with its log.
    pub fn vmm_exit(&mut self) -> Option<ShimError> {
        let child = self.vmm.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => {
                let mut detail = self.log_tail("vmm.log");
                detail.push_str(&self.log_tail("console.log"));
                Some(ShimError::Exited {
                    what: "husk-vmm",
                    status: describe_vmm_status(st),
                    detail,
                })
            }
            _ => None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run directory (sockets and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host side of the VM's hybrid vsock (`CONNECT <port>` to reach a guest port).
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    /// The VMM's pid, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(Child::id)
    }

    /// The VMM's `status` answer.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.request("status", &Request::Status)
    }

    /// Stops the VM and waits for every process; the run directory is removed.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown(true);
        Ok(())
    }

    fn teardown(&mut self, graceful: bool) {
        if let Some(mut child) = self.vmm.take() {
            if graceful && matches!(child.try_wait(), Ok(None)) {
                let _ = api::request_with_timeout(
                    &self.api_sock,
                    &Request::Shutdown,
                    &[],
                    Duration::from_secs(2),
                );
            }
            wait_or_kill(
                &mut child,
                if graceful {
                    EXIT_TIMEOUT
                } else {
                    Duration::ZERO
                },
            );
        }
        for mut child in self.virtiofsd.drain(..) {
            // virtiofsd exits when the VMM hangs up; if not, it is told to.
            wait_or_kill(&mut child, Duration::from_millis(500));
        }
        if !self.dir.as_os_str().is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("remove {}: {e}", self.dir.display());
                }
            }
            self.dir = PathBuf::new();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.teardown(false);
    }
}

fn describe_vmm_status(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match st.code() {
        // husk-vmm's documented exit statuses.
        Some(0) => "the guest shut down".into(),
        Some(1) => "exit status 1: VM set-up failed".into(),
        Some(3) => "exit status 3: the guest kernel panicked".into(),
        Some(4) => "exit status 4: a vCPU failed".into(),
        Some(c) => format!("exit status {c}"),
        None => format!("killed by signal {}", st.signal().unwrap_or(0)),
    }
}

/// Waits up to `grace` for `child`, then kills it; always reaps it.
fn wait_or_kill(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The child gets SIGKILL when its parent goes. Linux ties this to the forking *thread*:
/// launch from a thread that lives as long as the VM should.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// VM ids and share tags become file names: a safe alphabet and a bounded length (the
/// sockets under the run directory must fit a Unix socket address).
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ShimError::Invalid(format!(
            "{id:?} is not a valid id: use 1-40 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Removes run directories whose owner process is gone (a `husk` that was SIGKILLed: its
/// children died with it, their files stayed).
fn sweep_stale(root: &Path) {
    let Ok(rd) = fs::read_dir(root) else { return };
    for e in rd.flatten() {
        let owner = fs::read_to_string(e.path().join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let Some(pid) = owner else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::debug!("removing stale VM directory {}", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_name_safe() {
        for ok in ["pod-1", "a", "x_y.z", &"a".repeat(40)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", &"a".repeat(41), "ü"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stale_directories_are_swept_live_ones_kept() {
        let root = std::env::temp_dir().join(format!("husk-sweep-{}", std::process::id()));
        let (dead, live, foreign) = (root.join("dead"), root.join("live"), root.join("foreign"));
        for d in [&dead, &live, &foreign] {
            fs::create_dir_all(d).unwrap();
        }
        // pid_max is at most 2^22: this pid cannot exist.
        fs::write(dead.join("owner"), "4194305").unwrap();
        fs::write(live.join("owner"), std::process::id().to_string()).unwrap();
        sweep_stale(&root);
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(
            foreign.exists(),
            "a directory without an owner file is not ours to remove"
        );
        fs::remove_dir_all(root).unwrap();
    }
}
