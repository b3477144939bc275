//! Test harness: a host-mode agent on a Unix socket, a busybox rootfs, a default OCI spec,
//! and the real ttrpc clients.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use serde_json::{json, Value};
use ttrpc::context;

/// The host-mode container tests need root and Debian's busybox-static; where either is
/// missing they fail with the reason rather than skip (deselect them by name instead).
pub fn can_run() -> bool {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "host-mode container tests need root"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: run scripts/setup (Debian busybox-static)"
    );
    true
}

/// Builds a busybox root filesystem in `dir`: /bin/busybox plus a symlink per applet.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let out = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    for d in ["proc", "sys", "dev", "etc", "tmp", "root", "home/user"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\nwheel:x:10:\nuser:x:1000:\n",
    )
    .unwrap();
}

/// A default OCI spec (like `runc spec`) running `args`.
pub fn spec(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_CHOWN",
        "CAP_SETUID",
        "CAP_SETGID"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A running host-mode agent and clients connected to it.
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    child: Child,
    guest: bool,
    pub sandbox_id: String,
    /// The clients, shared with husk run and the shim; fields and calls of `Agent` are
    /// reached through `Deref`.
    pub api: husk_agent_client::Agent,
}

impl std::ops::Deref for TestAgent {
    type Target = husk_agent_client::Agent;
    fn deref(&self) -> &Self::Target {
        &self.api
    }
}

pub const SHARE: &str = "share0";

pub fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

impl TestAgent {
    /// Starts a host-mode agent with a share holding a busybox rootfs at `rootfs`.
    pub async fn start(name: &str) -> TestAgent {
        Self::start_with(name, false).await
    }

    /// Starts the agent in guest mode as PID 1 of fresh mount, PID, UTS, IPC and network
    /// namespaces: the VM code paths, without a VM. Shares must not be passed to
    /// CreateSandbox (guest mode would mount virtio-fs for them).
    pub async fn start_guest(name: &str) -> TestAgent {
        Self::start_with(name, true).await
    }

    /// The agent's own pid (for guest mode: inside unshare, as seen from here).
    pub fn agent_pid(&self) -> i32 {
        let me = self.child.id();
        if !self.guest {
            return me as i32;
        }
        let kids =
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        kids.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("agent under unshare")
    }

    /// Starts a host-mode agent with extra command-line flags.
    pub async fn start_with_flags(name: &str, flags: &[&str]) -> TestAgent {
        Self::launch(name, false, flags).await
    }

    async fn start_with(name: &str, guest: bool) -> TestAgent {
        Self::launch(name, guest, &[]).await
    }

    async fn launch(name: &str, guest: bool, flags: &[&str]) -> TestAgent {
        let dir = tempfile::Builder::new()
            .prefix(&format!("husk-agent-{name}-"))
            .tempdir()
            .unwrap();
        let shares = dir.path().join("shares");
        busybox_rootfs(&shares.join(SHARE).join("rootfs"));
        let sock = dir.path().join("agent.sock");
        // HUSK_AGENT_BIN runs the suite against another build, e.g. agent/build-static's.
        let bin = std::env::var("HUSK_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_husk-agent").to_string());
        let mut cmd = if guest {
            let mut c = Command::new("unshare");
            c.args([
                "--mount",
                "--pid",
                "--uts",
                "--ipc",
                "--net",
                "--fork",
                "--mount-proc",
                "--kill-child=SIGTERM",
            ])
            .arg(bin)
            .args(["--mode", "guest", "--no-boot-marker"]);
            c
        } else {
            let mut c = Command::new(bin);
            c.args(["--mode", "host"]);
            c
        };
        let child = cmd
            .args(flags)
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--port-forward-listen")
            .arg(format!("unix://{}", dir.path().join("pf.sock").display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--share-root")
            .arg(&shares)
            .env(
                "HUSK_AGENT_LOG",
                std::env::var("HUSK_AGENT_LOG").unwrap_or_else(|_| "warn,libcgroups=error".into()),
            )
            .spawn()
            .expect("start husk-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            if sock.exists() {
                if let Ok(c) =
                    ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display())).await
                {
                    break c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent did not listen on {}",
                sock.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let sandbox_id = format!("sb-{name}-{}", std::process::id());
        TestAgent {
            dir,
            child,
            guest,
            sandbox_id,
            api: husk_agent_client::Agent::from_client(client),
        }
    }

    /// The agent's port-forward service (in the guest: vsock port 1025).
    pub fn port_forward_socket(&self) -> PathBuf {
        self.dir.path().join("pf.sock")
    }

    pub fn share_dir(&self) -> PathBuf {
        self.dir.path().join("shares").join(SHARE)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub async fn create_sandbox(&self, hostname: &str, shared_pid: bool) {
        let mut req = pb::CreateSandboxRequest::new();
        req.sandbox_id = self.sandbox_id.clone();
        req.hostname = hostname.into();
        req.shared_pid_namespace = shared_pid;
        req.resolv_conf = "nameserver 10.0.0.53\n".into();
        if !self.guest {
            let mut share = pb::Share::new();
            share.tag = SHARE.into();
            req.shares.push(share);
        }
        self.sandbox
            .create_sandbox(ctx(), &req)
            .await
            .expect("CreateSandbox");
    }

    pub fn create_req(&self, id: &str, spec: &Value) -> pb::CreateContainerRequest {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(spec).unwrap();
        let mut root = pb::RootfsSource::new();
        root.share_tag = SHARE.into();
        root.path = "rootfs".into();
        req.rootfs = Some(root).into();
        req
    }

    pub async fn create(&self, id: &str, spec: &Value) -> ttrpc::Result<pb::Empty> {
        self.containers
            .create_container(ctx(), &self.create_req(id, spec))
            .await
    }

    pub async fn start_container(&self, id: &str) -> ttrpc::Result<pb::Empty> {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        self.containers.start_container(ctx(), &req).await
    }

    /// Creates and starts a container.
    pub async fn run(&self, id: &str, spec: &Value) {
        self.create(id, spec).await.expect("CreateContainer");
        self.start_container(id).await.expect("StartContainer");
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> pb::WaitProcessResponse {
        let mut req = pb::ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.containers
            .wait_process(ctx(), &req)
            .await
            .expect("WaitProcess")
    }

    /// Reads a stream to EOF.
    pub async fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let mut req = pb::ReadStreamRequest::new();
            req.container_id = id.into();
            req.exec_id = exec_id.into();
            let r = if stderr {
                self.io.read_stderr(ctx(), &req).await
            } else {
                self.io.read_stdout(ctx(), &req).await
            }
            .expect("read stream");
            out.extend_from_slice(&r.data);
            if r.eof {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub async fn remove(&self, id: &str) {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout_ms = 5000;
        self.containers
            .remove_container(ctx(), &req)
            .await
            .expect("RemoveContainer");
    }

    pub async fn exec(&self, id: &str, exec_id: &str, process: Value) -> ttrpc::Result<pb::Empty> {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.oci_process_json = serde_json::to_vec(&process).unwrap();
        req.stdin = true;
        self.containers.exec_process(ctx(), &req).await
    }

    pub async fn signal(&self, id: &str, exec_id: &str, sig: u32) -> ttrpc::Result<pb::Empty> {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = sig;
        self.containers.signal_process(ctx(), &req).await
    }

    /// Destroys the sandbox and stops the agent.
    pub async fn shutdown(self) {
        let mut req = pb::DestroySandboxRequest::new();
        req.timeout_ms = 5000;
        self.sandbox
            .destroy_sandbox(ctx(), &req)
            .await
            .expect("DestroySandbox");
        // Drop stops the agent.
    }
}

impl Drop for TestAgent {
    /// A failed test still must not leave containers, mounts or cgroups on the host: ask the
    /// agent to shut down (it destroys the sandbox), then clean up whatever is left.
    fn drop(&mut self) {
        // In guest mode the agent is unshare's child; unshare exits when it does.
        let me = self.child.id();
        let target = if self.guest {
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
                .ok()
                .and_then(|k| k.split_whitespace().next().and_then(|p| p.parse().ok()))
                .unwrap_or(me as i32)
        } else {
            me as i32
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(target),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        force_cleanup(&self.sandbox_id, &self.state_dir());
    }
}

/// Kills every process in the sandbox's cgroups and removes them and the netns mount.
fn force_cleanup(sandbox_id: &str, state: &Path) {
    let mut dirs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            dirs.push(e.path().join("husk").join(sandbox_id));
        }
    }
    dirs.push(Path::new("/sys/fs/cgroup/husk").join(sandbox_id));
    for d in &dirs {
        for sub in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if let Ok(procs) = std::fs::read_to_string(sub.path().join("cgroup.procs")) {
                for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for d in &dirs {
        for sub in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if sub.path().is_dir() {
                let _ = std::fs::remove_dir(sub.path());
            }
        }
        let _ = std::fs::remove_dir(d);
    }
    let _ = nix::mount::umount2(
        &state.join("sandbox/netns"),
        nix::mount::MntFlags::MNT_DETACH,
    );
}

/// The ttrpc status code of a failed call.
pub fn code(r: ttrpc::Result<impl std::fmt::Debug>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an RPC status error, got {other:?}"),
    }
}

/// Runs `ip ARGS` inside the network namespace at `netns` (a bind mount or /proc/PID/ns/net).
pub fn ip_in(netns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A default process for exec.
pub fn process(args: &[&str]) -> Value {
    spec(args)["process"].clone()
}
