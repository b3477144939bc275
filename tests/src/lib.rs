//! Shared support for husk's tests: finding built artifacts and insisting on KVM.
use std::path::PathBuf;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where `guest-image/build` puts the guest kernel and initramfs images.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"))
}

/// A KVM test calls this first: it fails the test loudly, with the reason, where this
/// host cannot run microVMs. Deselecting KVM tests is done by not building them
/// (the `kvm` feature), never by skipping here.
pub fn require_kvm() {
    if let Err(e) = husk_vmm_api::check::check_host() {
        panic!("this test needs a usable KVM and cannot run here: {e}");
    }
}

/// Where the workspace's host binaries are (`cargo build --workspace --bins`).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("HUSK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"))
}

pub mod bench;
pub mod containerd;
pub mod huskd;
pub mod spdy_client;

pub mod vmm_proc {
    //! Runs husk-vmm as a child process and collects what it printed.
    use std::io::Read;

    pub use husk_vmm_api::VmmExitStatus;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Output {
        /// How husk-vmm exited; `None` if it had to be killed at the deadline.
        pub status: Option<VmmExitStatus>,
        pub stdout: String,
        pub stderr: String,
    }

    impl Output {
        /// The test init's verdict line for `test`, e.g. "husk-testinit: vsock PASS ...".
        pub fn verdict(&self, test: &str) -> Option<&str> {
            let prefix = format!("husk-testinit: {test} ");
            self.stdout.lines().find(|l| {
                l.strip_prefix(&prefix)
                    .is_some_and(|r| r.starts_with("PASS") || r.starts_with("FAIL"))
            })
        }

        pub fn assert_pass(&self, test: &str) -> &str {
            match self.verdict(test) {
                Some(l) if l.contains(" PASS") => l,
                _ => panic!(
                    "guest test {test} did not pass (exit {:?})\n--- serial ---\n{}\n--- vmm log ---\n{}",
                    self.status, self.stdout, self.stderr
                ),
            }
        }
    }

    /// husk-vmm with the guest kernel and the test initramfs, running `test`.
    pub fn command(test: &str, extra_cmdline: &str) -> Command {
        let guest = super::guest_dir();
        let mut c = Command::new(super::bin_dir().join("husk-vmm"));
        c.arg("--kernel")
            .arg(guest.join("vmlinux"))
            .arg("--initramfs")
            .arg(guest.join("testinit.cpio"))
            .arg("--cmdline")
            .arg(format!("quiet husk_test={test} {extra_cmdline}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Waits for the child, killing it after `timeout`; collects its output.
    pub fn wait(mut child: Child, timeout: Duration) -> Output {
        let mut out = child.stdout.take().expect("stdout piped");
        let mut err = child.stderr.take().expect("stderr piped");
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for husk-vmm") {
                break Some(VmmExitStatus::from_exit_status(st));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: o.join().unwrap_or_default(),
            stderr: e.join().unwrap_or_default(),
        }
    }

    pub fn run(test: &str, extra_cmdline: &str, args: &[&str], timeout: Duration) -> Output {
        let child = command(test, extra_cmdline)
            .args(args)
            .spawn()
            .expect("start husk-vmm (built by scripts/test?)");
        wait(child, timeout)
    }
}

pub mod cmd;

pub mod leaks {
    //! What a test must leave as it found it: VMM and virtiofsd processes, mounts, network
    //! interfaces and husk's sandbox directories.
    use std::collections::BTreeSet;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// The host state a microVM could leak.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Snapshot {
        processes: BTreeSet<String>,
        mounts: BTreeSet<String>,
        links: BTreeSet<String>,
        sandbox_dirs: BTreeSet<String>,
    }

    fn vm_processes() -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if comm == "husk-vmm" || comm.starts_with("virtiofsd") {
                out.insert(format!("{comm}[{name}]"));
            }
        }
        out
    }

    fn lines_of(path: &str, field: Option<usize>) -> BTreeSet<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| match field {
                Some(i) => l.split_whitespace().nth(i).unwrap_or("").to_string(),
                None => l.to_string(),
            })
            .collect()
    }

    fn dir_names(path: &std::path::Path) -> BTreeSet<String> {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    impl Snapshot {
        pub fn take() -> Snapshot {
            Snapshot {
                processes: vm_processes(),
                // Mount point and source: mount ids change with every remount.
                mounts: lines_of("/proc/self/mounts", None),
                links: dir_names(std::path::Path::new("/sys/class/net")),
                sandbox_dirs: dir_names(&husk_shim::sandbox::state::sandboxes_dir(
                    &husk_shim::paths::run_root(),
                )),
            }
        }

        /// Panics with the difference unless the host is back to this state (processes get
        /// a few seconds to exit).
        pub fn assert_nothing_leaked(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let now = Snapshot::take();
                if now == *self {
                    return;
                }
                if Instant::now() > deadline {
                    let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
                        b.difference(a).cloned().collect::<Vec<_>>()
                    };
                    panic!(
                        "left behind: processes {:?}, mounts {:?}, links {:?}, sandbox dirs {:?}",
                        diff(&self.processes, &now.processes),
                        diff(&self.mounts, &now.mounts),
                        diff(&self.links, &now.links),
                        diff(&self.sandbox_dirs, &now.sandbox_dirs),
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// A tap in this network namespace with an address, removed on drop.
    pub struct Tap(String);

    impl Tap {
        pub fn new(name: &str, cidr: &str) -> Tap {
            let ip = |args: &[&str]| {
                let st = Command::new("ip").args(args).status().expect("run ip");
                assert!(st.success(), "ip {args:?} failed");
            };
            let _ = Command::new("ip")
                .args(["link", "del", name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
            let tap = Tap(name.to_string());
            ip(&["addr", "add", cidr, "dev", name]);
            ip(&["link", "set", name, "up"]);
            tap
        }

        pub fn name(&self) -> &str {
            &self.0
        }
    }

    impl Drop for Tap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
}

pub mod pod {
    //! Pod VMs for the KVM tests and benchmarks: the built guest images and VMM, a sandbox
    //! booted up to its agent answering, and agent calls with a deadline.
    use std::future::Future;
    use std::time::{Duration, Instant};

    use husk_agent_client::Agent;
    use husk_proto::agent as pb;
    use husk_shim::sandbox::vm::VmSpec;
    use husk_shim::sandbox::{Sandbox, SandboxConfig};

    /// The longest a test waits on a process in the guest (its output to the end, its exit).
    /// The client calls for those wait for as long as the process runs; a guest that dies
    /// quietly must fail its test with a message, not hang the lab until its timeout.
    pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

    /// `f`'s result, or a panic naming `what` once `limit` has passed.
    pub async fn within<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
        tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
            panic!(
                "{what}: nothing from the guest within {} s (is the VM still running?)",
                limit.as_secs()
            )
        })
    }

    /// A process's whole stdout (or stderr), within `PROCESS_TIMEOUT`.
    pub async fn output(agent: &Agent, id: &str, exec_id: &str, stderr: bool) -> String {
        let what = format!(
            "{} of {id}/{exec_id} to its end",
            if stderr { "stderr" } else { "stdout" }
        );
        let b = within(
            &what,
            PROCESS_TIMEOUT,
            agent.read_to_end(id, exec_id, stderr),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        String::from_utf8_lossy(&b).into_owned()
    }

    /// The exit of a process, within `PROCESS_TIMEOUT`.
    pub async fn wait_process(agent: &Agent, id: &str, exec_id: &str) -> pb::WaitProcessResponse {
        let what = format!("WaitProcess of {id}/{exec_id}");
        within(&what, PROCESS_TIMEOUT, agent.wait_process(id, exec_id))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// The pod VM of this build tree (`guest-image/build`, `cargo build --bins`).
    pub fn spec() -> VmSpec {
        let g = super::guest_dir();
        let mut spec = VmSpec::pod(g.join("vmlinux"), g.join("husk-initramfs.cpio"));
        spec.vmm_bin = Some(super::bin_dir().join("husk-vmm"));
        spec
    }

    /// Creates sandbox `name` (guest hostname `hostname`) on `spec`; panics with the reason
    /// if it fails. Also returns the time from launch to the sandbox being created in the
    /// guest (the agent's first answer, plus CreateSandbox).
    pub async fn boot(name: &str, hostname: &str, spec: &VmSpec) -> (Sandbox, Duration) {
        let t = Instant::now();
        let sandbox = Sandbox::create(SandboxConfig {
            id: name.into(),
            hostname: hostname.into(),
            vm: spec.clone(),
            boot_timeout: Duration::from_secs(180),
            own_netns: false,
            cgroups_path: None,
        })
        .await
        .unwrap_or_else(|e| panic!("create the sandbox: {e}"));
        (sandbox, t.elapsed())
    }

    /// A tokio runtime for a test.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    }
}

/// A busybox root filesystem in `dir` on the host (Debian's static /bin/busybox with a
/// symlink per `applets`, and the directories a container mounts onto), for runc and for
/// `husk run --image`.
pub fn busybox_rootfs(dir: &std::path::Path, applets: &[&str]) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("create the rootfs");
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("/bin/busybox (Debian busybox-static, scripts/setup)");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet symlink");
    }
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(dir.join(d)).expect("create the rootfs");
    }
}
